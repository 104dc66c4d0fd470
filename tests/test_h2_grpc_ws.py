"""HTTP/2 (h2c prior knowledge and TLS+ALPN), gRPC and WebSocket through the proxy."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import ssl
import subprocess
import time

import grpc
import httpx
import pytest
from helpers import client, cluster, config, http_listener, simple_config
from servers import GRPC_SERVICE
from websockets.sync.client import connect as ws_connect

GRPC_OPTIONS = [("grpc.enable_http_proxy", 0)]


def test_h2c_prior_knowledge(run_proxy, upstream):
    proxy = run_proxy(simple_config([upstream.addr]))
    with client(http1=False, http2=True) as c:
        r = c.post(proxy.url() + "/h2c?q=1", content=b"h2 body", headers={"x-h2": "yes"})
    assert r.http_version == "HTTP/2"
    assert r.status_code == 200
    echo = r.json()
    assert echo["path"] == "/h2c"
    assert echo["query"] == "q=1"
    assert echo["body"] == "h2 body"
    assert ["x-h2", "yes"] in echo["headers"]
    assert r.headers.get_list("set-cookie") == ["a=1", "b=2"]


def answer_without_date(conn: socket.socket) -> None:
    """An HTTP/1.1 upstream whose answers carry no Date header."""
    conn.settimeout(5)
    pending = b""
    while True:
        while b"\r\n\r\n" not in pending:
            data = conn.recv(65536)
            if not data:
                return
            pending += data
        pending = pending.split(b"\r\n\r\n", 1)[1]
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


def test_h2_responses_are_dated_like_http1_ones(run_proxy, tcp_server):
    """RFC 9110 §6.6.1 over HTTP/2 too: a relayed response that came without a Date and the
    proxy's own 404 both get the current one."""
    backend = tcp_server(answer_without_date)
    route = {"name": "dated", "match": {"path_prefix": "/dated"}, "cluster": "backend"}
    backend_cluster = cluster("backend", [backend.addr], protocol="http1")
    proxy = run_proxy(config([http_listener([route])], [backend_cluster]))
    with client(http1=False, http2=True) as c:
        relayed, own = c.get(proxy.url() + "/dated"), c.get(proxy.url() + "/nowhere")
    assert (relayed.http_version, relayed.status_code, relayed.text) == ("HTTP/2", 200, "ok")
    assert own.status_code == 404
    for response in (relayed, own):
        sent = email.utils.parsedate_to_datetime(response.headers["date"]).timestamp()
        assert time.time() - 10 < sent <= time.time()


def test_h2c_concurrent_streams_on_one_connection(run_proxy, upstream):
    proxy = run_proxy(simple_config([upstream.addr]))

    async def main():
        async with httpx.AsyncClient(http1=False, http2=True, trust_env=False, timeout=10) as c:
            return await asyncio.gather(
                *(c.get(proxy.url() + f"/delay?ms=300&i={i}") for i in range(20))
            )

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 20
    assert {r.http_version for r in responses} == {"HTTP/2"}
    assert sorted(r.json()["query"] for r in responses) == sorted(
        f"ms=300&i={i}" for i in range(20)
    )


def tls_config(upstream, tls_cert) -> dict:
    cert, key = tls_cert
    # the upstream leg is pinned to HTTP/1.1 so these tests are about the TLS listener only
    return simple_config(
        [upstream.addr],
        listener_extra={"tls": {"cert": str(cert), "key": str(key)}},
        cluster_extra={"protocol": "http1"},
    )


def test_tls_alpn_negotiates_h2_and_http11(run_proxy, upstream, tls_cert):
    proxy = run_proxy(tls_config(upstream, tls_cert))
    ctx = ssl.create_default_context(cafile=str(tls_cert[0]))
    url = proxy.url(scheme="https") + "/tls"
    with client(verify=ctx, http2=True) as c:
        r = c.get(url)
        assert r.status_code == 200
        assert r.http_version == "HTTP/2"
        assert r.json()["path"] == "/tls"
    with client(verify=ctx) as c:  # offers http/1.1 only
        r = c.post(url, content=b"over tls")
        assert r.status_code == 200
        assert r.http_version == "HTTP/1.1"
        assert r.json()["body"] == "over tls"


def test_tls_h2_with_curl(run_proxy, upstream, tls_cert):
    proxy = run_proxy(tls_config(upstream, tls_cert))
    host, port = proxy.addr()
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--http2",
            "--cacert",
            str(tls_cert[0]),
            "--resolve",
            f"localhost:{port}:{host}",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            "--max-time",
            "10",
            f"https://localhost:{port}/curl",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "200 2"


def https_get_session(
    addr: tuple[str, int], ctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[bytes, ssl.SSLSession, bool]:
    """One GET over a new TLS connection offering ``session`` for resumption; returns the
    response, the session to offer next (TLS 1.3 tickets arrive with the response) and
    whether the server resumed the offered one."""
    with (
        socket.create_connection(addr, timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        tls.sendall(b"GET /resume HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
        return response, tls.session, tls.session_reused


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
@pytest.mark.parametrize("resumption", [True, False])
def test_tls_session_resumption_follows_config(run_proxy, upstream, tls_cert, version, resumption):
    config = tls_config(upstream, tls_cert)
    config["listeners"][0]["tls"]["session_resumption"] = resumption
    proxy = run_proxy(config)
    ctx = ssl.create_default_context(cafile=str(tls_cert[0]))
    ctx.minimum_version = ctx.maximum_version = version
    first, session, reused = https_get_session(proxy.addr(), ctx, None)
    assert first.startswith(b"HTTP/1.1 200") and not reused
    second, _, reused = https_get_session(proxy.addr(), ctx, session)
    assert second.startswith(b"HTTP/1.1 200")
    assert reused is resumption


def test_tls_listener_rejects_plaintext_without_hanging(run_proxy, upstream, tls_cert):
    proxy = run_proxy(tls_config(upstream, tls_cert))
    with client(timeout=5) as c, pytest.raises(httpx.TransportError):
        c.get(proxy.url() + "/plain")


@pytest.mark.parametrize(
    ("protocol", "downstream_h2", "expected"),
    [("http2", False, "2"), ("http1", True, "1.1")],
)
def test_cluster_protocol_selects_upstream_http_version(
    run_proxy, upstream, protocol, downstream_h2, expected
):
    proxy = run_proxy(simple_config([upstream.addr], cluster_extra={"protocol": protocol}))
    with client(http1=not downstream_h2, http2=downstream_h2) as c:
        r = c.get(proxy.url() + "/proto")
    assert r.status_code == 200
    assert r.json()["http_version"] == expected


# ---------------------------------------------------------------------------- gRPC


def grpc_proxy(run_proxy, grpc_upstream, protocol="http2"):
    proxy = run_proxy(simple_config([grpc_upstream.addr], cluster_extra={"protocol": protocol}))
    host, port = proxy.addr()
    return proxy, grpc.insecure_channel(f"{host}:{port}", options=GRPC_OPTIONS)


@pytest.mark.parametrize("protocol", ["http2", "auto"])
def test_grpc_unary_with_metadata_and_trailers(run_proxy, grpc_upstream, protocol):
    _, channel = grpc_proxy(run_proxy, grpc_upstream, protocol)
    with channel:
        unary = channel.unary_unary(f"/{GRPC_SERVICE}/Unary")
        resp, call = unary.with_call(b"ping", metadata=(("x-client", "c1"),), timeout=10)
        assert resp == b"echo:ping"
        assert call.code() == grpc.StatusCode.OK
        assert ("x-initial", "i1") in call.initial_metadata()
        trailers = dict(call.trailing_metadata())
        assert trailers["x-trailer"] == "t1"
        assert trailers["x-client-echo"] == "c1"


def test_grpc_server_streaming(run_proxy, grpc_upstream):
    _, channel = grpc_proxy(run_proxy, grpc_upstream)
    with channel:
        stream = channel.unary_stream(f"/{GRPC_SERVICE}/ServerStream")
        call = stream(b"200", timeout=10)
        items = list(call)
        assert len(items) == 200
        assert [i.split(b".")[0] for i in items] == [f"item-{n}".encode() for n in range(200)]
        assert dict(call.trailing_metadata())["x-count"] == "200"
        assert call.code() == grpc.StatusCode.OK


def test_grpc_bidi_streaming(run_proxy, grpc_upstream):
    _, channel = grpc_proxy(run_proxy, grpc_upstream)
    with channel:
        bidi = channel.stream_stream(f"/{GRPC_SERVICE}/Bidi")
        out = list(bidi(iter([b"a", b"bc", b"def"] * 10), timeout=10))
        assert out == [b"A", b"BC", b"DEF"] * 10


def test_grpc_error_status_details_and_trailers(run_proxy, grpc_upstream):
    _, channel = grpc_proxy(run_proxy, grpc_upstream)
    with channel:
        fail = channel.unary_unary(f"/{GRPC_SERVICE}/Fail")
        with pytest.raises(grpc.RpcError) as info:
            fail(b"42", timeout=10)
        err = info.value
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert err.details() == "widget 42 not found"
        assert dict(err.trailing_metadata())["x-why"] == "missing"
        # the channel (and the proxy's h2 connection) stays usable after an error status
        unary = channel.unary_unary(f"/{GRPC_SERVICE}/Unary")
        assert unary(b"again", timeout=10) == b"echo:again"


# ---------------------------------------------------------------------------- WebSocket


def test_websocket_echo_both_ways(run_proxy, upstream):
    proxy = run_proxy(simple_config([upstream.addr]))
    host, port = proxy.addr()
    with ws_connect(f"ws://{host}:{port}/ws", proxy=None, open_timeout=10) as ws:
        assert ws.recv(timeout=10) == "hello from a"  # server -> client push
        for i in range(5):
            ws.send(f"text message {i}")
            assert ws.recv(timeout=10) == f"text message {i}"
        payload = bytes(range(256)) * 400
        ws.send(payload)
        assert ws.recv(timeout=10) == payload
    # the proxy still serves plain HTTP afterwards
    with client() as c:
        assert c.get(proxy.url() + "/after-ws").status_code == 200
