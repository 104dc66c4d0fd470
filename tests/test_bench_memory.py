"""Smoke tests of ``bench.memory``'s helpers and of one tiny real idle-connection run.

Only that the figures are computed and sensible in kind; never how big they are, since the
machine is shared and noisy and the bench itself is not a test.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import memory, mesh, peers  # noqa: E402


def test_slope_of_a_line_and_of_constant_xs() -> None:
    xs = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert memory.least_squares_slope(xs, [5 + 3 * x for x in xs]) == pytest.approx(3.0)
    assert memory.least_squares_slope([2.0, 2.0], [1.0, 9.0]) == 0.0


def test_soak_verdict_flat_with_noise_and_growing_with_a_leak() -> None:
    seconds = [5.0 * i for i in range(121)]  # 10 minutes every 5 s
    noisy = [(t, 40_000 + (64 if i % 2 else -64)) for i, t in enumerate(seconds)]
    flat = memory.soak_summary(noisy)
    assert flat["verdict"] == "flat"
    assert flat["window_s"] == 60.0
    leaking = [(t, 40_000 + int(t)) for t in seconds]  # +60 KB per minute
    growing = memory.soak_summary(leaking)
    assert growing["verdict"] == "growing"
    assert growing["slope_kb_per_min"] == pytest.approx(60.0)
    assert growing["growth_first_to_last_window_kb"] == 540  # means of the two minutes: 570-30


def test_read_response_reads_head_and_body_split_across_sends() -> None:
    server, client = socket.socketpair()
    with server, client:
        server.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n")
        server.sendall(b"\r\nhel")
        server.sendall(b"lo")
        assert memory.read_response(client) == 200


def test_tree_rss_counts_the_children() -> None:
    code = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        alone = psutil.Process(parent.pid).memory_info().rss // 1024
        assert memory.tree_rss_kb(parent.pid) > alone
    finally:
        for child in psutil.Process(parent.pid).children(recursive=True):
            child.kill()
        parent.kill()
        parent.wait()


def test_python_baseline_rss_is_read() -> None:
    assert memory.python_rss_kb("pass") > 0


@contextlib.contextmanager
def started(service: peers.Service) -> Iterator[peers.Service]:
    try:
        service.start()
        yield service
    finally:
        service.stop()


@pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx as the upstream")
@pytest.mark.skipif(importlib.util.find_spec("meshpy._core") is None, reason="needs meshpy")
def test_idle_connections_through_a_real_meshpy_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "SETTLE_SECONDS", 0.3)
    upstream = peers.upstream_nginx(tmp_path / "upstream")
    with started(upstream):
        proxy = peers.meshpy_proxy(tmp_path / "meshpy", upstream.port, 1, None)
        with started(proxy):
            assert proxy.proc is not None
            figures = memory.measure_idle_connections(proxy.proc.pid, proxy.port, 50)
    assert figures["connections"] == 50
    assert figures["rss_kb_before"] > 0
    assert figures["kb_per_connection"] > 0


needs_meshpy = pytest.mark.skipif(
    importlib.util.find_spec("meshpy._core") is None, reason="needs meshpy (and its CA)"
)


needs_both_peers = pytest.mark.skipif(
    shutil.which("nginx") is None or shutil.which("haproxy") is None,
    reason="needs nginx (the upstream, and a peer) and HAProxy",
)


@needs_meshpy
@needs_both_peers
@pytest.mark.parametrize("name", memory.SYSTEMS)
def test_each_proxys_mutual_tls_listener_requires_a_client_certificate(
    tmp_path: Path, name: str
) -> None:
    """The peers' mTLS configs do what a sidecar's ``mtls: strict`` does, so their idle TLS
    connections are the same kind: a client with a certificate of the mesh CA is served, one
    without any is not."""
    args = memory.parse_args(["--mtls-connections", "2"])
    creds = mesh.issue_certificates(tmp_path / "pki")
    upstream = peers.upstream_nginx(tmp_path / "upstream")
    with started(upstream):
        service = memory.proxy_service(name, tmp_path, upstream.port, args, creds["b"])
        with started(service):
            with_certificate = memory.client_tls(creds["a"], creds["b"].bundle)
            memory.close_all(memory.open_idle_connections(service.port, 2, with_certificate))
            without = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            without.check_hostname = False
            without.load_verify_locations(str(creds["b"].bundle))
            with pytest.raises(peers.PeerError):
                memory.open_idle_connections(service.port, 1, without)


@needs_meshpy
@pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx as the upstream")
def test_idle_mutual_tls_connections_through_a_real_meshpy_sidecar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "SETTLE_SECONDS", 0.3)
    args = memory.parse_args(["--systems", "meshpy", "--mtls-connections", "30"])
    upstream = peers.upstream_nginx(tmp_path / "upstream")
    with started(upstream):
        creds = mesh.issue_certificates(tmp_path / "pki")
        figures = memory.measure_mtls_connections("meshpy", args, tmp_path, upstream, creds)
    assert figures["connections"] == 30
    assert figures["rss_kb_held"] > 0
    assert figures["kb_per_connection"] is not None


@needs_meshpy
@needs_both_peers
@pytest.mark.parametrize("name", memory.SYSTEMS)
def test_each_proxy_serves_the_idle_http2_connections_of_the_memory_bench(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Each proxy answers the phase's h2c GETs with 200 (a refusal raises) and its RSS grows
    while they stay open: the phase measures idle HTTP/2 connections, not refused ones."""
    monkeypatch.setattr(memory, "SETTLE_SECONDS", 0.3)
    args = memory.parse_args(["--systems", name, "--h2-connections", "200"])
    upstream = peers.upstream_nginx(tmp_path / "upstream")
    with started(upstream):
        figures = memory.measure_h2_connections(name, args, tmp_path, upstream)
    assert figures["connections"] == 200
    assert figures["kb_per_connection"] > 0
