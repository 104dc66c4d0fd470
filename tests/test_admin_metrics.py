"""Admin endpoints: /ready, /live, /config, /metrics (names, labels, values move with traffic)."""

from __future__ import annotations

import socket

from helpers import client, cluster, config, connect, eventually, http_listener, read_response


def two_route_config(good: str, dead: str) -> dict:
    routes = [
        {"name": "broken", "match": {"path_prefix": "/broken"}, "cluster": "dead"},
        {"name": "api", "match": {"path_prefix": "/"}, "cluster": "backend"},
    ]
    return config([http_listener(routes)], [cluster("backend", [good]), cluster("dead", [dead])])


def dead_addr() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_ready_and_live(run_proxy, upstream):
    proxy = run_proxy(two_route_config(upstream.addr, dead_addr()))
    assert proxy.admin_get("/ready").status_code == 200
    assert proxy.admin_get("/live").status_code == 200
    assert proxy.admin_get("/no-such-admin-path").status_code == 404


def test_config_endpoint_shows_normalized_config_and_version(run_proxy, upstream):
    proxy = run_proxy(two_route_config(upstream.addr, dead_addr()))
    r = proxy.admin_get("/config")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    version = body["version"]
    assert isinstance(version, int)
    cfg = body["config"]
    assert [lst["name"] for lst in cfg["listeners"]] == ["edge"]
    assert [rt["name"] for rt in cfg["listeners"][0]["routes"]] == ["broken", "api"]
    assert {c["name"] for c in cfg["clusters"]} == {"backend", "dead"}
    backend = next(c for c in cfg["clusters"] if c["name"] == "backend")
    assert backend["endpoints"] == [upstream.addr]
    assert backend["lb"] == "p2c_ewma"  # defaults are filled in (normalized)

    new = two_route_config(upstream.addr, dead_addr())
    new["clusters"][0]["lb"] = "round_robin"
    assert proxy.reload(new) == version + 1
    body = proxy.admin_get("/config").json()
    assert body["version"] == version + 1
    backend = next(c for c in body["config"]["clusters"] if c["name"] == "backend")
    assert backend["lb"] == "round_robin"
    assert proxy.metrics().get("config_version") == version + 1


def test_request_and_response_metrics_count_exactly(run_proxy, upstream):
    proxy = run_proxy(two_route_config(upstream.addr, dead_addr()))
    labels = {"listener": "edge", "route": "api", "cluster": "backend"}
    with client() as c:
        for i in range(7):
            assert c.get(proxy.url() + f"/m/{i}").status_code == 200
        for _ in range(3):
            assert c.get(proxy.url() + "/status?code=500").status_code == 500
        for _ in range(2):
            assert c.get(proxy.url() + "/broken").status_code == 503

    def counted():
        m = proxy.metrics()
        assert m.get("request_total", **labels) == 10
        assert m.get("response_total", status_code="200", classification="success", **labels) == 7
        assert m.get("response_total", status_code="500", classification="failure", **labels) == 3
        assert m.get("response_latency_ms_count", **labels) == 10
        assert m.get("response_latency_ms_bucket", le="+Inf", **labels) == 10
        broken = {"listener": "edge", "route": "broken", "cluster": "dead"}
        assert m.get("request_total", **broken) == 2
        assert m.get("response_total", status_code="503", classification="failure", **broken) == 2
        return m

    m = eventually(counted)
    assert m.get("response_latency_ms_sum", **labels) > 0
    buckets = sorted(
        (float(lbls["le"]), v)
        for lbls, v in m.series("response_latency_ms_bucket")
        if all(lbls.get(k) == v2 for k, v2 in labels.items())
    )
    assert len(buckets) >= 5
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "histogram buckets must be cumulative"

    assert m.get("upstream_connect_total", cluster="backend") >= 1
    assert m.get("upstream_connections_open", cluster="backend") >= 1
    assert m.get("upstream_connect_errors_total", cluster="dead") >= 2
    assert m.get("upstream_connect_errors_total", cluster="backend") == 0


def test_all_documented_metric_names_are_exported(run_proxy, upstream):
    proxy = run_proxy(two_route_config(upstream.addr, dead_addr()))
    with client() as c:
        c.get(proxy.url() + "/x")
        c.get(proxy.url() + "/broken")
    proxy.reload(two_route_config(upstream.addr, dead_addr()))
    names = proxy.metrics().names()
    expected = {
        "request_total",
        "response_total",
        "response_latency_ms_bucket",
        "response_latency_ms_sum",
        "response_latency_ms_count",
        "upstream_connections_open",
        "upstream_connect_total",
        "upstream_connect_errors_total",
        "tcp_open_total",
        "tcp_close_total",
        "tcp_open_connections",
        "tcp_read_bytes_total",
        "tcp_write_bytes_total",
        "config_version",
        "config_reload_total",
    }
    assert expected - names == set()


def test_http_listener_tcp_byte_metrics_are_exact(run_proxy, upstream):
    proxy = run_proxy(two_route_config(upstream.addr, dead_addr()))
    before = proxy.metrics()
    request = b"GET /bytes?n=12345 HTTP/1.1\r\nHost: metrics.test\r\nConnection: close\r\n\r\n"
    with connect(proxy.addr()) as sock:
        sock.sendall(request)
        raw = b""
        while data := sock.recv(65536):
            raw += data
    head, _, _ = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")

    def delta(m, name):
        return m.get(name, listener="edge") - before.get(name, listener="edge")

    def settled():
        m = proxy.metrics()
        assert delta(m, "tcp_open_total") == 1
        assert delta(m, "tcp_close_total") == 1
        assert delta(m, "tcp_read_bytes_total") == len(request)
        assert delta(m, "tcp_write_bytes_total") == len(raw)
        assert m.get("tcp_open_connections", listener="edge") == 0

    eventually(settled)


def test_open_connections_gauge_tracks_live_connections(run_proxy, upstream):
    proxy = run_proxy(two_route_config(upstream.addr, dead_addr()))
    socks = []
    for _ in range(3):
        s = connect(proxy.addr())
        s.sendall(b"GET /g HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s).status == 200
        socks.append(s)

    def gauge(n):
        def check():
            m = proxy.metrics()
            assert m.get("tcp_open_connections", listener="edge") == n

        return check

    eventually(gauge(3))
    for s in socks:
        s.close()
    eventually(gauge(0))
