"""The mesh across hosts: sidecars in separate network namespaces on a private bridge.

Two scenarios on hosts ``cp``, ``h1``, ``h2`` and ``h3``, each a class whose mesh is torn
down before the next starts (they use the same ports):

- file configs, no control plane: every sidecar issues its own identity from one shared CA
  directory; h1's app calls h2's app through h1's outbound sidecar and h2's strict mTLS
  inbound sidecar; h3 is a bystander on the same network.
- the control plane on ``cp``: sidecars of ``frontend`` (h1) and ``payments`` (h2 and h3)
  join it over the bridge with join tokens, and everything they route by comes from it.
  Its tests run in order: a route change, then h3's sidecar killed, then the control plane.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import meshpy_cmd
from netns import CurlResult, Host, Network, requires_root_netns

pytestmark = requires_root_netns

DOMAIN = "mesh.test"
NAMESPACE = "shop"
ADMIN = "127.0.0.1:9901"  # the same address on every host: each namespace has its own loopback
APP_PORT = 8080
INBOUND_PORT = 15006
OUTBOUND_PORT = 15001
CP_PORT = 15010
LEASE_TTL = 2.0  # seconds a killed sidecar's endpoint outlives it
PROPAGATION_LIMIT = 1.0  # seconds from an applied change to every sidecar acting on it
REMOVAL_LIMIT = 5.0  # seconds from a sidecar's death to its endpoint leaving the others

# A stand-in app: answers every GET with JSON of its host's name, the path, the peer and the
# headers it got.
ECHO_APP = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = json.dumps({
            "host": sys.argv[3],
            "path": self.path,
            "peer": self.client_address[0],
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Echo).serve_forever()
"""


def spiffe_id(service: str) -> str:
    return f"spiffe://{DOMAIN}/ns/{NAMESPACE}/sa/{service}"


def start_app(host: Host) -> subprocess.Popen[bytes]:
    app = host.popen([sys.executable, "-c", ECHO_APP, "127.0.0.1", str(APP_PORT), host.name])
    host.wait_for_port(APP_PORT, "127.0.0.1")
    return app


def call(host: Host, service: str, path: str = "/", timeout: float = 5) -> CurlResult:
    """A request from ``host``'s app to ``service`` through its sidecar's outbound listener."""
    url = f"http://127.0.0.1:{OUTBOUND_PORT}{path}"
    return host.curl(url, "-H", f"Host: {service}", timeout=timeout)


def answered_by(result: CurlResult) -> str | None:
    """The host whose app answered, or None for anything but an app's 200."""
    return result.json()["host"] if result.status == 200 else None


@dataclass
class Sidecar:
    host: Host
    proc: subprocess.Popen[bytes]
    workdir: Path

    @property
    def log(self) -> Path:
        return self.workdir / "proxy.log"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_ready(self) -> None:
        try:
            self.host.wait_for_http(f"http://{ADMIN}/ready", timeout=15)
        except AssertionError as exc:
            tail = self.log_tail()
            raise AssertionError(f"{exc}\n--- {self.host.name} proxy log ---\n{tail}") from None

    def endpoints(self, cluster: str) -> list[str]:
        """The endpoints of ``cluster`` in the config the agent last applied."""
        config = yaml.safe_load((self.workdir / "state" / "sidecar.yaml").read_text())
        return next(c["endpoints"] for c in config["clusters"] if c["name"] == cluster)


def launch_sidecar(host: Host, config: dict, workdir: Path) -> Sidecar:
    """Write and validate ``config`` and run ``meshpy proxy`` on it in ``host``."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    subprocess.run(meshpy_cmd("validate", str(path)), check=True, capture_output=True)
    with (workdir / "proxy.log").open("wb") as out:
        argv = meshpy_cmd("proxy", "-c", str(path), "--drain-timeout", "1s")
        proc = host.popen(argv, stdout=out, stderr=subprocess.STDOUT)
    return Sidecar(host, proc, workdir)


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    with Network(["cp", "h1", "h2", "h3"]) as net:
        yield net


# --- file configs -------------------------------------------------------------------------------


@pytest.fixture(scope="class")
def file_mesh(network: Network, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """frontend's sidecar on h1 -> mTLS -> payments' sidecar on h2 -> the app on h2."""
    h1, h2 = network["h1"], network["h2"]
    workdir = tmp_path_factory.mktemp("file-mesh")
    ca = workdir / "ca"
    argv = meshpy_cmd("ca", "init", "--trust-domain", DOMAIN, str(ca))
    subprocess.run(argv, check=True, capture_output=True)

    app = start_app(h2)
    payments = {
        "admin": {"listen": ADMIN},
        "identity": {"ca": str(ca), "service": "payments", "namespace": NAMESPACE},
        "listeners": [
            {
                "name": "inbound",
                "listen": f"{h2.ip}:{INBOUND_PORT}",
                "mtls": "strict",
                "routes": [{"cluster": "app"}],
            }
        ],
        "clusters": [{"name": "app", "endpoints": [f"127.0.0.1:{APP_PORT}"]}],
    }
    frontend = {
        "admin": {"listen": ADMIN},
        "identity": {"ca": str(ca), "service": "frontend", "namespace": NAMESPACE},
        "listeners": [
            {
                "name": "outbound",
                "listen": f"127.0.0.1:{OUTBOUND_PORT}",
                "routes": [{"match": {"host": "payments"}, "cluster": "payments", "timeout": "2s"}],
            }
        ],
        "clusters": [
            {
                "name": "payments",
                "endpoints": [f"{h2.ip}:{INBOUND_PORT}"],
                "tls": "mesh",
                "server_identity": spiffe_id("payments"),
            }
        ],
    }
    sidecars = [
        launch_sidecar(h2, payments, workdir / "payments"),
        launch_sidecar(h1, frontend, workdir / "frontend"),
    ]
    for sidecar in sidecars:
        sidecar.wait_ready()
    yield
    # Stopped here rather than with the network: the next scenario needs the ports.
    for sidecar in sidecars:
        sidecar.host.terminate(sidecar.proc)
    h2.terminate(app)


@pytest.mark.usefixtures("file_mesh")
class TestFileConfigs:
    def test_call_crosses_hosts_over_mtls_with_caller_identity(self, network: Network) -> None:
        forged = f"By=x;URI={spiffe_id('admin')}"
        r = network["h1"].curl(
            f"http://127.0.0.1:{OUTBOUND_PORT}/orders?id=7",
            *("-H", "Host: payments", "-H", f"x-forwarded-client-cert: {forged}"),
        )
        assert (r.status, r.exit_code) == (200, 0), r
        seen = r.json()
        assert seen["path"] == "/orders?id=7"
        assert seen["peer"] == "127.0.0.1"  # h2's sidecar, not h1, talks to the app
        # Written by h2's sidecar from h1's certificate; the client's forged one is gone.
        xfcc = f"By={spiffe_id('payments')};URI={spiffe_id('frontend')}"
        assert seen["headers"]["x-forwarded-client-cert"] == xfcc

    def test_strict_inbound_refuses_plaintext_from_another_host(self, network: Network) -> None:
        url = f"http://{network['h2'].ip}:{INBOUND_PORT}/"
        # --http0.9 lets curl hand back whatever non-HTTP bytes come before the close.
        r = network["h3"].curl(url, "-H", "Host: payments", "--http0.9")
        assert r.exit_code != 7, r  # h3 reaches h2: the TCP connection is accepted ...
        # ... then closed with no HTTP answer: nothing, or a TLS alert record (rustls sends a
        # fatal decode_error alert, 15 03 03 00 02 02 32, for the plaintext it cannot parse).
        assert r.status == 0, r
        assert r.body == "" or r.body.startswith("\x15\x03"), r

    def test_loopback_listeners_stay_on_their_host(self, network: Network) -> None:
        h1, h2, h3 = network["h1"], network["h2"], network["h3"]
        # h3's 127.0.0.1 is its own: nothing listens there.
        assert h3.curl(f"http://127.0.0.1:{OUTBOUND_PORT}/", "-H", "Host: payments").exit_code == 7
        # Bound to 127.0.0.1, h1's outbound listener and h2's app refuse the network.
        assert h3.curl(f"http://{h1.ip}:{OUTBOUND_PORT}/", "-H", "Host: payments").exit_code == 7
        assert h3.curl(f"http://{h2.ip}:{APP_PORT}/").exit_code == 7
        assert h1.curl(f"http://{h2.ip}:{APP_PORT}/").exit_code == 7


# --- the control plane --------------------------------------------------------------------------


@dataclass
class ControlPlane:
    host: Host
    proc: subprocess.Popen[bytes]
    data_dir: Path
    log: Path

    @property
    def url(self) -> str:
        return f"https://{self.host.ip}:{CP_PORT}"

    def meshpy(self, *args: str) -> str:
        """Run a meshpy client command in the control plane's namespace (the only one
        besides the sidecars' that can reach it); returns its output."""
        argv = meshpy_cmd(*args, "--server", self.url)
        argv += ["--token-file", str(self.data_dir / "admin-token")]
        argv += ["--ca-bundle", str(self.data_dir / "bundle.pem")]
        done = self.host.run(argv, check=False)
        assert done.returncode == 0, f"meshpy {' '.join(args)}: {done.stderr}"
        return done.stdout

    def apply(self, workdir: Path, resources: list[dict[str, Any]]) -> str:
        path = workdir / f"resources-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump_all(resources, sort_keys=False))
        return self.meshpy("apply", "-f", str(path))


def resource(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


@dataclass
class CpMesh:
    cp: ControlPlane
    sidecars: dict[str, Sidecar]  # by host name
    workdir: Path


@pytest.fixture(scope="class")
def cp_mesh(network: Network, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CpMesh]:
    """The control plane on cp; frontend on h1 and payments on h2 and h3, joined over the
    bridge. payments takes calls from frontend only."""
    workdir = tmp_path_factory.mktemp("cp-mesh")
    cp_host = network["cp"]
    data_dir = workdir / "cpdata"
    log = workdir / "control-plane.log"
    argv = meshpy_cmd(
        "control-plane",
        *("--listen", f"{cp_host.ip}:{CP_PORT}", "--advertise", cp_host.ip),
        *("--data-dir", str(data_dir), "--trust-domain", DOMAIN),
        *("--lease-ttl", f"{LEASE_TTL:g}s", "--cert-ttl", "1h"),
    )
    with log.open("wb") as out:
        proc = cp_host.popen(argv, stdout=out, stderr=subprocess.STDOUT)
    cp = ControlPlane(cp_host, proc, data_dir, log)
    # The ready line comes once the certificate and the files clients need are written.
    wait_until(lambda: b"control plane ready" in log.read_bytes(), 15, "the control plane")

    cp.apply(
        workdir,
        [
            resource("Service", "frontend", {"lb": "round_robin"}),
            resource("Service", "payments", {"lb": "round_robin"}),
            resource(
                "AuthorizationPolicy",
                "payments",
                {
                    "service": "payments",
                    "rules": [{"name": "frontend", "action": "allow", "from": ["frontend"]}],
                },
            ),
        ],
    )
    tokens = {}
    for service in ("frontend", "payments"):  # a join token serves every sidecar of its service
        tokens[service] = path = workdir / f"{service}.token"
        cp.meshpy("token", "create", "--service", service, "-n", NAMESPACE, "-o", str(path))

    apps, sidecars = [], {}
    for name, service in (("h1", "frontend"), ("h2", "payments"), ("h3", "payments")):
        host = network[name]
        apps.append((host, start_app(host)))
        bootstrap = {
            "control_plane": {
                "url": cp.url,
                "ca_bundle": str(data_dir / "bundle.pem"),
                "token_file": str(tokens[service]),
            },
            "service": service,
            "namespace": NAMESPACE,
            "app": f"127.0.0.1:{APP_PORT}",
            "inbound": {
                "listen": f"0.0.0.0:{INBOUND_PORT}",
                "advertise": f"{host.ip}:{INBOUND_PORT}",
            },
            "outbound": {"listen": f"127.0.0.1:{OUTBOUND_PORT}"},
            "admin": {"listen": ADMIN},
            "state_dir": str(workdir / name / "state"),
        }
        sidecars[name] = launch_sidecar(host, bootstrap, workdir / name)
    for sidecar in sidecars.values():
        sidecar.wait_ready()
    # Each sidecar registers itself with its first report: wait until every one knows all.
    expected = {
        "frontend.shop": [f"{network['h1'].ip}:{INBOUND_PORT}"],
        "payments.shop": sorted(f"{network[h].ip}:{INBOUND_PORT}" for h in ("h2", "h3")),
    }
    for sidecar in sidecars.values():
        wait_until(
            lambda s=sidecar: all(s.endpoints(c) == e for c, e in expected.items()),
            10,
            f"{sidecar.host.name} to learn every endpoint",
        )
    yield CpMesh(cp, sidecars, workdir)
    for sidecar in sidecars.values():
        sidecar.host.terminate(sidecar.proc)
    for host, app in apps:
        host.terminate(app)
    cp_host.terminate(proc)


class TestControlPlane:
    """In order: each test leaves the mesh as the next expects it."""

    def test_call_crosses_hosts_over_mtls_with_caller_identity(
        self, network: Network, cp_mesh: CpMesh
    ) -> None:
        h1 = network["h1"]
        answers = [call(h1, "payments", f"/orders?id={i}") for i in range(8)]
        assert all((r.status, r.exit_code) == (200, 0) for r in answers), answers
        # Both payments instances serve: the control plane gave h1 both endpoints.
        assert {answered_by(r) for r in answers} == {"h2", "h3"}
        seen = answers[0].json()
        assert seen["path"] == "/orders?id=0"
        assert seen["peer"] == "127.0.0.1"
        # Identities issued by the control plane, checked by the payments sidecar.
        xfcc_by = f"By={spiffe_id('payments')};URI={spiffe_id('frontend')}"
        assert all(r.json()["headers"]["x-forwarded-client-cert"] == xfcc_by for r in answers)
        # The policy pushed to payments' sidecars: only frontend may call payments ...
        assert call(network["h2"], "payments").status == 403
        # ... while frontend, with no policy, takes calls from payments (and its namespace
        # qualified name works as well as the bare one).
        r = call(network["h3"], "frontend.shop")
        assert answered_by(r) == "h1", r
        assert r.json()["headers"]["x-forwarded-client-cert"] == (
            f"By={spiffe_id('frontend')};URI={spiffe_id('payments')}"
        )

    def test_route_change_reaches_every_sidecar_within_a_second(
        self, network: Network, cp_mesh: CpMesh
    ) -> None:
        # A canary of sorts: payments' /v2 goes to frontend's instances, so that an answer
        # from h1 is unmistakably the new route's.
        callers = [network[name] for name in ("h1", "h2", "h3")]
        for host in callers:
            assert answered_by(call(host, "payments", "/v2/pay")) != "h1"

        started = time.monotonic()
        cp_mesh.cp.apply(
            cp_mesh.workdir,
            [
                resource(
                    "Route",
                    "payments-v2",
                    {"host": "payments", "match": {"path_prefix": "/v2"}, "service": "frontend"},
                )
            ],
        )
        applied = time.monotonic()  # the control plane has acknowledged the change

        seen_at: dict[str, float] = {}

        def watch(host: Host) -> None:
            deadline = applied + 5
            while time.monotonic() < deadline:
                if answered_by(call(host, "payments", "/v2/pay", timeout=1)) == "h1":
                    seen_at[host.name] = time.monotonic()
                    return
                time.sleep(0.01)

        watchers = [threading.Thread(target=watch, args=(host,)) for host in callers]
        for thread in watchers:
            thread.start()
        for thread in watchers:
            thread.join()
        delays = {name: round(at - applied, 3) for name, at in sorted(seen_at.items())}
        print(f"route change: meshpy apply took {applied - started:.3f}s; seen after {delays}")
        assert set(delays) == {"h1", "h2", "h3"}, f"never seen on some hosts: {delays}"
        assert all(delay < PROPAGATION_LIMIT for delay in delays.values()), delays
        # Other paths keep their route.
        assert answered_by(call(network["h1"], "payments", "/v1/pay")) in ("h2", "h3")

    def test_killed_sidecar_leaves_the_others_within_seconds(
        self, network: Network, cp_mesh: CpMesh
    ) -> None:
        h1, h2, h3 = network["h1"], network["h2"], network["h3"]
        victim = cp_mesh.sidecars["h3"]
        os.kill(victim.proc.pid, signal.SIGKILL)  # no chance to deregister: the lease must expire
        killed = time.monotonic()
        h3.terminate(victim.proc)  # reaps it

        survivor = [f"{h2.ip}:{INBOUND_PORT}"]
        wait_until(
            lambda: cp_mesh.sidecars["h1"].endpoints("payments.shop") == survivor,
            REMOVAL_LIMIT,
            "h3's endpoint to leave h1's config",
        )
        removed = time.monotonic() - killed
        print(f"endpoint removal: gone from h1's config {removed:.3f}s after SIGKILL")
        assert removed < REMOVAL_LIMIT
        registered = yaml.safe_load(cp_mesh.cp.meshpy("get", "endpoints", "-o", "json"))
        payments = [e["address"] for e in registered if e["service"] == "payments"]
        assert payments == survivor
        answers = [call(h1, "payments") for _ in range(6)]
        assert [answered_by(r) for r in answers] == ["h2"] * 6, answers

    def test_traffic_does_not_need_the_control_plane(
        self, network: Network, cp_mesh: CpMesh
    ) -> None:
        h1 = network["h1"]
        cp_mesh.cp.proc.send_signal(signal.SIGKILL)
        network["cp"].terminate(cp_mesh.cp.proc)  # reaps it
        assert not network["cp"].listening(CP_PORT)

        failures, total = [], 0
        end = time.monotonic() + 3
        while time.monotonic() < end:
            r = call(h1, "payments", timeout=2)
            total += 1
            if answered_by(r) != "h2":
                failures.append(r)
        print(f"without the control plane: {total} requests h1 -> h2, {len(failures)} failed")
        assert total > 20
        assert failures == [], failures[:3]
