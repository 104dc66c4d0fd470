"""HTTP/1.1 proxying: keep-alive, headers and bodies intact, streaming without buffering."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time

import psutil
from helpers import UUID_RE, client, connect, read_response, simple_config

GiB = 1 << 30
MiB = 1 << 20


def get_request(path: str, host: str = "svc.test", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def test_keepalive_requests_share_one_connection(run_proxy, upstream):
    proxy = run_proxy(simple_config([upstream.addr]))
    with connect(proxy.addr()) as sock:
        buf = b""
        conns = set()
        for i in range(20):
            sock.sendall(get_request(f"/ka/{i}"))
            resp = read_response(sock, buf)
            buf = resp.rest
            assert resp.status == 200
            echo = json.loads(resp.body)
            assert echo["path"] == f"/ka/{i}"
            conns.add(echo["conn"])
    # 20 sequential requests on one downstream connection: one pooled upstream connection
    # (the pool must have it back before the client can send its next request)
    assert len(conns) == 1, conns
    assert proxy.metrics().get("upstream_connect_total", cluster="backend") == 1


def test_request_headers_query_and_body_arrive_intact(run_proxy, upstream):
    proxy = run_proxy(simple_config([upstream.addr]))
    body = os.urandom(200_000)
    with client() as c:
        r = c.post(
            proxy.url() + "/echo/a%20b?x=1&y=a%20b&z=%2F",
            content=body,
            headers=[
                ("X-Custom", "Value With  Spaces; and=stuff"),
                ("x-multi", "one"),
                ("x-multi", "two"),
                ("content-type", "application/octet-stream"),
                ("authorization", "Bearer abc.def"),
            ],
        )
    assert r.status_code == 200
    echo = r.json()
    assert echo["method"] == "POST"
    assert echo["path"] == "/echo/a%20b"
    assert echo["query"] == "x=1&y=a%20b&z=%2F"
    headers: dict[str, list[str]] = {}
    for k, v in echo["headers"]:
        headers.setdefault(k, []).append(v)
    assert headers["x-custom"] == ["Value With  Spaces; and=stuff"]
    assert ", ".join(headers["x-multi"]) == "one, two"
    assert headers["authorization"] == ["Bearer abc.def"]
    assert headers["content-type"] == ["application/octet-stream"]
    assert echo["body_len"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    # response headers: custom ones kept, multi-valued set-cookie NOT merged into one line
    assert r.headers["x-upstream"] == "a"
    assert r.headers.get_list("set-cookie") == ["a=1", "b=2"]


def test_post_body_echo_content_length_and_chunked(run_proxy, upstream):
    proxy = run_proxy(simple_config([upstream.addr]))
    body = os.urandom(3 * MiB)
    with client() as c:
        r = c.post(proxy.url() + "/raw", content=body)
        assert r.status_code == 200
        assert r.content == body

        def chunks():
            for i in range(0, len(body), 100_000):
                yield body[i : i + 100_000]

        r = c.post(proxy.url() + "/raw", content=chunks())
        assert r.status_code == 200
        assert r.content == body


def test_head_and_bodyless_statuses_keep_connection_usable(run_proxy, upstream):
    proxy = run_proxy(simple_config([upstream.addr]))
    with connect(proxy.addr()) as sock:
        sock.sendall(b"HEAD /head HTTP/1.1\r\nHost: svc.test\r\n\r\n")
        resp = read_response(sock, head=True)
        assert resp.status == 200
        assert int(resp.header("content-length")) > 0
        assert resp.rest == b"", "HEAD response must not carry a body"
        sock.sendall(get_request("/status?code=204"))
        resp = read_response(sock)
        assert resp.status == 204
        assert resp.body == b""
        sock.sendall(get_request("/after"))
        resp = read_response(sock, resp.rest)
        assert resp.status == 200
        assert json.loads(resp.body)["path"] == "/after"


def test_upstream_status_codes_pass_through(run_proxy, upstream):
    proxy = run_proxy(simple_config([upstream.addr]))
    with client() as c:
        for code in (201, 301, 404, 418, 500, 503):
            r = c.get(proxy.url() + f"/status?code={code}", follow_redirects=False)
            assert r.status_code == code
            assert r.text == f"status {code}\n"
            assert r.headers["x-upstream"] == "a"


class RssSampler:
    """Samples a process's RSS every 20 ms in a thread; ``peak`` is the max seen."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.baseline = self.proc.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def growth(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.baseline


def test_streaming_upload_1gib_does_not_buffer(run_proxy, upstream):
    proxy = run_proxy(simple_config([upstream.addr]))
    block = b"u" * MiB

    def body():
        for _ in range(GiB // MiB):
            yield block

    sampler = RssSampler(proxy.pid)
    with client(timeout=60) as c:
        r = c.post(proxy.url() + "/count", content=body())
    growth = sampler.growth()
    assert r.status_code == 200
    assert r.json() == {"bytes": GiB}
    assert growth < 200 * MiB, f"proxy RSS grew by {growth / MiB:.0f} MiB for a 1 GiB upload"


def test_streaming_download_1gib_with_slow_reader_does_not_buffer(run_proxy, upstream):
    proxy = run_proxy(simple_config([upstream.addr]))
    sampler = RssSampler(proxy.pid)
    received = 0
    with client(timeout=60) as c, c.stream("GET", proxy.url() + f"/bytes?n={GiB}") as r:
        assert r.status_code == 200
        it = r.iter_raw(64 * 1024)
        while received < MiB:
            received += len(next(it))
        # stall the reader: the upstream could push hundreds of MiB in this time if the
        # proxy did not apply back-pressure
        time.sleep(1.0)
        for chunk in it:
            received += len(chunk)
    growth = sampler.growth()
    assert received == GiB
    assert growth < 200 * MiB, f"proxy RSS grew by {growth / MiB:.0f} MiB for a 1 GiB download"


def upstream_headers(echo: dict) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for k, v in echo["headers"]:
        headers.setdefault(k.lower(), []).append(v)
    return headers


def test_hop_by_hop_headers_are_not_forwarded(run_proxy, upstream):
    proxy = run_proxy(simple_config([upstream.addr]))
    request = (
        b"GET /hop HTTP/1.1\r\n"
        b"Host: svc.test\r\n"
        b"Connection: keep-alive, X-Drop-Me, x-also-drop\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"TE: deflate\r\n"
        b"Upgrade: foo/1\r\n"
        b"X-Drop-Me: secret\r\n"
        b"X-Also-Drop: 1\r\n"
        b"X-Keep-Me: yes\r\n"
        b"\r\n"
    )
    with connect(proxy.addr()) as sock:
        sock.sendall(request)
        resp = read_response(sock)
    assert resp.status == 200
    headers = upstream_headers(json.loads(resp.body))
    assert headers["x-keep-me"] == ["yes"]
    leaked = {"keep-alive", "proxy-connection", "te", "upgrade", "x-drop-me", "x-also-drop"}
    assert leaked & set(headers) == set(), headers
    for value in headers.get("connection", []):
        assert "drop" not in value.lower(), f"client's Connection header forwarded: {value}"


def test_forwarding_headers_and_request_id(run_proxy, upstream):
    proxy = run_proxy(simple_config([upstream.addr]))
    with client() as c:
        plain = upstream_headers(c.get(proxy.url() + "/fwd").json())
        again = upstream_headers(c.get(proxy.url() + "/fwd").json())
        chained = upstream_headers(
            c.get(
                proxy.url() + "/fwd",
                headers={"x-forwarded-for": "203.0.113.7", "x-request-id": "my-req-123"},
            ).json()
        )
    assert plain["x-forwarded-for"] == ["127.0.0.1"]
    assert ", ".join(chained["x-forwarded-for"]) == "203.0.113.7, 127.0.0.1"
    assert len(plain["forwarded"]) == 1
    assert re.search(r'for="?127\.0\.0\.1', plain["forwarded"][0]), plain["forwarded"]
    # a request id is generated when absent (uuid-looking, fresh per request) ...
    assert UUID_RE.match(plain["x-request-id"][0]), plain["x-request-id"]
    assert UUID_RE.match(again["x-request-id"][0])
    assert plain["x-request-id"] != again["x-request-id"]
    # ... and kept as is when the client sent one
    assert chained["x-request-id"] == ["my-req-123"]
