"""Malformed and hostile downstream input on raw sockets."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from helpers import client, connect, read_response, read_until_close, simple_config

LIMITS = {
    "max_header_bytes": "8KiB",
    "max_headers": 20,
    "max_body_bytes": "1KiB",
    "header_read_timeout": "1s",
}


@pytest.fixture
def proxy(run_proxy, upstream):
    return run_proxy(simple_config([upstream.addr], listener_extra={"limits": LIMITS}))


def exchange(proxy, data: bytes) -> tuple[int, bytes]:
    """Send ``data`` on a new connection; return the first response's status and what
    followed it until the proxy closed the connection."""
    with connect(proxy.addr()) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy may answer and close before reading everything
        resp = read_response(sock)
        rest = resp.rest + read_until_close(sock, timeout=5)
        return resp.status, rest


def assert_still_serving(proxy) -> None:
    with client(timeout=5) as c:
        r = c.get(proxy.url() + "/healthy")
    assert r.status_code == 200
    assert r.json()["path"] == "/healthy"


@pytest.mark.parametrize(
    "request_line",
    [b"THIS IS NOT HTTP", b"GET /a b c HTTP/1.1", b"GET / HTTP/9.9x", b"\x16\x03\x01\x02\x00"],
    ids=["words", "spaces", "bad-version", "tls-hello"],
)
def test_malformed_request_line_is_400(proxy, request_line):
    status, _ = exchange(proxy, request_line + b"\r\nHost: x\r\n\r\n")
    assert status == 400
    assert_still_serving(proxy)


def test_headers_over_max_header_bytes_is_431(proxy):
    ok = (
        b"GET /fits HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + b"\r\nConnection: close\r\n\r\n"
    )
    status, _ = exchange(proxy, ok)
    assert status == 200
    big = b"GET /big HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 16000 + b"\r\n\r\n"
    status, _ = exchange(proxy, big)
    assert status == 431
    assert_still_serving(proxy)


def test_too_many_headers_is_431(proxy):
    def request(n: int) -> bytes:
        lines = b"".join(b"X-H%d: v\r\n" % i for i in range(n))
        return b"GET /many HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + lines + b"\r\n"

    assert exchange(proxy, request(10))[0] == 200
    assert exchange(proxy, request(60))[0] == 431
    assert_still_serving(proxy)


def test_body_over_max_body_bytes_is_413_content_length(proxy):
    head = b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
    assert exchange(proxy, head % 1000 + b"b" * 1000)[0] == 200
    assert exchange(proxy, head % 5000 + b"b" * 5000)[0] == 413
    assert_still_serving(proxy)


def test_body_over_max_body_bytes_is_413_chunked(proxy):
    head = (
        b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    )

    def chunked(total: int) -> bytes:
        out = b""
        for _ in range(total // 500):
            out += b"1f4\r\n" + b"c" * 500 + b"\r\n"
        return out + b"0\r\n\r\n"

    assert exchange(proxy, head + chunked(1000))[0] == 200
    assert exchange(proxy, head + chunked(5000))[0] == 413
    assert_still_serving(proxy)


def test_slowloris_is_cut_off_while_others_are_served(proxy):
    slow = connect(proxy.addr())
    slow.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
    stop = threading.Event()

    def trickle() -> None:
        try:
            while not stop.wait(0.25):
                slow.sendall(b"X")
        except OSError:
            pass

    started = time.monotonic()
    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        # another client is served normally while the slow one dribbles its headers
        for _ in range(3):
            assert_still_serving(proxy)
        # header_read_timeout is 1 s: the proxy must give up on the slow client (408 or close)
        leftover = read_until_close(slow, timeout=8)
        assert leftover == b"" or leftover.startswith(b"HTTP/1.1 408"), leftover[:100]
        assert time.monotonic() - started < 8
    finally:
        stop.set()
        t.join(2)
        slow.close()
    assert_still_serving(proxy)


def smuggling_request(tag: str, te_first: bool) -> bytes:
    smuggled = f"GET /smuggled-{tag} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    body = b"0\r\n\r\n" + smuggled
    framing = [b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(body)]
    if not te_first:
        framing.reverse()
    return (
        f"POST /outer-{tag} HTTP/1.1\r\nHost: x\r\n".encode()
        + b"\r\n".join(framing)
        + b"\r\n\r\n"
        + body
    )


@pytest.mark.parametrize("te_first", [True, False], ids=["te-first", "cl-first"])
def test_cl_te_smuggled_request_never_reaches_upstream(proxy, upstream, te_first):
    tag = uuid.uuid4().hex
    _, after = exchange(proxy, smuggling_request(tag, te_first))
    # the connection is closed after the first response; the tail of the body never
    # became a second request, neither answered downstream nor forwarded upstream
    assert b"HTTP/1.1" not in after
    assert f"/smuggled-{tag}" not in upstream.stats()["paths"]
    assert_still_serving(proxy)


@pytest.mark.parametrize("te_first", [True, False], ids=["te-first", "cl-first"])
def test_cl_te_is_framed_by_te_and_the_connection_closed(proxy, upstream, te_first):
    # RFC 9112 6.1: Transfer-Encoding overrides Content-Length; an intermediary drops the
    # Content-Length before forwarding and closes the connection after responding.
    tag = uuid.uuid4().hex
    with connect(proxy.addr()) as sock:
        sock.sendall(smuggling_request(tag, te_first))
        resp = read_response(sock)
        after = resp.rest + read_until_close(sock, timeout=5)
    assert resp.status == 200
    assert ("connection", "close") in [(k.lower(), v.lower()) for k, v in resp.headers]
    echo = json.loads(resp.body)
    assert echo["path"] == f"/outer-{tag}"
    assert "content-length" not in [k for k, _ in echo["headers"]]
    assert echo["body"] == ""  # the chunked body ended at "0\r\n\r\n"
    assert after == b""
    assert f"/smuggled-{tag}" not in upstream.stats()["paths"]
    assert_still_serving(proxy)


def test_conflicting_content_lengths_are_rejected(proxy, upstream):
    tag = uuid.uuid4().hex
    request = (
        f"POST /cl-{tag} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
        "hello!"
    ).encode()
    status, _ = exchange(proxy, request)
    assert status == 400
    assert f"/cl-{tag}" not in upstream.stats()["paths"]
    assert_still_serving(proxy)
