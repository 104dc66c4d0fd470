"""The mesh across hosts: sidecars in separate network namespaces on a private bridge.

Today's file-based config, no control plane: every sidecar issues its own identity from one
shared CA directory. h1's app calls h2's app through h1's outbound sidecar and h2's strict
mTLS inbound sidecar; h3 is a bystander on the same network. ``cp`` is kept for a control
plane scenario.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import meshpy_cmd
from netns import Host, Network, requires_root_netns

pytestmark = requires_root_netns

DOMAIN = "mesh.test"
ADMIN = "127.0.0.1:9901"  # the same address on every host: each namespace has its own loopback
APP_PORT = 8080
INBOUND_PORT = 15006
OUTBOUND_PORT = 15001

# A stand-in app: answers every GET with JSON of the path, the peer and the headers it got.
ECHO_APP = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = json.dumps({
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
    return f"spiffe://{DOMAIN}/ns/shop/sa/{service}"


@dataclass
class Sidecar:
    host: Host
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def start_sidecar(host: Host, config: dict, workdir: Path) -> Sidecar:
    """Write and validate ``config``, run ``meshpy proxy`` in ``host``, wait for /ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    subprocess.run(meshpy_cmd("validate", str(path)), check=True, capture_output=True)
    log = workdir / "proxy.log"
    with log.open("wb") as out:
        argv = meshpy_cmd("proxy", "-c", str(path), "--drain-timeout", "1s")
        proc = host.popen(argv, stdout=out, stderr=subprocess.STDOUT)
    sidecar = Sidecar(host, proc, log)
    try:
        host.wait_for_http(f"http://{ADMIN}/ready", timeout=15)
    except AssertionError as exc:
        tail = sidecar.log_tail()
        raise AssertionError(f"{exc}\n--- {host.name} proxy log ---\n{tail}") from None
    return sidecar


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    with Network(["cp", "h1", "h2", "h3"]) as net:
        yield net


@pytest.fixture(scope="module")
def mesh_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ca = tmp_path_factory.mktemp("netns") / "ca"
    argv = meshpy_cmd("ca", "init", "--trust-domain", DOMAIN, str(ca))
    subprocess.run(argv, check=True, capture_output=True)
    return ca


@pytest.fixture(scope="module")
def file_mesh(
    network: Network, mesh_ca: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Sidecar]]:
    """frontend's sidecar on h1 -> mTLS -> payments' sidecar on h2 -> the app on h2."""
    h1, h2 = network["h1"], network["h2"]
    workdir = tmp_path_factory.mktemp("file-mesh")

    app = h2.popen([sys.executable, "-c", ECHO_APP, "127.0.0.1", str(APP_PORT)])
    h2.wait_for_port(APP_PORT, "127.0.0.1")

    payments = {
        "admin": {"listen": ADMIN},
        "identity": {"ca": str(mesh_ca), "service": "payments", "namespace": "shop"},
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
        "identity": {"ca": str(mesh_ca), "service": "frontend", "namespace": "shop"},
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
    sidecars = {
        "payments": start_sidecar(h2, payments, workdir / "payments"),
        "frontend": start_sidecar(h1, frontend, workdir / "frontend"),
    }
    yield sidecars
    # Stopped here rather than with the network, so later scenarios get the ports back.
    for sidecar in sidecars.values():
        sidecar.host.terminate(sidecar.proc)
    h2.terminate(app)


def test_call_crosses_hosts_over_mtls_with_caller_identity(
    network: Network, file_mesh: dict[str, Sidecar]
) -> None:
    forged = f"By=x;URI={spiffe_id('admin')}"
    r = network["h1"].curl(
        f"http://127.0.0.1:{OUTBOUND_PORT}/orders?id=7",
        *("-H", "Host: payments", "-H", f"x-forwarded-client-cert: {forged}"),
    )
    assert (r.status, r.exit_code) == (200, 0), (r, file_mesh["frontend"].log_tail())
    seen = r.json()
    assert seen["path"] == "/orders?id=7"
    assert seen["peer"] == "127.0.0.1"  # h2's sidecar, not h1, talks to the app
    # Written by h2's sidecar from h1's certificate; the client's forged one is gone.
    xfcc = f"By={spiffe_id('payments')};URI={spiffe_id('frontend')}"
    assert seen["headers"]["x-forwarded-client-cert"] == xfcc


def test_strict_inbound_refuses_plaintext_from_another_host(
    network: Network, file_mesh: dict[str, Sidecar]
) -> None:
    url = f"http://{network['h2'].ip}:{INBOUND_PORT}/"
    # --http0.9 lets curl hand back whatever non-HTTP bytes come before the close.
    r = network["h3"].curl(url, "-H", "Host: payments", "--http0.9")
    assert r.exit_code != 7, r  # h3 reaches h2: the TCP connection is accepted ...
    # ... then closed with no HTTP answer: nothing, or a TLS alert record (rustls sends a
    # fatal decode_error alert, 15 03 03 00 02 02 32, for the plaintext it cannot parse).
    assert r.status == 0, r
    assert r.body == "" or r.body.startswith("\x15\x03"), r


def test_loopback_listeners_stay_on_their_host(
    network: Network, file_mesh: dict[str, Sidecar]
) -> None:
    h1, h2, h3 = network["h1"], network["h2"], network["h3"]
    # h3's 127.0.0.1 is its own: nothing listens there.
    assert h3.curl(f"http://127.0.0.1:{OUTBOUND_PORT}/", "-H", "Host: payments").exit_code == 7
    # Bound to 127.0.0.1, h1's outbound listener and h2's app refuse the network.
    assert h3.curl(f"http://{h1.ip}:{OUTBOUND_PORT}/", "-H", "Host: payments").exit_code == 7
    assert h3.curl(f"http://{h2.ip}:{APP_PORT}/").exit_code == 7
    assert h1.curl(f"http://{h2.ip}:{APP_PORT}/").exit_code == 7
