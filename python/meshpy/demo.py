"""`meshpy demo`: the shop (meshpy.shop) running as a real mesh on localhost.

It starts a control plane, applies the shop's resources (shop_mesh.yaml: four services, an
`ingress` identity and a policy per service), then runs each shop app with a mesh sidecar
beside it, plus one sidecar of its own for `ingress`. The ingress sidecar's outbound listener
is the user's way in (--port): an HTTP proxy into the mesh, so ``curl -x 127.0.0.1:8080
http://frontend/`` names a service exactly as the apps do and calls it over mTLS as
shop/ingress, which the policies then allow or refuse.

Everything is a child process. Ctrl-C or SIGTERM stops the sidecars first (they deregister
while the control plane is still up), then the apps, then the control plane.
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path

import httpx
import yaml

from .controlplane.client import AdminClient
from .controlplane.models import AuthorizationPolicy, dump_resource, parse_resources
from .errors import MeshpyError
from .shop import SERVICES

__all__ = ["INGRESS", "NAMESPACE", "run_demo"]

NAMESPACE = "shop"
INGRESS = "ingress"
READY_TIMEOUT = 30.0  # seconds for the whole mesh to come up
STOP_TIMEOUT = 5.0  # seconds a group of children gets after SIGTERM before SIGKILL
TOKEN_TTL = "10m"  # a sidecar trades its token for a certificate at once, then renews that
# Nothing listens here: the ingress runs no app, and its policy lets no caller through.
INGRESS_APP = "127.0.0.1:9"

_CONTROL_PLANE_READY = re.compile(
    r"export MESHPY_SERVER=(?P<server>\S+) MESHPY_CA=(?P<ca>\S+) MESHPY_TOKEN_FILE=(?P<token>\S+)"
)
_APP_READY = re.compile(r"^meshpy shop: \S+ listening on (?P<address>\S+)")
_SIDECAR_READY = re.compile(
    r"^meshpy proxy ready: inbound=(?P<inbound>\S+) outbound=(?P<outbound>\S+)"
    r" admin=(?P<admin>\S+)"
)


class _Stopped(Exception):
    """Ctrl-C or SIGTERM arrived while the mesh was starting."""


class _Failure(Exception):
    """The demo cannot go on; the message says why."""


class _Child:
    """A child process: stdout is scanned for its ready line, stderr goes to its log file."""

    def __init__(self, name: str, argv: list[str], log: Path, ready: re.Pattern[str]) -> None:
        self.name = name
        self.log = log
        self.match: re.Match[str] | None = None
        self._ready = ready
        with open(log, "wb") as stderr:
            # Its own process group: Ctrl-C in the terminal reaches only the demo, which then
            # stops the children in order.
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                process_group=0,
            )
        self._reader = threading.Thread(target=self._read, name=f"demo-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # read to the end, so the pipe never fills
            if self.match is None:
                self.match = self._ready.search(line)

    def __getitem__(self, group: str | int) -> str:
        """A group of its ready line (0: the whole match)."""
        assert self.match is not None
        return self.match[group]

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def reap(self, deadline: float) -> None:
        """Wait for it until `deadline`, then kill it."""
        try:
            self.proc.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(1)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def failure(self) -> str:
        """Why it is gone, with the end of its log (the log goes when the temp dir does)."""
        try:
            tail = self.log.read_text(errors="replace").splitlines()[-15:]
        except OSError:
            tail = []
        shown = "".join(f"\n  | {line}" for line in tail)
        code = self.proc.returncode
        how = f"killed by signal {-code}" if code < 0 else f"status {code}"
        return f"{self.name} exited unexpectedly ({how}){shown}"


def _meshpy(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshpy", *args]


def _clusters(admin: httpx.Client, address: str) -> dict[str, tuple[str, ...]]:
    """The endpoints of each cluster a sidecar runs now, from its admin listener."""
    try:
        config = admin.get(f"http://{address}/config").json()["config"]
    except httpx.HTTPError:
        return {}  # not answering yet: the caller polls until its deadline
    return {cluster["name"]: tuple(cluster["endpoints"]) for cluster in config["clusters"]}


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; other systems' ranges start higher


def _free_ports(count: int) -> list[int]:
    """Ports free now, below the ephemeral range: port-0 listeners and outgoing connections
    (the demo's and any other program's) draw from that range, so none can take one of these
    before its sidecar binds it."""
    chosen: list[int] = []
    with contextlib.ExitStack() as stack:  # held together, so that they differ
        while len(chosen) < count:
            port = random.randrange(10000, max(_ephemeral_start(), 20000))
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen.append(port)
    return chosen


def _callers(policy: AuthorizationPolicy) -> str:
    callers = [
        c for rule in policy.spec.rules if rule.action == "allow" for c in rule.from_ or ["*"]
    ]
    return ", ".join(callers) or "nobody"


def _check_port(port: int) -> None:
    """Fail early, and clearly, when the entry port is taken."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy binds
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise _Failure(
                f"cannot listen on 127.0.0.1:{port}: {exc.strerror} (pick another with --port)"
            ) from None


def _terminate(children: Iterable[_Child]) -> None:
    """SIGTERM all at once, then SIGKILL whatever is still running after STOP_TIMEOUT."""
    children = list(children)
    for child in children:
        child.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    for child in children:
        child.reap(deadline)


class _Demo:
    def __init__(self, root: Path, port: int, log_level: str, stopping: threading.Event) -> None:
        self.root = root
        self.port = port
        self.log_level = log_level
        self.stopping = stopping
        self.logs = root / "logs"
        self.resources = parse_resources(
            files("meshpy").joinpath("shop_mesh.yaml").read_text(), "shop_mesh.yaml"
        )
        self.control_plane: _Child | None = None
        self.apps: dict[str, _Child] = {}
        self.sidecars: dict[str, _Child] = {}

    def _children(self) -> list[_Child]:
        first = [self.control_plane] if self.control_plane else []
        return [*first, *self.apps.values(), *self.sidecars.values()]

    def _spawn(self, name: str, argv: list[str], ready: re.Pattern[str]) -> _Child:
        log = self.logs / f"{name.replace(' ', '-')}.log"
        return _Child(name, argv, log, ready)

    def _check(self) -> None:
        """Raise if asked to stop or if a child has died."""
        if self.stopping.is_set():
            raise _Stopped
        for child in self._children():
            if child.proc.poll() is not None:
                raise _Failure(child.failure())

    def _wait_ready(self, children: Iterable[_Child], deadline: float) -> None:
        waiting = list(children)
        while waiting:
            self._check()
            waiting = [child for child in waiting if child.match is None]
            if waiting and time.monotonic() > deadline:
                names = ", ".join(child.name for child in waiting)
                raise _Failure(f"not ready after {READY_TIMEOUT:g}s: {names}")
            time.sleep(0.02)

    def start(self) -> None:
        """Bring the mesh up: every sidecar ready and in sync."""
        self.logs.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + READY_TIMEOUT
        argv = _meshpy("control-plane", "--listen", "127.0.0.1:0", "--log-level", self.log_level,
                       "--data-dir", str(self.root / "control-plane"))  # fmt: skip
        self.control_plane = self._spawn("control plane", argv, _CONTROL_PLANE_READY)
        # An app needs only its sidecar's outbound address, fixed here, so the apps start
        # now, beside the control plane; the sidecars then learn the apps' addresses.
        outbound = dict(zip(SERVICES, _free_ports(len(SERVICES)), strict=True))
        for name in SERVICES:
            argv = [sys.executable, "-m", "meshpy.shop", name, "--listen", "127.0.0.1:0",
                    "--outbound", f"127.0.0.1:{outbound[name]}"]  # fmt: skip
            self.apps[name] = self._spawn(f"{name} app", argv, _APP_READY)
        self._wait_ready(self._children(), deadline)
        cp = self.control_plane
        admin_token = Path(cp["token"]).read_text().strip()
        client = AdminClient(cp["server"], admin_token, cp["ca"])
        try:
            client.apply([dump_resource(resource) for resource in self.resources])
            for name in (*SERVICES, INGRESS):
                app = self.apps[name]["address"] if name in self.apps else INGRESS_APP
                listen = f"127.0.0.1:{outbound.get(name, self.port)}"
                token = client.create_token(name, NAMESPACE, TOKEN_TTL)["token"]
                path = self._bootstrap(name, cp["server"], cp["ca"], token, app, listen)
                argv = _meshpy("proxy", "-c", str(path), "--drain-timeout", "1s",
                               "--log-level", self.log_level)  # fmt: skip
                self.sidecars[name] = self._spawn(f"{name} sidecar", argv, _SIDECAR_READY)
            self._wait_ready(self.sidecars.values(), deadline)
            self._wait_wired(client, deadline)
        finally:
            client.close()

    def _bootstrap(
        self, name: str, server: str, ca: str, token: str, app: str, outbound: str
    ) -> Path:
        directory = self.root / name
        directory.mkdir(mode=0o700, exist_ok=True)
        token_file = directory / "token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        bootstrap = {
            "control_plane": {"url": server, "ca_bundle": ca, "token_file": str(token_file)},
            "service": name,
            "namespace": NAMESPACE,
            "app": app,
            "inbound": {"listen": "127.0.0.1:0"},
            "outbound": {"listen": outbound},
            "admin": {"listen": "127.0.0.1:0"},
            "state_dir": str(directory / "state"),
        }
        path = directory / "sidecar.yaml"
        path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        return path

    def _wait_wired(self, client: AdminClient, deadline: float) -> None:
        """Until every sidecar runs a config holding every service's endpoint (else a first
        call could find an empty cluster) and the control plane shows them all in sync."""
        expected = {
            f"{name}.{NAMESPACE}": (child["inbound"],) for name, child in self.sidecars.items()
        }
        with httpx.Client(trust_env=False, timeout=2.0) as admin:
            while True:
                self._check()
                synced = {s["address"] for s in client.sidecars() if s["in_sync"]}
                if {address for (address,) in expected.values()} <= synced and all(
                    expected.items() <= _clusters(admin, child["admin"]).items()
                    for child in self.sidecars.values()
                ):
                    return
                if time.monotonic() > deadline:
                    raise _Failure(f"sidecars not in sync after {READY_TIMEOUT:g}s")
                time.sleep(0.05)

    def banner(self) -> str:
        assert self.control_plane is not None
        entry = self.sidecars[INGRESS]["outbound"]
        proxy, cart = f"curl -x {entry}", "http://frontend/cart/me"
        rows = [
            f"  {name:<10} app {self.apps[name]['address']:<16}"
            f" sidecar inbound {self.sidecars[name]['inbound']:<16}"
            f" outbound {self.sidecars[name]['outbound']:<16}"
            f" admin {self.sidecars[name]['admin']}"
            for name in SERVICES
        ]
        policies = [
            f"  {policy.spec.service:<10} <- {_callers(policy)}"
            for policy in self.resources
            if isinstance(policy, AuthorizationPolicy)
        ]
        return "\n".join(
            [
                f"meshpy demo ready: the shop runs as a mesh on localhost (namespace {NAMESPACE})",
                f"  files and logs in {self.root}",
                f"  control plane {self.control_plane['server']}",
                f"  ingress    {entry} (an HTTP proxy into the mesh: calls go out as"
                f" {NAMESPACE}/{INGRESS})",
                *rows,
                "Who may call whom (every call is mTLS; anything else gets 403):",
                *policies,
                "Try:",
                f"  {proxy} http://frontend/",
                f"  {proxy} http://frontend/products/2",
                f"""  {proxy} {cart}/items -d '{{"id": 2, "qty": 1}}'""",
                f"""  {proxy} {cart}/checkout -d '{{"card": "4000000000000002"}}'   # 402""",
                f"""  {proxy} {cart}/checkout -d '{{"card": "4242424242424242"}}'""",
                f"  {proxy} -i http://payments/payments/pay_1"
                "   # 403: only checkout may call payments",
                "The control plane:",
                f"  {self.control_plane[0]}",
                f"  meshpy status; meshpy get policies -n {NAMESPACE}; meshpy get endpoints",
                "Press Ctrl-C to stop.",
            ]
        )

    def watch(self) -> None:
        """Until Ctrl-C or SIGTERM; raises _Failure when a child dies."""
        while not self.stopping.wait(0.2):
            self._check()

    def stop(self) -> None:
        # Sidecars first, so they deregister while the control plane is still up.
        _terminate(self.sidecars.values())
        _terminate(self.apps.values())
        _terminate([self.control_plane] if self.control_plane else [])


def run_demo(port: int = 8080, data_dir: str | None = None, log_level: str = "info") -> int:
    """Run the demo until Ctrl-C or SIGTERM (0), or until something fails (1)."""
    stopping = threading.Event()
    handlers = {
        signum: signal.signal(signum, lambda *_: stopping.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    root = Path(data_dir).absolute() if data_dir else Path(tempfile.mkdtemp(prefix="meshpy-demo-"))
    demo: _Demo | None = None
    try:
        _check_port(port)
        demo = _Demo(root, port, log_level, stopping)
        demo.start()
        print(demo.banner(), flush=True)
        demo.watch()
        return 0
    except _Stopped:
        return 0
    except (_Failure, MeshpyError) as exc:
        print(f"meshpy demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if demo is not None:
            demo.stop()
        if data_dir is None:
            shutil.rmtree(root, ignore_errors=True)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
