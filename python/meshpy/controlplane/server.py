"""`meshpy control-plane`: the API over HTTPS, with its CA, admin token and store."""

import asyncio
import datetime as dt
import ipaddress
import logging
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from ..ca import CAError, CertificateAuthority, IssuedCertificate, write_pem_files
from .api import ControlPlane, create_app
from .store import open_store

__all__ = ["ControlPlaneSettings", "run_control_plane"]

log = logging.getLogger("meshpy.controlplane")
# httpx logs every request at INFO: with etcd as the store, several lines per sidecar report.
logging.getLogger("httpx").setLevel(logging.WARNING)

SERVER_SERVICE = "control-plane"
SERVER_NAMESPACE = "meshpy-system"
SERVER_CERT_TTL = 30 * 24 * 3600.0  # renewed at two thirds of it while the server runs
# A renewal that failed (the CA unreadable, a full disk) is tried again this often, or
# after a twentieth of the lifetime when that is sooner: several tries before it expires.
RENEW_RETRY = 60.0


@dataclass
class ControlPlaneSettings:
    listen: str = "127.0.0.1:15010"
    data_dir: Path = Path("meshpy-data")
    store: str | None = None  # None: the embedded store in data_dir
    ca_dir: Path | None = None  # None: data_dir/ca, created on first start
    trust_domain: str = "mesh.local"
    advertise: list[str] = field(default_factory=list)  # extra names/IPs for the certificate
    admin_token_file: Path | None = None
    cert_ttl: float = 3600.0
    server_cert_ttl: float = SERVER_CERT_TTL
    lease_ttl: float = 5.0
    name: str | None = None


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _load_or_create_ca(settings: ControlPlaneSettings) -> CertificateAuthority:
    directory = settings.ca_dir or settings.data_dir / "ca"
    if settings.ca_dir is None and not (directory / "ca.json").exists():
        ca = CertificateAuthority.create_root(settings.trust_domain)
        ca.save(directory)
        log.info("created a root CA for %s in %s", settings.trust_domain, directory)
        return ca
    return CertificateAuthority.load(directory)


def _admin_token(settings: ControlPlaneSettings) -> tuple[str, Path]:
    path = settings.admin_token_file or settings.data_dir / "admin-token"
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token, path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token, path


def _split_names(names: list[str]) -> tuple[list[str], list[str]]:
    dns, ips = [], []
    for name in names:
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            dns.append(name)
        else:
            if not ip.is_unspecified:
                ips.append(str(ip))
    return dns, ips


def _bind(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def run_control_plane(settings: ControlPlaneSettings) -> int:
    """Serve until SIGINT or SIGTERM. Prints the URL and the files a client needs."""
    data_dir = _private_dir(settings.data_dir)
    try:
        ca = _load_or_create_ca(settings)
    except CAError as exc:
        log.error("cannot load the CA: %s", exc)
        return 2
    token, token_path = _admin_token(settings)
    sock = _bind(settings.listen)
    host, port = sock.getsockname()[:2]
    dns, ips = _split_names(["localhost", host, "127.0.0.1", *settings.advertise])
    tls_dir = _private_dir(data_dir / "tls")

    def issue_server_cert() -> tuple[IssuedCertificate, dict[str, Path]]:
        issued = ca.issue(
            SERVER_SERVICE,
            SERVER_NAMESPACE,
            settings.server_cert_ttl,
            dns_names=dns,
            ip_addresses=ips,
        )
        return issued, write_pem_files(tls_dir, issued)

    server_cert, tls = issue_server_cert()
    bundle = data_dir / "bundle.pem"
    bundle.write_text(ca.bundle_pem)
    name = settings.name or f"{socket.gethostname()}:{port}"
    cp = ControlPlane(
        open_store(settings.store, data_dir),
        ca,
        token,
        cert_ttl=settings.cert_ttl,
        lease_ttl=settings.lease_ttl,
        name=name,
    )
    config = uvicorn.Config(
        create_app(cp),
        ssl_certfile=str(tls["cert.pem"]),
        ssl_keyfile=str(tls["key.pem"]),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
        lifespan="on",
    )
    server = _RenewingServer(config, server_cert, issue_server_cert)
    shown_host = f"[{host}]" if ":" in host else host
    url = f"https://{shown_host}:{port}"
    print(
        f"meshpy control plane ready: {url}\n"
        f"  store: {settings.store or data_dir / 'store.sqlite3'}\n"
        f"  trust domain: {ca.trust_domain}\n"
        f"  for meshpy apply/get/status/token:\n"
        f"    export MESHPY_SERVER={url} MESHPY_CA={bundle} MESHPY_TOKEN_FILE={token_path}",
        flush=True,
    )
    server.run(sockets=[sock])
    return 0


class _RenewingServer(uvicorn.Server):
    """uvicorn's server, which also renews its own HTTPS certificate at two thirds of its
    lifetime: new handshakes get the new one, open connections keep theirs."""

    def __init__(
        self,
        config: uvicorn.Config,
        current: IssuedCertificate,
        issue: Callable[[], tuple[IssuedCertificate, dict[str, Path]]],
    ) -> None:
        super().__init__(config)
        self._current = current
        self._issue = issue

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        renewing = asyncio.create_task(self._renew_forever())
        try:
            await super().serve(sockets=sockets)
        finally:
            renewing.cancel()

    async def _renew_forever(self) -> None:
        while True:
            due = self._current.renew_at() - dt.datetime.now(dt.UTC)
            await asyncio.sleep(max(due.total_seconds(), 0.0))
            context = self.config.ssl
            assert context is not None, "the control plane serves HTTPS only"
            try:
                issued, files = self._issue()
                # Handshakes run on this loop, so none is half-way through the swap.
                context.load_cert_chain(files["cert.pem"], files["key.pem"])
            except (CAError, OSError) as exc:
                log.error("cannot renew the control plane's certificate: %s", exc)
                lifetime = self._current.lifetime.total_seconds()
                await asyncio.sleep(min(RENEW_RETRY, lifetime / 20))
                continue
            self._current = issued
            log.info(
                "renewed the control plane's certificate, valid until %s",
                self._current.not_after.isoformat(timespec="seconds"),
            )
