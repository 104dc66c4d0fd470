"""The bench's proxies do the same work per request: each adds the forwarding headers
meshpy adds by default, so the comparison is between proxies doing one job."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from bench import peers

# What meshpy adds to every request it forwards by default.
FORWARDING_HEADERS = ("x-forwarded-for", "forwarded", "x-forwarded-proto", "x-request-id")

PROXIES: dict[str, Callable[[Path, int, int, str | None], peers.Service]] = {
    "meshpy": peers.meshpy_proxy,
    "nginx": peers.nginx_proxy,
    "haproxy": peers.haproxy_proxy,
}


@contextlib.contextmanager
def recording_upstream() -> Iterator[tuple[int, list[dict[str, str]]]]:
    """An HTTP/1.1 origin that answers 200 and keeps every request's headers."""
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append({name.lower(): value for name, value in self.headers.items()})
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((peers.HOST, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("name", PROXIES)
def test_every_proxy_adds_the_forwarding_headers_meshpy_adds(name: str, tmp_path: Path) -> None:
    if name == "meshpy" and importlib.util.find_spec("meshpy._core") is None:
        pytest.skip("meshpy is not importable")
    if name != "meshpy" and shutil.which(name) is None:
        pytest.skip(f"{name} is not installed")
    with recording_upstream() as (upstream_port, seen):
        service = PROXIES[name](tmp_path / name, upstream_port, 1, None)
        try:
            service.start()
            url = f"http://{peers.HOST}:{service.port}/"
            with httpx.Client() as client:
                assert client.get(url).status_code == 200
                assert client.get(url).status_code == 200
                kept = client.get(url, headers={"x-request-id": "from-the-client"})
                assert kept.status_code == 200
        finally:
            service.stop()
    first, second, third = seen
    for headers in (first, second, third):
        missing = [h for h in FORWARDING_HEADERS if h not in headers]
        assert not missing, f"{name} did not add {missing}: {headers}"
        assert headers["x-forwarded-for"] == peers.HOST
        assert headers["forwarded"] == f"for={peers.HOST};proto=http"
        assert headers["x-forwarded-proto"] == "http"
    # A fresh id per request, and the client's own kept.
    assert first["x-request-id"] and first["x-request-id"] != second["x-request-id"]
    assert third["x-request-id"] == "from-the-client"


def test_nginx_gets_a_second_listener_for_h2c(tmp_path: Path) -> None:
    service = peers.upstream_nginx(tmp_path / "upstream")
    h2_port = peers.add_h2c_listener(service)
    text = (service.workdir / "nginx.conf").read_text()
    assert f"listen {peers.HOST}:{service.port} backlog=4096;" in text
    assert f"listen {peers.HOST}:{h2_port} http2 backlog=4096;" in text


def test_meshpy_cluster_is_forced_to_http1(tmp_path: Path) -> None:
    service = peers.meshpy_proxy(tmp_path / "meshpy", 8080, 1, None)
    peers.force_http1_upstream(service)
    config = yaml.safe_load((service.workdir / "sidecar.yaml").read_text())
    assert config["clusters"][0]["protocol"] == "http1"
