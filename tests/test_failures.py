"""Upstream failures map to the right status, never hang, and do not break other routes."""

from __future__ import annotations

import socket

import httpx
import pytest
from helpers import client, cluster, config, http_listener
from servers import (
    close_before_response_handler,
    garbage_handler,
    rst_before_response_handler,
    rst_mid_body_handler,
)


def dead_port() -> str:
    """A loopback port with nothing listening (connect gets ECONNREFUSED)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def failing_config(
    good: str, bad_cluster: dict, timeout: str | None = None, prefix: str = "/bad"
) -> dict:
    bad_route = {"name": "bad", "match": {"path_prefix": prefix}, "cluster": bad_cluster["name"]}
    if timeout:
        bad_route["timeout"] = timeout
    routes = [bad_route, {"name": "good", "match": {"path_prefix": "/"}, "cluster": "good"}]
    return config([http_listener(routes)], [bad_cluster, cluster("good", [good])])


def assert_other_route_still_served(proxy) -> None:
    with client(timeout=5) as c:
        r = c.get(proxy.url() + "/ok")
    assert r.status_code == 200
    assert r.json()["path"] == "/ok"


@pytest.mark.parametrize("n_endpoints", [1, 2])
def test_connection_refused_is_503_naming_cluster(run_proxy, upstream, n_endpoints):
    bad = cluster("refusing", [dead_port() for _ in range(n_endpoints)])
    proxy = run_proxy(failing_config(upstream.addr, bad))
    with client(timeout=10) as c:
        for _ in range(3):
            r = c.get(proxy.url() + "/bad")
            assert r.status_code == 503
            assert "refusing" in r.text
            assert "connect" in r.text.lower()
    assert_other_route_still_served(proxy)


@pytest.mark.parametrize(
    "handler",
    [close_before_response_handler, rst_before_response_handler, garbage_handler],
    ids=["close", "rst", "garbage"],
)
def test_broken_upstream_response_is_502_naming_cluster(run_proxy, upstream, tcp_server, handler):
    server = tcp_server(handler)
    proxy = run_proxy(failing_config(upstream.addr, cluster("broken", [server.addr])))
    with client(timeout=10) as c:
        for _ in range(2):
            r = c.get(proxy.url() + "/bad")
            assert r.status_code == 502
            assert "broken" in r.text
    assert server.accepted >= 1
    assert_other_route_still_served(proxy)


def test_upstream_reset_mid_body_is_not_a_complete_response(run_proxy, upstream, tcp_server):
    server = tcp_server(rst_mid_body_handler)
    proxy = run_proxy(failing_config(upstream.addr, cluster("midbody", [server.addr])))
    with client(timeout=10) as c:
        # the status line is already out, so the proxy must abort the downstream message
        # rather than end it cleanly (a clean end would pass truncated data off as complete)
        with pytest.raises(httpx.TransportError):
            r = c.get(proxy.url() + "/bad")
            r.read()
            raise AssertionError(f"complete response with {len(r.content)} bytes")
    assert_other_route_still_served(proxy)


def test_route_timeout_is_504(run_proxy, upstream):
    slowpoke = cluster("slowpoke", [upstream.addr])
    proxy = run_proxy(failing_config(upstream.addr, slowpoke, timeout="500ms", prefix="/delay"))
    with client(timeout=10) as c:
        # the upstream would answer 200 after 3 s; the route allows 500 ms
        r = c.get(proxy.url() + "/delay?ms=3000")
        assert r.status_code == 504
        assert "slowpoke" in r.text or "timeout" in r.text.lower() or "timed out" in r.text
        r = c.get(proxy.url() + "/delay?ms=10")
        assert r.status_code == 200
    assert_other_route_still_served(proxy)


def test_connect_timeout_is_503(run_proxy, upstream):
    # A listener with a full accept queue: Linux drops further SYNs, so connect() hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    addr = listener.getsockname()
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.settimeout(0.3)
            try:
                s.connect(addr)
                fillers.append(s)
            except TimeoutError:
                s.close()
                break
        else:
            pytest.skip("kernel accepts connections past the backlog; cannot hang a connect")
        bad = cluster("blackhole", [f"{addr[0]}:{addr[1]}"], connect_timeout="300ms")
        proxy = run_proxy(failing_config(upstream.addr, bad, timeout="5s"))
        with client(timeout=10) as c:
            r = c.get(proxy.url() + "/bad")
        # the route timeout (5 s) would give 504; the connect timeout must fire first
        assert r.status_code == 503
        assert "blackhole" in r.text
        assert_other_route_still_served(proxy)
    finally:
        for s in fillers:
            s.close()
        listener.close()
