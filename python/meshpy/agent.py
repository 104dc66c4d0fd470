"""A sidecar driven by the control plane: `meshpy proxy -c FILE` where FILE has `control_plane:`.

The agent joins the mesh with a join token (its key never leaves this host: it sends a CSR),
fetches its config slice, merges it with what only it knows (listen addresses, its app, its
key files) and runs a `Sidecar` on it. Then, on two threads, it watches for new config
versions (long-poll) and applies each atomically, and reports every second what it runs,
which keeps its endpoint registered (a lease) and acknowledges versions. It renews its
certificate before expiry over the same channel.

Everything it last applied is kept in `state_dir` (config, key, certificate), so with the
control plane away it keeps serving, and restarts, on its last good config.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import threading
import uuid
from pathlib import Path
from typing import Annotated, Any

import yaml
from cryptography import x509
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from .ca import BUNDLE_FILE, CERT_FILE, KEY_FILE, IssuedCertificate, generate_csr, write_pem_files
from .config import (
    Admin,
    Endpoint,
    ListenAddress,
    UpstreamProtocol,
    _config_relative,
    _Loader,
    is_mesh_bootstrap,
    validation_errors,
)
from .controlplane.client import ClientError, Unreachable, WorkloadClient
from .errors import ConfigError, MeshpyError

__all__ = ["MeshAgent", "MeshBootstrap", "is_mesh_bootstrap", "load_bootstrap"]

log = logging.getLogger("meshpy.agent")
# httpx logs every request at INFO: a line per second per sidecar for the reports alone.
logging.getLogger("httpx").setLevel(logging.WARNING)

CONFIG_FILE = "sidecar.yaml"
REPORT_INTERVAL = 1.0  # seconds between reports (the lease heartbeat), at most a third of the TTL
REPORT_TIMEOUT = 1.0  # seconds a report may take until the control plane names its lease TTL
POLL_WAIT = 25.0  # seconds a config long-poll may wait on the control plane
RENEW_AT = 2 / 3  # of the certificate's lifetime
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 5.0

ConfigPath = Annotated[str, AfterValidator(_config_relative)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ControlPlaneRef(_Model):
    url: str | list[str] = Field(description="The control plane's URL, or one per replica.")
    ca_bundle: ConfigPath = Field(
        description="PEM trust anchors of the mesh: the control plane's certificate is checked"
        " against them (the control plane prints the file's path)."
    )
    token: str | None = Field(default=None, description="A join token (meshpy token create).")
    token_file: ConfigPath | None = Field(default=None, description="A file holding it.")

    @property
    def urls(self) -> list[str]:
        return [self.url] if isinstance(self.url, str) else list(self.url)


class InboundSettings(_Model):
    listen: ListenAddress = Field(description="Where other sidecars reach this one (mTLS).")
    advertise: Endpoint | None = Field(
        default=None,
        description="host:port registered for other sidecars; defaults to the bound address,"
        " required when listening on 0.0.0.0.",
    )


class OutboundSettings(_Model):
    listen: ListenAddress = Field(description="Where the local app sends its calls.")


class MeshBootstrap(_Model):
    """The file of a sidecar that takes its config from the control plane."""

    control_plane: ControlPlaneRef
    service: str = Field(description="The service whose token was issued; must match it.")
    namespace: str = "default"
    app: Endpoint = Field(description="host:port of the local app this sidecar fronts.")
    app_protocol: UpstreamProtocol = Field(default="auto", description="How the app speaks.")
    inbound: InboundSettings
    outbound: OutboundSettings
    admin: Admin | None = None
    state_dir: ConfigPath = Field(
        description="Where the last good config, the key and the certificate are kept."
    )


def load_bootstrap(path: str | os.PathLike[str]) -> MeshBootstrap:
    path = Path(path)
    try:
        data = yaml.load(path.read_bytes(), Loader=_Loader)
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror or exc}"], str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML: {exc}"], str(path)) from None
    try:
        return MeshBootstrap.model_validate(data, context={"base_dir": path.parent.absolute()})
    except ValidationError as exc:
        raise ConfigError(validation_errors(exc, MeshBootstrap), str(path)) from None


class _Backoff:
    def __init__(self) -> None:
        self.delay = BACKOFF_FIRST

    def reset(self) -> None:
        self.delay = BACKOFF_FIRST

    def next(self) -> float:
        """The next delay, with jitter so a fleet does not reconnect in step."""
        delay = self.delay * random.uniform(0.5, 1.0)
        self.delay = min(self.delay * 2, BACKOFF_MAX)
        return delay


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


class MeshAgent:
    """Joins, fetches config, runs the sidecar and keeps it in step with the control plane."""

    def __init__(self, path: str | os.PathLike[str], workers: int | None = None) -> None:
        self.path = Path(path)
        self.bootstrap = load_bootstrap(self.path)
        self.workers = workers
        self.state_dir = Path(self.bootstrap.state_dir)
        self.identity_dir = self.state_dir / "identity"
        self.config_path = self.state_dir / CONFIG_FILE
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.sidecar_id = self._sidecar_id()
        self.client = WorkloadClient(
            self.bootstrap.control_plane.urls,
            self.bootstrap.control_plane.ca_bundle,
            self._credentials,
        )
        self.version: int | None = None  # the control plane's version now applied
        self.hash = ""  # of the slice last received (applied or refused)
        self.error: str | None = None
        self._lease_ttl: float | None = None  # what the control plane grants, once it said
        self.sidecar: Any = None  # a proxy.Sidecar once started
        self._bound: dict[str, str] = {}
        self._stop = threading.Event()
        self._report_now = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cred_cache: tuple[tuple[int, int], tuple[str, str]] | None = None
        self._not_after: dt.datetime | None = None
        self._issued_at: dt.datetime | None = None

    # -- identity

    def _sidecar_id(self) -> str:
        path = self.state_dir / "id"
        if path.exists():
            return path.read_text().strip()
        sidecar_id = f"{self.bootstrap.service}-{uuid.uuid4().hex[:10]}"
        path.write_text(sidecar_id + "\n")
        return sidecar_id

    def _credentials(self) -> tuple[str, str] | None:
        cert, key = self.identity_dir / CERT_FILE, self.identity_dir / KEY_FILE
        try:
            stamp = (cert.stat().st_mtime_ns, key.stat().st_mtime_ns)
        except OSError:
            return None
        if self._cred_cache is None or self._cred_cache[0] != stamp:
            self._cred_cache = (stamp, (cert.read_text(), key.read_text()))
        return self._cred_cache[1]

    def _load_validity(self) -> bool:
        """Read the current certificate's validity; False when there is none usable."""
        credentials = self._credentials()
        if credentials is None:
            return False
        cert = x509.load_pem_x509_certificate(credentials[0].encode())
        self._not_after = cert.not_valid_after_utc
        self._issued_at = cert.not_valid_before_utc
        return self._not_after > dt.datetime.now(dt.UTC)

    def _token(self) -> str:
        ref = self.bootstrap.control_plane
        if ref.token:
            return ref.token
        if ref.token_file:
            try:
                return Path(ref.token_file).read_text().strip()
            except OSError as exc:
                raise MeshpyError(f"control_plane.token_file: {exc.strerror or exc}") from None
        raise MeshpyError("no certificate yet and no join token: set control_plane.token")

    def _store_certificate(self, answer: dict[str, Any], key_pem: str) -> None:
        chain = answer["certificate"]
        leaf = chain[: chain.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
        not_after = dt.datetime.fromisoformat(answer["not_after"])
        issued = IssuedCertificate(
            cert_pem=leaf + "\n",
            key_pem=None,
            chain_pem=chain,
            bundle_pem=answer["bundle"],
            spiffe_id=answer["spiffe_id"],
            not_before=dt.datetime.now(dt.UTC),
            not_after=not_after,
            issued_at=dt.datetime.now(dt.UTC),
        )
        write_pem_files(self.identity_dir, issued, key_pem=key_pem)
        self._not_after, self._issued_at = not_after, issued.issued_at

    def join(self) -> None:
        """Trade the join token and a CSR for a certificate; the key is written here only."""
        csr, key = generate_csr()
        token = self._token()
        response = self.client.request("POST", "/v1/join", {"token": token, "csr": csr})
        answer = response.json()
        expected = f"/ns/{self.bootstrap.namespace}/sa/{self.bootstrap.service}"
        if not answer["spiffe_id"].endswith(expected):
            raise MeshpyError(
                f"the join token is for {answer['spiffe_id']}, but this sidecar is"
                f" {self.bootstrap.namespace}/{self.bootstrap.service}"
            )
        self._store_certificate(answer, key)
        log.info("joined the mesh as %s, certificate valid until %s", answer["spiffe_id"],
                 answer["not_after"])  # fmt: skip

    def renew(self) -> None:
        """A new certificate for the same identity; once the current one has expired (the
        control plane was away too long) the join token is the only way back in."""
        if self._not_after is not None and self._not_after <= dt.datetime.now(dt.UTC):
            log.warning("the certificate has expired; joining again with the token")
            self.join()
            if self.sidecar is not None:
                self.sidecar.call_in_loop(self.sidecar.reload_identity)
            return
        csr, key = generate_csr()
        answer = self.client.request("POST", "/v1/certificate", {"csr": csr}).json()
        self._store_certificate(answer, key)
        log.info("certificate renewed, valid until %s", answer["not_after"])
        if self.sidecar is not None:
            self.sidecar.call_in_loop(self.sidecar.reload_identity)

    def _renew_due(self) -> bool:
        if self._not_after is None or self._issued_at is None:
            return False
        due = self._issued_at + (self._not_after - self._issued_at) * RENEW_AT
        return dt.datetime.now(dt.UTC) >= due

    # -- config

    def render(self, config: dict[str, Any]) -> bytes:
        """The full sidecar config: the control plane's slice plus this sidecar's own facts.

        Listen addresses are the bootstrap's as written, never the ports bound for port 0:
        the proxy keeps a listener across versions only while its address is unchanged, and
        would otherwise try to bind its own port a second time and refuse every new version.
        """
        boot = self.bootstrap
        inbound: dict[str, Any] = {
            "name": "inbound",
            "listen": boot.inbound.listen,
            "mtls": "strict",
            "routes": config["inbound"]["routes"],
        }
        if config["inbound"]["authz"] is not None:
            inbound["authz"] = config["inbound"]["authz"]
        outbound = {
            "name": "outbound",
            "listen": boot.outbound.listen,
            "routes": config["outbound"]["routes"],
        }
        document: dict[str, Any] = {
            "identity": {
                "cert": str(self.identity_dir / CERT_FILE),
                "key": str(self.identity_dir / KEY_FILE),
                "bundle": str(self.identity_dir / BUNDLE_FILE),
            },
            "listeners": [inbound, outbound],
            "clusters": [
                {"name": "app", "endpoints": [boot.app], "protocol": boot.app_protocol},
                *config["clusters"],
            ],
        }
        if boot.admin is not None:
            document["admin"] = {"listen": boot.admin.listen}
        header = f"# Written by the mesh agent of {boot.namespace}/{boot.service}.\n"
        return (header + yaml.safe_dump(document, sort_keys=False)).encode()

    def fetch(self, wait: float) -> dict[str, Any] | None:
        """The new config slice, or None when it did not change within `wait` seconds."""
        response = self.client.request(
            "GET", f"/v1/config?hash={self.hash}&wait={wait:g}", timeout=wait + 10
        )
        return None if response.status_code == 204 else response.json()

    def _apply(self, answer: dict[str, Any]) -> None:
        data = self.render(answer["config"])
        if self.sidecar is None:
            applied, error = True, None
        else:
            applied = self.sidecar.call_in_loop(lambda: self.sidecar.apply_config(data)).result()
            error = None if applied else self.sidecar.last_error
        # The hash moves only now: a report sent meanwhile must not acknowledge a config
        # that is not running yet. A refused one moves it too, so it is not fetched again.
        if applied:
            _atomic_write(self.config_path, data)  # the last good config, for restarts
            self.version, self.error = answer["version"], None
            log.info("config version %s applied", answer["version"])
        else:
            self.error = error or "refused"
            log.error("config version %s refused: %s", answer["version"], self.error)
        self.hash = answer["hash"]
        self._report_now.set()

    # -- the loops

    def _report(self) -> None:
        response = self.client.request(
            "POST", "/v1/report", self._report_body(), timeout=self._report_timeout()
        )
        # A hung replica must not hold a report until the lease has expired. Reporting every
        # third of the TTL (at most) and giving up on a replica after a quarter leaves about
        # 0.4 of it to move on and report to the next replica before the lease expires.
        self._lease_ttl = response.json()["lease_ttl"]

    def _report_timeout(self) -> float:
        return REPORT_TIMEOUT if self._lease_ttl is None else self._lease_ttl / 4

    def _report_interval(self) -> float:
        return (
            REPORT_INTERVAL
            if self._lease_ttl is None
            else min(REPORT_INTERVAL, self._lease_ttl / 3)
        )

    def _report_body(self) -> dict[str, Any]:
        address = self.bootstrap.inbound.advertise or self._bound.get("inbound")
        return {
            "sidecar_id": self.sidecar_id,
            "address": address,
            "version": self.version,
            "hash": self.hash or None,
            "applied": self.error is None,
            "error": self.error,
        }

    def _watch_loop(self) -> None:
        backoff = _Backoff()
        while not self._stop.is_set():
            try:
                answer = self.fetch(POLL_WAIT)
                backoff.reset()
                if answer is not None:
                    self._apply(answer)
            except (Unreachable, ClientError) as exc:
                delay = backoff.next()
                log.warning("config watch: %s; retrying in %.1fs", exc, delay)
                self._stop.wait(delay)

    def _report_loop(self) -> None:
        backoff = _Backoff()
        while not self._stop.is_set():
            try:
                if self._renew_due():
                    self.renew()
                self._report()
                backoff.reset()
                delay = self._report_interval()
            except MeshpyError as exc:  # unreachable, refused, or the token cannot be read
                delay = backoff.next()
                log.warning("report to the control plane: %s; retrying in %.1fs", exc, delay)
            self._report_now.wait(delay)
            self._report_now.clear()

    def _retry(self, what: str, action: Any) -> Any:
        """Call `action` until the control plane answers (or we are stopped)."""
        backoff = _Backoff()
        while True:
            try:
                return action()
            except Unreachable as exc:
                delay = backoff.next()
                log.warning("%s: %s; retrying in %.1fs", what, exc, delay)
                if self._stop.wait(delay):
                    raise MeshpyError(f"stopped before {what} succeeded") from None

    def start(self) -> None:
        """Join (unless a valid certificate is kept), get a config, start the proxy and loops."""
        from .proxy import Sidecar

        if not self._load_validity():
            self._retry("joining the mesh", self.join)
        try:
            answer = self.fetch(0)
        except Unreachable as exc:
            if not self.config_path.exists():
                log.warning("control plane unreachable (%s) and no saved config; waiting", exc)
                answer = self._retry("fetching the first config", lambda: self.fetch(0))
            else:
                log.warning("control plane unreachable (%s): serving the saved config", exc)
                answer = None
        if answer is not None:
            self._apply(answer)
        self.sidecar = Sidecar(self.config_path, self.workers, base_dir=self.path.parent)
        self._bound = dict(self.sidecar.addresses)
        for target in (self._watch_loop, self._report_loop):
            thread = threading.Thread(target=target, name=f"meshpy-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop the loops and deregister (the endpoint leaves every load balancer now)."""
        self._stop.set()
        self._report_now.set()
        try:
            self.client.request("POST", "/v1/leave", self._report_body(), timeout=2)
        except (Unreachable, ClientError) as exc:
            log.info("could not deregister (the lease will expire): %s", exc)
        self.client.close()

    def run(self, drain_timeout: float) -> int:
        try:
            self.start()
        except ClientError as exc:
            log.error("the control plane refused this sidecar: %s", exc.detail)
            return 1
        try:
            return self.sidecar.run(drain_timeout)
        finally:
            self.stop()
