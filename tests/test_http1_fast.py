"""The HTTP/1.1 fast path (core/dataplane/src/http1.rs), on real sockets.

Requests whose head and body arrive in one read, on routes without filters or with
request hooks only, to plain HTTP/1.1 clusters, are forwarded by the proxy itself over
its own pool of upstream connections; anything else is handed to hyper mid-connection.
These tests cover what that path does on its own: pipelining, response framings (chunked
with trailers, read-until-close, HEAD, interim 1xx), stale pooled upstream connections,
the hand-over to hyper with the bytes already read, the request headers it rewrites, its
metrics, and request hooks run on it compared with the same hooks on hyper.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from helpers import (
    UUID_RE,
    cluster,
    config,
    connect,
    eventually,
    http_listener,
    read_until_close,
    simple_config,
)

TIMEOUT = 5.0


# ------------------------------------------------------------------------ raw HTTP/1.1


def _recv(sock: socket.socket, buf: bytes) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError(f"connection closed mid-message; have {buf[-200:]!r}")
    return buf + data


def _headers(raw_head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = raw_head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return lines[0], headers


def _read_chunked(sock: socket.socket, buf: bytes) -> tuple[bytes, list[bytes], bytes]:
    """Decode a chunked body at the front of ``buf``: (body, trailer lines, rest)."""
    body = b""
    while True:
        while b"\r\n" not in buf:
            buf = _recv(sock, buf)
        size_line, buf = buf.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            break
        while len(buf) < size + 2:
            buf = _recv(sock, buf)
        assert buf[size : size + 2] == b"\r\n", f"bad chunk end: {buf[size : size + 2]!r}"
        body += buf[:size]
        buf = buf[size + 2 :]
    trailers = []
    while True:
        while b"\r\n" not in buf:
            buf = _recv(sock, buf)
        line, buf = buf.split(b"\r\n", 1)
        if not line:
            return body, trailers, buf
        trailers.append(line)


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    rest: bytes
    trailers: list[bytes] = field(default_factory=list)
    interim: list[int] = field(default_factory=list)
    raw_head: bytes = b""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def json(self) -> dict:
        return json.loads(self.body)


def read_response(sock: socket.socket, buf: bytes = b"", head: bool = False) -> Response:
    """One final response (1xx skipped and noted); a chunked body's trailers are kept."""
    interim = []
    while True:
        while b"\r\n\r\n" not in buf:
            buf = _recv(sock, buf)
        raw_head, buf = buf.split(b"\r\n\r\n", 1)
        status_line, headers = _headers(raw_head)
        status = int(status_line.split(" ", 2)[1])
        if 100 <= status < 200:
            interim.append(status)
            continue
        break
    hmap = dict(headers)
    if head or status in (204, 304):
        return Response(status, headers, b"", buf, interim=interim, raw_head=raw_head)
    if "chunked" in hmap.get("transfer-encoding", "").lower():
        body, trailers, rest = _read_chunked(sock, buf)
        return Response(status, headers, body, rest, trailers, interim, raw_head)
    if "content-length" in hmap:
        n = int(hmap["content-length"])
        while len(buf) < n:
            buf = _recv(sock, buf)
        return Response(status, headers, buf[:n], buf[n:], interim=interim, raw_head=raw_head)
    body = buf + read_until_close(sock, TIMEOUT)
    return Response(status, headers, body, b"", interim=interim, raw_head=raw_head)


def relayed_as_sent(resp: Response, name: bytes) -> bool:
    """The response carries header ``name`` spelt as the upstream sent it. hyper's server
    writes every header name in lower case; the fast path passes the upstream's on as they
    came. A connection handed to hyper stays there, so this also tells the path of every
    response before it on the same connection."""
    return b"\r\n" + name + b":" in resp.raw_head


def get(path: str, extra: str = "", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: svc.test\r\n{extra}\r\n".encode()


# A Connection header naming a token the fast path does not know hands the connection to hyper.
VIA = {"fast-path": "", "hyper": "Connection: keep-alive, x-to-hyper\r\n"}


def post(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: svc.test\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def assert_nothing_more(sock: socket.socket, buf: bytes, seconds: float) -> None:
    """No byte follows the response (``buf``: what was read past it) for ``seconds``,
    and the connection stays open."""
    sock.settimeout(seconds)
    try:
        extra = sock.recv(65536)
    except TimeoutError:
        extra = None
    finally:
        sock.settimeout(TIMEOUT)
    assert buf == b"" and extra is None, f"bytes after the response: {buf!r} + {extra!r}"


# ------------------------------------------------------------------ raw upstream servers


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


def read_request(conn: socket.socket, buf: bytes) -> tuple[Request, bytes] | None:
    """One request from an upstream connection; None on a clean EOF between requests."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    raw_head, buf = buf.split(b"\r\n\r\n", 1)
    request_line, headers = _headers(raw_head)
    method, target, _ = request_line.split(" ", 2)
    hmap = dict(headers)
    if "chunked" in hmap.get("transfer-encoding", "").lower():
        body, _, buf = _read_chunked(conn, buf)
    else:
        n = int(hmap.get("content-length", "0"))
        while len(buf) < n:
            buf = _recv(conn, buf)
        body, buf = buf[:n], buf[n:]
    return Request(method, target, headers, body), buf


class RawUpstream:
    """Keep-alive HTTP/1.1 upstream whose ``respond(conn, request)`` writes each answer
    (returning False to stop serving the connection); requests are recorded."""

    def __init__(self, respond: Callable[[socket.socket, Request], bool | None]) -> None:
        self.respond = respond
        self.requests: list[Request] = []
        self.lock = threading.Lock()

    def __call__(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        buf = b""
        while (got := read_request(conn, buf)) is not None:
            request, buf = got
            with self.lock:
                self.requests.append(request)
            if self.respond(conn, request) is False:
                return


def rst_close(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


# ---------------------------------------------------------------------------- 1 pipelining


def test_pipelined_requests_are_answered_in_order(run_proxy, upstream):
    proxy = run_proxy(simple_config([upstream.addr]))
    body = b"pipelined body \x00\xff" * 10
    burst = (
        get("/delay?ms=150")  # the slowest first: later answers must wait for it
        + get("/p/1")
        + post("/p/2", body)
        + get("/p/3", "Connection: close\r\n")
    )
    with connect(proxy.addr(), TIMEOUT) as sock:
        sock.sendall(burst)
        buf = b""
        echoes = []
        for _ in range(4):
            resp = read_response(sock, buf)
            buf = resp.rest
            assert resp.status == 200, resp
            echoes.append(resp.json())
        assert [(e["method"], e["path"]) for e in echoes] == [
            ("GET", "/delay"),
            ("GET", "/p/1"),
            ("POST", "/p/2"),
            ("GET", "/p/3"),
        ]
        assert echoes[2]["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert echoes[1]["body_len"] == echoes[3]["body_len"] == 0
        # the last request asked to close: nothing more, then EOF
        assert buf + read_until_close(sock, TIMEOUT) == b""


def test_pipelined_burst_straddling_reads_is_answered_in_order(run_proxy, upstream):
    """40 requests of ~400 bytes in one write: some heads are cut by the proxy's reads
    (a partial head is handed to hyper), yet every answer comes, in order."""
    proxy = run_proxy(simple_config([upstream.addr]))
    pad = "x-pad: " + "p" * 350 + "\r\n"
    n = 40
    with connect(proxy.addr(), TIMEOUT) as sock:
        sock.sendall(b"".join(get(f"/burst/{i}", pad) for i in range(n)))
        buf = b""
        paths = []
        for _ in range(n):
            resp = read_response(sock, buf)
            buf = resp.rest
            assert resp.status == 200
            paths.append(resp.json()["path"])
        assert paths == [f"/burst/{i}" for i in range(n)]
        sock.sendall(get("/after"))
        assert read_response(sock, buf).json()["path"] == "/after"


# ------------------------------------------------------------- 2 chunked with trailers


CHUNKS = [b"hello", b", ", b"chunked" * 100, b"\r\n0\r\n inside data", b"!"]


def chunked_with_trailers(conn: socket.socket, request: Request) -> None:
    conn.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
        b"transfer-encoding: chunked\r\ntrailer: x-checksum, x-count\r\n\r\n"
    )
    for i, chunk in enumerate(CHUNKS):
        ext = b";ext=%d" % i if i % 2 else b""
        conn.sendall(b"%x%s\r\n%s\r\n" % (len(chunk), ext, chunk))
        time.sleep(0.01)
    digest = hashlib.sha256(b"".join(CHUNKS)).hexdigest().encode()
    # the last chunk and trailers split across writes, as a slow upstream might
    conn.sendall(b"0\r\nx-checksum: " + digest[:10])
    time.sleep(0.02)
    conn.sendall(digest[10:] + b"\r\nx-count: %d\r\n" % len(CHUNKS))
    time.sleep(0.02)
    conn.sendall(b"\r\n")


def test_chunked_response_with_trailers_is_relayed_and_keeps_the_connection(run_proxy, tcp_server):
    server = tcp_server(RawUpstream(chunked_with_trailers))
    proxy = run_proxy(simple_config([server.addr]))
    expected = b"".join(CHUNKS)
    digest = hashlib.sha256(expected).hexdigest()
    with connect(proxy.addr(), TIMEOUT) as sock:
        buf = b""
        for i in range(2):
            sock.sendall(get(f"/chunked/{i}", "TE: trailers\r\n"))
            resp = read_response(sock, buf)
            buf = resp.rest
            assert resp.status == 200
            assert resp.header("transfer-encoding") == "chunked"
            assert resp.body == expected
            assert resp.trailers == [
                f"x-checksum: {digest}".encode(),
                f"x-count: {len(CHUNKS)}".encode(),
            ]
            assert buf == b""
    # the body's end was found exactly: the upstream connection went back to the pool
    assert server.accepted == 1
    assert [r.target for r in server.handler.requests] == ["/chunked/0", "/chunked/1"]


# ----------------------------------------------------------- 3 response without a length


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_response_without_length_is_relayed_then_connection_closed(run_proxy, tcp_server, version):
    pieces = [b"first part; ", b"second part; " * 200, b"last part"]

    def until_close(conn: socket.socket, request: Request) -> bool:
        conn.sendall(f"{version} 200 OK\r\ncontent-type: text/plain\r\n\r\n".encode())
        for piece in pieces:
            time.sleep(0.02)
            conn.sendall(piece)
        conn.shutdown(socket.SHUT_WR)
        return False

    server = tcp_server(RawUpstream(until_close))
    proxy = run_proxy(simple_config([server.addr]))
    with connect(proxy.addr(), TIMEOUT) as sock:
        sock.sendall(get("/no-length"))  # a keep-alive request
        data = read_until_close(sock, TIMEOUT)
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, headers = _headers(head)
    assert status_line.startswith("HTTP/1.1 200"), data[:200]
    hmap = dict(headers)
    assert hmap.get("connection") == "close", head
    assert "content-length" not in hmap and "transfer-encoding" not in hmap, head
    assert body == b"".join(pieces)


# ---------------------------------------------------------- 4 stale pooled connections


def one_then_close(close: str) -> Callable[[socket.socket, Request], bool]:
    """An upstream that answers one keep-alive request per connection, then closes it 50 ms
    later (``fin`` or ``rst``) without having said so."""

    def respond(conn: socket.socket, request: Request) -> bool:
        conn.sendall(ok(f"{request.method} {request.target} {len(request.body)}".encode()))
        time.sleep(0.05)
        if close == "rst":
            rst_close(conn)
        else:
            conn.shutdown(socket.SHUT_RDWR)
        return False

    return respond


@pytest.mark.parametrize("close", ["fin", "rst"])
def test_upstream_closing_idle_pooled_connections_causes_no_error(run_proxy, tcp_server, close):
    """The upstream closes each connection 50 ms after its one response, without saying so.
    Requests after 0.3 s and after more than 1 s, GETs and a POST (never retried), all get
    through: the pool notices the close before reusing the connection."""

    server = tcp_server(RawUpstream(one_then_close(close)))
    proxy = run_proxy(simple_config([server.addr]))
    seen = []

    def exchange(sock: socket.socket, request: bytes, expected: bytes) -> None:
        sock.sendall(request)
        resp = read_response(sock)
        seen.append(resp.status)
        assert (resp.status, resp.body) == (200, expected), (seen, resp)

    with connect(proxy.addr(), TIMEOUT) as kept:
        for i in range(2):
            exchange(kept, get(f"/same/{i}"), f"GET /same/{i} 0".encode())
            time.sleep(0.3)
            with connect(proxy.addr(), TIMEOUT) as fresh:
                exchange(fresh, get(f"/fresh/{i}"), f"GET /fresh/{i} 0".encode())
            time.sleep(0.3)
        time.sleep(1.2)
        exchange(kept, post("/post-after-1s", b"12345"), b"POST /post-after-1s 5")
        with connect(proxy.addr(), TIMEOUT) as fresh:
            exchange(fresh, get("/get-after-1s"), b"GET /get-after-1s 0")
    # every request went over a connection of its own
    assert server.accepted == len(seen) == 6


@pytest.mark.parametrize(
    ("via", "close"), [("fast-path", "fin"), ("fast-path", "rst"), ("hyper", "fin")]
)
def test_post_shortly_after_upstream_closed_idle_connection(run_proxy, tcp_server, close, via):
    """A POST is not retried, so it must not be sent on a pooled connection the upstream
    closed 0.3 s earlier (hyper's pool notices the close as it happens; ``hyper``, where
    a Connection token hands the client connection to hyper, is the reference)."""

    server = tcp_server(RawUpstream(one_then_close(close)))
    proxy = run_proxy(simple_config([server.addr]))
    to_hyper = "Connection: keep-alive, x-to-hyper\r\n" if via == "hyper" else ""
    with connect(proxy.addr(), TIMEOUT) as sock:
        sock.sendall(get("/first", to_hyper))
        first = read_response(sock)
        assert (first.status, first.body) == (200, b"GET /first 0")
        time.sleep(0.3)  # the upstream closed its side 0.25 s ago
        sock.sendall(post("/second", b"12345"))
        second = read_response(sock, first.rest)
    assert (second.status, second.body) == (200, b"POST /second 5"), second
    assert server.accepted == 2


# ----------------------------------------------------------------------------- 5 HEAD


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_head_response_has_no_body_and_connection_stays_usable(run_proxy, tcp_server, framing):
    def respond(conn: socket.socket, request: Request) -> None:
        if request.method == "HEAD":
            length = (
                b"content-length: 1234"
                if framing == "content-length"
                else b"transfer-encoding: chunked"
            )
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n" + length + b"\r\n\r\n")
        else:
            conn.sendall(ok(f"after {request.target}".encode()))

    server = tcp_server(RawUpstream(respond))
    proxy = run_proxy(simple_config([server.addr]))
    with connect(proxy.addr(), TIMEOUT) as sock:
        for i in range(2):
            sock.sendall(get(f"/head/{i}", method="HEAD"))
            resp = read_response(sock, head=True)
            assert resp.status == 200
            if framing == "content-length":
                assert resp.header("content-length") == "1234"
            else:
                assert resp.header("transfer-encoding") == "chunked"
            assert_nothing_more(sock, resp.rest, 0.15)
            sock.sendall(get(f"/get/{i}"))
            resp = read_response(sock)
            assert (resp.status, resp.body, resp.rest) == (200, f"after /get/{i}".encode(), b"")
    # a HEAD answer ends with its head: the upstream connection was reused throughout
    assert server.accepted == 1
    assert [r.method for r in server.handler.requests] == ["HEAD", "GET", "HEAD", "GET"]


# ------------------------------------------------------------------- 6 interim responses


@pytest.mark.parametrize("together", [False, True], ids=["separate-writes", "one-write"])
def test_interim_responses_are_followed_by_the_final_one(run_proxy, tcp_server, together):
    interim = (
        b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload; as=style\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nlink: </app.js>; rel=preload; as=script\r\n\r\n"
    )

    def respond(conn: socket.socket, request: Request) -> None:
        final = ok(f"final {request.target}".encode(), b"content-type: text/plain\r\n")
        if together:
            conn.sendall(interim + final)
        else:
            conn.sendall(interim)
            time.sleep(0.05)
            conn.sendall(final)

    server = tcp_server(RawUpstream(respond))
    proxy = run_proxy(simple_config([server.addr]))
    with connect(proxy.addr(), TIMEOUT) as sock:
        buf = b""
        for i in range(2):
            sock.sendall(get(f"/hints/{i}"))
            resp = read_response(sock, buf)
            buf = resp.rest
            assert set(resp.interim) <= {103}, resp.interim
            assert resp.status == 200
            assert resp.body == f"final /hints/{i}".encode()
            assert buf == b""
    assert server.accepted == 1


# --------------------------------------------------------- 7 hand-over to hyper mid-way


CHUNKED_BODY = [b"chunk-one;", b"x" * 5000, b"\r\n0\r\n\r\n (not the end)", b"last"]


def chunked_post(path: str) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: svc.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    return (
        head.encode() + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in CHUNKED_BODY) + b"0\r\n\r\n"
    )


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
@pytest.mark.parametrize("trigger", ["chunked", "split-body"])
def test_hand_over_to_hyper_mid_connection(run_proxy, upstream, trigger, pipelined):
    """GET (fast path), a POST the fast path cannot take (a chunked body, or a body not
    yet read in full), then GET: all three answered, the POST's body intact."""
    proxy = run_proxy(simple_config([upstream.addr]))
    if trigger == "chunked":
        body = b"".join(CHUNKED_BODY)
        # sent whole: the bytes read with it go to hyper
        parts = [chunked_post("/b")]
    else:
        body = bytes(range(256)) * 800
        whole = post("/b", body)
        cut = len(whole) - len(body) + 1000
        parts = [whole[:cut], whole[cut:]]
    with connect(proxy.addr(), TIMEOUT) as sock:
        if pipelined:
            sock.sendall(get("/a") + parts[0])
            for part in parts[1:]:
                time.sleep(0.1)
                sock.sendall(part)
            sock.sendall(get("/c"))
            buf = b""
            echoes = []
            for _ in range(3):
                resp = read_response(sock, buf)
                buf = resp.rest
                assert resp.status == 200
                echoes.append(resp.json())
        else:
            sock.sendall(get("/a"))
            first = read_response(sock)
            for part in parts:
                sock.sendall(part)
                time.sleep(0.1)
            second = read_response(sock, first.rest)
            sock.sendall(get("/c"))
            third = read_response(sock, second.rest)
            assert [r.status for r in (first, second, third)] == [200, 200, 200]
            echoes = [r.json() for r in (first, second, third)]
    assert [(e["method"], e["path"]) for e in echoes] == [
        ("GET", "/a"),
        ("POST", "/b"),
        ("GET", "/c"),
    ]
    assert echoes[1]["body_len"] == len(body)
    assert echoes[1]["body_sha256"] == hashlib.sha256(body).hexdigest()


# -------------------------------------------------------------- 8 request headers rewritten


def test_fast_path_request_headers(run_proxy, tcp_server):
    def echo_headers(conn: socket.socket, request: Request) -> None:
        conn.sendall(ok(json.dumps(request.headers).encode()))

    server = tcp_server(RawUpstream(echo_headers))
    proxy = run_proxy(simple_config([server.addr]))
    spoofing = (
        "Connection: keep-alive\r\n"
        "Keep-Alive: timeout=5, max=100\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "X-Forwarded-For: 1.2.3.4\r\n"
        "X-Forwarded-For: 5.6.7.8\r\n"
        "X-Forwarded-Proto: https\r\n"
        "X-Forwarded-Client-Cert: By=spiffe://evil/ns/x;URI=spiffe://evil/ns/admin\r\n"
        "Forwarded: for=9.9.9.9\r\n"
        "X-Keep: yes\r\n"
    )
    with connect(proxy.addr(), TIMEOUT) as sock:
        sock.sendall(get("/h1", spoofing))
        first = read_response(sock)
        sock.sendall(get("/h2", "x-request-id: client-id-42\r\nx-forwarded-for: 1.2.3.4\r\n"))
        second = read_response(sock, first.rest)
        sock.sendall(get("/h3"))
        third = read_response(sock, second.rest)
    assert server.accepted == 1, "all three should be on the fast path's pooled connection"

    def upstream_headers(resp: Response) -> dict[str, list[str]]:
        assert resp.status == 200
        headers: dict[str, list[str]] = {}
        for name, value in resp.json():
            headers.setdefault(name, []).append(value)
        return headers

    h1, h2, h3 = (upstream_headers(r) for r in (first, second, third))
    for name in ("connection", "keep-alive", "proxy-connection", "x-forwarded-client-cert"):
        assert name not in h1, (name, h1)
    assert h1["x-keep"] == ["yes"]
    assert h1["host"] == ["svc.test"]
    assert ", ".join(h1["x-forwarded-for"]) == "1.2.3.4, 5.6.7.8, 127.0.0.1"
    assert h1["x-forwarded-proto"] == ["http"]
    # the client's element is kept and ours is the last one
    forwarded = [e.strip() for v in h1["forwarded"] for e in v.split(",")]
    assert forwarded[0] == "for=9.9.9.9"
    assert forwarded[-1] == "for=127.0.0.1;proto=http", forwarded
    assert len(h1["x-request-id"]) == 1 and UUID_RE.match(h1["x-request-id"][0]), h1
    assert len(h1["x-request-id"][0]) == 36

    assert h2["x-request-id"] == ["client-id-42"]
    assert ", ".join(h2["x-forwarded-for"]) == "1.2.3.4, 127.0.0.1"

    assert h3["x-forwarded-for"] == ["127.0.0.1"]
    assert h3["forwarded"] == ["for=127.0.0.1;proto=http"]
    assert h3["x-forwarded-proto"] == ["http"]
    assert UUID_RE.match(h3["x-request-id"][0])
    assert h3["x-request-id"] != h1["x-request-id"]


# ---------------------------------------------------------------------- 9 the date header

UPSTREAM_DATE = "Sun, 06 Nov 1994 08:49:37 GMT"


def dated_on_request(conn: socket.socket, request: Request) -> None:
    extra = b"X-Upstream: raw\r\n"
    if request.target == "/ok/dated":
        extra += f"Date: {UPSTREAM_DATE}\r\n".encode()
    conn.sendall(ok(b"fine", extra))


@pytest.mark.parametrize("via", VIA)
def test_responses_are_dated_and_an_upstream_date_is_kept(run_proxy, tcp_server, free_port, via):
    """RFC 9110 §6.6.1 on either path: the proxy's own answers (no route, upstream down) and
    responses that came without a date get the current one; an upstream's date is passed
    on unchanged. All on one connection, which the last response shows never left the
    path it started on."""
    backend = tcp_server(RawUpstream(dated_on_request))
    routes = [
        {"name": "ok", "match": {"path_prefix": "/ok"}, "cluster": "backend"},
        {"name": "down", "match": {"path_prefix": "/down"}, "cluster": "down"},
    ]
    down = cluster("down", [f"127.0.0.1:{free_port()}"])
    proxy = run_proxy(config([http_listener(routes)], [cluster("backend", [backend.addr]), down]))
    paths = ["/ok/undated", "/ok/dated", "/none", "/down", "/ok/last"]
    with connect(proxy.addr(), TIMEOUT) as sock:
        sock.sendall(b"".join(get(path, VIA[via]) for path in paths))
        buf, responses = b"", []
        for _ in paths:
            responses.append(resp := read_response(sock, buf))
            buf = resp.rest
    received = time.time()
    assert [r.status for r in responses] == [200, 200, 404, 503, 200]
    assert relayed_as_sent(responses[-1], b"X-Upstream") == (via == "fast-path")
    dates = [r.header("date") for r in responses]
    assert dates[1] == UPSTREAM_DATE
    for date in dates[:1] + dates[2:]:
        assert date is not None
        sent = email.utils.parsedate_to_datetime(date).timestamp()
        assert received - 10 < sent <= received, (date, received)
    assert all(len([k for k, _ in r.headers if k == "date"]) == 1 for r in responses)


# -------------------------------------------------------------------------- 10 metrics


def test_fast_path_requests_are_counted(run_proxy, upstream):
    proxy = run_proxy(simple_config([upstream.addr]))
    labels = {"listener": "edge", "route": "all", "cluster": "backend"}
    with connect(proxy.addr(), TIMEOUT) as sock:  # one request, so the route's series exist
        sock.sendall(get("/warm"))
        read_response(sock)
    before = proxy.metrics()

    def counts(m) -> tuple[float, float, float]:
        return (
            m.get("request_total", **labels),
            m.get("response_total", status_code="200", classification="success", **labels),
            m.get("response_latency_ms_count", **labels),
        )

    base = counts(before)
    assert base == (1, 1, 1), base
    n = 0
    with connect(proxy.addr(), TIMEOUT) as sock:
        buf = b""
        for i in range(5):  # one by one ...
            sock.sendall(get(f"/m/{i}"))
            resp = read_response(sock, buf)
            buf = resp.rest
            assert resp.status == 200
            n += 1
        sock.sendall(b"".join(get(f"/pipelined/{i}") for i in range(4)))  # ... and pipelined
        for _ in range(4):
            resp = read_response(sock, buf)
            buf = resp.rest
            assert resp.status == 200
            n += 1
        sock.sendall(get("/status?code=503"))
        assert read_response(sock, buf).status == 503

    def counted():
        m = proxy.metrics()
        assert counts(m) == (base[0] + n + 1, base[1] + n, base[2] + n + 1)
        assert m.get("response_total", status_code="503", classification="failure", **labels) == 1

    eventually(counted)


# ------------------------------------------------------- 11 client gone before the response


def test_client_closing_while_upstream_works_cancels_the_upstream_request(run_proxy, tcp_server):
    """A client that closes while its request waits on a slow upstream: the proxy closes the
    upstream connection at once (no wasted upstream work, nothing pooled mid-exchange), and
    keeps serving."""
    closed_after: list[float] = []

    def slow(conn: socket.socket, request: Request) -> bool:
        if request.target != "/slow":
            conn.sendall(ok(b"fine"))
            return True
        started = time.monotonic()
        conn.settimeout(10)
        try:
            gone = conn.recv(1) == b""
        except OSError:
            gone = True
        if gone:
            closed_after.append(time.monotonic() - started)
        return False

    server = tcp_server(RawUpstream(slow))
    proxy = run_proxy(simple_config([server.addr]))
    with connect(proxy.addr(), TIMEOUT) as sock:
        sock.sendall(get("/slow"))
        eventually(lambda: len(server.handler.requests) == 1, TIMEOUT)
    eventually(lambda: len(closed_after) == 1, TIMEOUT)
    assert closed_after[0] < 2.0, f"upstream saw the close after {closed_after[0]:.2f} s"
    with connect(proxy.addr(), TIMEOUT) as sock:
        sock.sendall(get("/after"))
        resp = read_response(sock)
        assert (resp.status, resp.body) == (200, b"fine")


# ------------------------------------------------------------ 12 request hooks on the fast path

REQUEST_HOOKS = '''
import asyncio
import json

import meshpy


class Edit(meshpy.Filter):
    """Answers some requests itself; rewrites and reports on the others."""

    def on_request(self, req):
        if req.path == "/refuse":
            return meshpy.Response(403, b"refused\\n", {"x-refused-by": "Edit"})
        if req.path == "/empty":
            return meshpy.Response(204, headers={"x-empty": "yes"})
        seen = {
            "method": req.method,
            "scheme": req.scheme,
            "authority": req.authority,
            "path": req.path,
            "query": req.query,
            "client_addr": req.client_addr,
            "route": req.route,
            "cluster": req.cluster,
            "body": req.body,
            "headers": sorted(
                (name, value) for name, value in req.headers.items() if name != "x-request-id"
            ),
        }
        req.headers["x-seen"] = json.dumps(seen)
        req.headers.pop("x-secret", None)
        req.headers.add("x-multi", "one")
        req.headers.add("x-multi", "two")
        req.path = "/edited" + req.path
        if req.path.endswith("/no-length"):
            del req.headers["content-length"]
        if req.headers.get("x-canary") == "1":
            req.route_to("canary")


class Pause(meshpy.Filter):
    async def on_request(self, req):
        await asyncio.sleep(float(req.headers.get("x-pause", "0")))
'''


def echo_request(conn: socket.socket, request: Request) -> None:
    echoed = {
        "method": request.method,
        "target": request.target,
        "headers": request.headers,
        "body": request.body.decode(),
    }
    conn.sendall(ok(json.dumps(echoed).encode(), b"X-Upstream: backend\r\n"))


def request_hooks_proxy(
    run_proxy, tcp_server, hook: str = "hooks:Edit", extra_clusters: tuple[dict, ...] = (), **extra
):
    """A proxy whose one route runs ``hook``, to the echoing clusters backend and canary."""
    backend = tcp_server(RawUpstream(echo_request))
    canary = tcp_server(RawUpstream(echo_request))
    filtered = {
        "name": "filtered",
        "match": {"path_prefix": "/"},
        "cluster": "backend",
        "filters": [hook],
        **extra,
    }
    cfg = config(
        [http_listener([filtered])],
        [cluster("backend", [backend.addr]), cluster("canary", [canary.addr]), *extra_clusters],
    )
    proxy = run_proxy(cfg, "--workers", "1", files={"hooks.py": REQUEST_HOOKS})
    return proxy, backend, canary


def exchange_all(proxy, via: str) -> list[Response]:
    """The same requests, pipelined on one connection, through the path ``via`` picks."""
    token = VIA[via]
    requests = [
        get(
            "/first?q=1", token + "x-secret: s\r\nAccept: a\r\nAccept: b\r\nx-request-id: rid-1\r\n"
        ),
        get("/refuse", token),
        get("/refuse", token, method="HEAD"),
        post("/form", b"name=value", token),
        post("/form/no-length", b"kept", token),
        get("/empty", token),
        get("/to-canary", token + "x-canary: 1\r\n"),
    ]
    responses = []
    with connect(proxy.addr(), TIMEOUT) as sock:
        sock.sendall(b"".join(requests))
        buf = b""
        for raw in requests:
            resp = read_response(sock, buf, head=raw.startswith(b"HEAD"))
            buf = resp.rest
            responses.append(resp)
        # the connection serves on after answers the filter made
        sock.sendall(get("/after", token))
        responses.append(read_response(sock, buf))
    return responses


def comparable(resp: Response) -> dict:
    """A response as the client sees it, without what differs from run to run."""
    headers = sorted((k, v) for k, v in resp.headers if k not in ("date", "x-request-id"))
    body = resp.body
    if resp.header("x-upstream"):
        echoed = json.loads(body)
        echoed["headers"] = sorted(
            (k, v) for k, v in echoed["headers"] if k not in ("x-request-id", "forwarded")
        )
        body = echoed
    return {"status": resp.status, "headers": headers, "body": body}


def test_request_hooks_run_on_the_fast_path_as_they_do_on_hyper(run_proxy, tcp_server):
    """A route whose filter has only ``on_request`` is served on the fast path. What the hook
    sees, what it changes (headers, path, cluster), the answers it makes (with a body, to
    HEAD, 204) and what the upstream gets are the same as on the hyper path, request by
    request, on one pipelined connection."""
    proxy, backend, canary = request_hooks_proxy(run_proxy, tcp_server)
    fast = exchange_all(proxy, "fast-path")
    hyper = exchange_all(proxy, "hyper")

    statuses = [r.status for r in fast]
    assert statuses == [200, 403, 403, 200, 200, 204, 200, 200], statuses
    first = fast[0].json()
    assert first["target"] == "/edited/first?q=1"
    headers = dict(first["headers"])
    assert "x-secret" not in headers
    assert [v for k, v in first["headers"] if k == "x-multi"] == ["one", "two"]
    assert headers["x-request-id"] == "rid-1"
    seen = json.loads(headers["x-seen"])
    assert seen["method"] == "GET" and seen["path"] == "/first" and seen["query"] == {"q": ["1"]}
    assert (seen["scheme"], seen["authority"], seen["client_addr"]) == (
        "http",
        "svc.test",
        "127.0.0.1",
    )
    assert (seen["route"], seen["cluster"], seen["body"]) == ("filtered", "backend", None)
    seen_headers = dict(seen["headers"])
    assert seen_headers["x-forwarded-for"] == "127.0.0.1"
    assert "connection" not in seen_headers
    refused, refused_head = fast[1], fast[2]
    assert (refused.body, refused.header("x-refused-by")) == (b"refused\n", "Edit")
    assert refused.header("content-length") == "8"
    assert (refused_head.body, refused_head.header("content-length")) == (b"", "8")
    assert fast[3].json()["body"] == "name=value"
    no_length = fast[4].json()
    assert no_length["body"] == "kept"
    assert dict(no_length["headers"])["content-length"] == "4"
    assert (fast[5].header("x-empty"), fast[5].header("content-length")) == ("yes", None)
    assert fast[6].json()["target"] == "/edited/to-canary"
    assert len(canary.handler.requests) == 2  # one per path
    assert fast[7].json()["target"] == "/edited/after"

    assert [comparable(r) for r in fast] == [comparable(r) for r in hyper]
    assert relayed_as_sent(fast[-1], b"X-Upstream"), "a filtered request went to hyper"
    assert not relayed_as_sent(hyper[-1], b"X-Upstream")
    # both paths date the hooks' answers and the upstream's undated responses
    assert all(r.header("date") for r in fast + hyper)
    assert backend.accepted >= 1


def test_request_hooks_stay_on_hyper_when_a_filter_could_route_to_http2(
    run_proxy, tcp_server, grpc_upstream
):
    """With an HTTP/2 cluster in the config a filter may route to it, which only the hyper
    path can do: the same filter still works there, each request answered."""
    h2 = cluster("grpc", [grpc_upstream.addr], protocol="http2")
    proxy, _, _ = request_hooks_proxy(run_proxy, tcp_server, extra_clusters=(h2,))
    responses = exchange_all(proxy, "fast-path")
    assert [r.status for r in responses] == [200, 403, 403, 200, 200, 204, 200, 200]
    assert responses[6].json()["target"] == "/edited/to-canary"
    relayed = [r for r in responses if r.header("x-upstream")]
    assert relayed and not any(relayed_as_sent(r, b"X-Upstream") for r in relayed), (
        "served by the fast path, which keeps the upstream's spelling"
    )


def test_client_leaving_while_its_request_is_filtered_cancels_it(run_proxy, tcp_server):
    """A client that closes while the request hook still runs: the request never reaches the
    upstream, and the proxy serves the next client."""
    proxy, backend, _ = request_hooks_proxy(
        run_proxy, tcp_server, "hooks:Pause", filter_timeout="5s"
    )
    with connect(proxy.addr(), TIMEOUT) as sock:
        sock.sendall(get("/left", "x-pause: 0.5\r\n"))
        time.sleep(0.1)
    time.sleep(0.8)  # the hook has finished by now
    with connect(proxy.addr(), TIMEOUT) as sock:
        sock.sendall(get("/stayed"))
        resp = read_response(sock)
    assert resp.status == 200 and resp.json()["target"] == "/stayed"
    assert [r.target for r in backend.handler.requests] == ["/stayed"]


# -------------------------------------------------------------------- 13 idle connections


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def test_idle_keep_alive_connections_hold_no_buffers(run_proxy, upstream):
    """A connection waiting for its next request costs the proxy its task (a few KB), not
    its read and write buffers. 600 connections left idle after one exchange each grow
    the proxy by well under 10 KB apiece (about 20 KB while each kept its buffers and a
    task sized for every listener kind), and each still serves its next request."""
    proxy = run_proxy(simple_config([upstream.addr]))
    count = 600
    with connect(proxy.addr(), TIMEOUT) as warm:
        for _ in range(20):
            warm.sendall(get("/warm"))
            assert read_response(warm).status == 200
    before = _rss_kb(proxy.pid)
    idle: list[socket.socket] = []
    try:
        for i in range(count):
            sock = connect(proxy.addr(), TIMEOUT)
            idle.append(sock)
            sock.sendall(get(f"/first/{i}"))
            assert read_response(sock).status == 200
        time.sleep(0.3)
        per_connection_kb = (_rss_kb(proxy.pid) - before) / count
        assert per_connection_kb < 10, f"{per_connection_kb:.1f} KB per idle connection"
        for i, sock in enumerate(idle):
            sock.sendall(get(f"/next/{i}"))
            resp = read_response(sock)
            assert resp.status == 200 and resp.json()["path"] == f"/next/{i}"
    finally:
        for sock in idle:
            sock.close()
