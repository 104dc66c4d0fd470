"""Upstream servers used by the integration tests.

* ``HttpUpstream``: an ASGI app served by hypercorn in a *subprocess* (HTTP/1.1, h2c and
  WebSocket), so it never competes with the test process for the GIL.  Run directly as
  ``python servers.py http --name a [--delay-ms N]``; it prints ``READY <port>``.
* ``TcpServer``: a threaded raw-socket server with a pluggable per-connection handler
  (echo, half-close reply, misbehaving HTTP upstreams ...), in-process.
* ``GrpcUpstream``: a grpcio server with generic (bytes in, bytes out) handlers, in-process.

Endpoints of the HTTP upstream (any method, any host):

    /_stats         {"inflight", "total", "paths": [...]} -- not counted itself
    /delay?ms=N     sleep N ms, then echo
    /bytes?n=N      stream N bytes (chunks of 64 KiB, no content-length)
    /count          read the whole body, answer {"bytes": n}
    /status?code=N  answer that status
    /raw            stream the request body back as the response body
    anything else   echo: JSON with method, path, query, headers, body, conn (peer ip:port)
    websocket       greets with "hello from <name>" then echoes every message
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from urllib.parse import parse_qs

import httpx

HERE = Path(__file__).resolve().parent
CHUNK = 64 * 1024
MAX_ECHO_BODY = 64 * 1024


# --------------------------------------------------------------------------------------
# The ASGI app (runs inside the upstream subprocess)
# --------------------------------------------------------------------------------------


class UpstreamApp:
    def __init__(self, name: str, delay_ms: int = 0) -> None:
        self.name = name
        self.delay_ms = delay_ms
        self.inflight = 0
        self.total = 0
        self.paths: list[str] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
            return
        path = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
        if path == "/_stats":
            await self.respond(
                send,
                200,
                json.dumps(
                    {"inflight": self.inflight, "total": self.total, "paths": self.paths}
                ).encode(),
            )
            return
        self.inflight += 1
        self.total += 1
        self.paths.append(path)
        del self.paths[:-5000]
        try:
            await self.http(scope, receive, send, path)
        finally:
            self.inflight -= 1

    def base_headers(self, scope) -> list[tuple[bytes, bytes]]:
        client = scope.get("client") or ("?", 0)
        return [
            (b"x-upstream", self.name.encode()),
            (b"x-conn", f"{client[0]}:{client[1]}".encode()),
            (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
        ]

    async def respond(self, send, status, body: bytes, headers=(), ctype=b"application/json"):
        hdrs = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
        hdrs.extend(headers)
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})

    async def http(self, scope, receive, send, path) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        headers = self.base_headers(scope)
        delay = self.delay_ms
        if path == "/delay":
            delay = int(query.get("ms", ["0"])[0])
        if delay:
            await asyncio.sleep(delay / 1000)

        if path == "/bytes":
            n = int(query.get("n", ["0"])[0])
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [*headers, (b"content-type", b"application/octet-stream")],
                }
            )
            block = b"x" * CHUNK
            while n > 0:
                piece = block if n >= CHUNK else block[:n]
                n -= len(piece)
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return

        if path == "/raw":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [*headers, (b"content-type", b"application/octet-stream")],
                }
            )
            more = True
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                more = msg.get("more_body", False)
                body = msg.get("body", b"")
                if body or not more:
                    await send({"type": "http.response.body", "body": body, "more_body": more})
            return

        total = 0
        digest = hashlib.sha256()
        kept = bytearray()
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            more = msg.get("more_body", False)
            total += len(body)
            if path != "/count":
                digest.update(body)
                if len(kept) < MAX_ECHO_BODY:
                    kept += body

        if path == "/count":
            await self.respond(send, 200, json.dumps({"bytes": total}).encode(), headers)
            return
        if path == "/status":
            code = int(query.get("code", ["200"])[0])
            await self.respond(send, code, f"status {code}\n".encode(), headers, b"text/plain")
            return

        client = scope.get("client") or ("?", 0)
        echo = {
            "name": self.name,
            "method": scope["method"],
            "path": path,
            "query": scope.get("query_string", b"").decode("latin-1"),
            "http_version": scope.get("http_version"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "conn": f"{client[0]}:{client[1]}",
            "body_len": total,
            "body_sha256": digest.hexdigest(),
            "body": bytes(kept).decode("latin-1") if total <= MAX_ECHO_BODY else None,
        }
        await self.respond(send, 200, json.dumps(echo).encode(), headers)

    async def websocket(self, scope, receive, send) -> None:
        msg = await receive()
        if msg["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": f"hello from {self.name}"})
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("text") is not None:
                await send({"type": "websocket.send", "text": msg["text"]})
            else:
                await send({"type": "websocket.send", "bytes": msg.get("bytes") or b""})


def _serve_http(name: str, delay_ms: int) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.keep_alive_timeout = 300
    config.graceful_timeout = 0.1
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"
    config.h2_max_concurrent_streams = 1000
    config.websocket_ping_interval = None

    parent = os.getppid()

    async def orphan_watch(stop: asyncio.Event) -> None:
        # exit with the test process even if it dies without stopping us
        while os.getppid() == parent:
            await asyncio.sleep(0.5)
        stop.set()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        watcher = asyncio.ensure_future(orphan_watch(stop))
        task = asyncio.ensure_future(
            serve(UpstreamApp(name, delay_ms), config, shutdown_trigger=stop.wait)
        )
        await asyncio.sleep(0)
        print(f"READY {sock.getsockname()[1]}", flush=True)
        await task
        watcher.cancel()

    asyncio.run(main())


# --------------------------------------------------------------------------------------
# Test-side handles
# --------------------------------------------------------------------------------------


class HttpUpstream:
    """A hypercorn upstream in a subprocess. ``addr`` is ``127.0.0.1:<port>``."""

    def __init__(self, name: str, delay_ms: int = 0) -> None:
        self.name = name
        self.delay_ms = delay_ms
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "servers.py"),
                "http",
                "--name",
                name,
                "--delay-ms",
                str(delay_ms),
            ],
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
        )
        line = _readline_with_timeout(self.proc, 20)
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"upstream {name} failed to start: {line!r}")
        self.port = int(line.split()[1])
        self.addr = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.addr}"

    def stats(self) -> dict:
        with httpx.Client(trust_env=False, timeout=5) as c:
            return c.get(f"{self.url}/_stats").json()

    def wait_inflight(self, n: int, timeout: float = 5.0) -> None:
        wait_for(lambda: self.stats()["inflight"] >= n, timeout, f"{self.name} inflight>={n}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()


def _readline_with_timeout(proc: subprocess.Popen, timeout: float) -> str:
    result: list[str] = []

    def read() -> None:
        result.append(proc.stdout.readline())

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    return result[0].strip() if result else ""


def wait_for(pred: Callable[[], object], timeout: float = 5.0, what: str = "condition"):
    """Poll ``pred`` until it returns a truthy value; return it or raise AssertionError."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from last_exc
        time.sleep(0.05)


class TcpServer:
    """Threaded TCP server on 127.0.0.1:0; ``handler(conn)`` runs per connection."""

    def __init__(self, handler: Callable[[socket.socket], None], backlog: int = 128) -> None:
        self.handler = handler
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self.accepted = 0
        self.received: list[bytes] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.close()
        self._thread.join(2)


def echo_handler(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def named_echo_handler(name: bytes) -> Callable[[socket.socket], None]:
    def handler(conn: socket.socket) -> None:
        conn.sendall(name + b"\n")
        echo_handler(conn)

    return handler


def half_close_handler(conn: socket.socket) -> None:
    """Read until the peer's FIN, then reply with the byte count and its hash, then close."""
    total = 0
    digest = hashlib.sha256()
    while data := conn.recv(65536):
        total += len(data)
        digest.update(data)
    conn.sendall(f"got {total} {digest.hexdigest()}\n".encode())
    conn.shutdown(socket.SHUT_WR)


def read_http_head(conn: socket.socket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            break
        buf += data
    return buf


def close_before_response_handler(conn: socket.socket) -> None:
    read_http_head(conn)
    conn.close()


def rst_before_response_handler(conn: socket.socket) -> None:
    read_http_head(conn)
    rst_close(conn)


def garbage_handler(conn: socket.socket) -> None:
    read_http_head(conn)
    conn.sendall(b"SSH-2.0-definitely not http\r\n\x00\x01\x02garbage\r\n\r\n")
    time.sleep(0.2)
    conn.close()


def rst_mid_body_handler(conn: socket.socket) -> None:
    read_http_head(conn)
    conn.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100000\r\n\r\n"
        + b"y" * 1000
    )
    time.sleep(0.2)
    rst_close(conn)


def rst_close(conn: socket.socket) -> None:
    import struct

    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


# --------------------------------------------------------------------------------------
# gRPC
# --------------------------------------------------------------------------------------

GRPC_SERVICE = "meshpy.test.Echo"


class GrpcUpstream:
    def __init__(self) -> None:
        import grpc

        self.grpc = grpc
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(GRPC_SERVICE, handlers),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.addr = f"127.0.0.1:{self.port}"
        self.server.start()

    @staticmethod
    def _client_md(ctx) -> dict[str, str]:
        return {k: v for k, v in ctx.invocation_metadata() if isinstance(v, str)}

    def unary(self, request: bytes, ctx) -> bytes:
        md = self._client_md(ctx)
        ctx.send_initial_metadata((("x-initial", "i1"),))
        ctx.set_trailing_metadata((("x-trailer", "t1"), ("x-client-echo", md.get("x-client", ""))))
        return b"echo:" + request

    def server_stream(self, request: bytes, ctx):
        n = int(request.decode())
        for i in range(n):
            yield f"item-{i}".encode() + b"." * 1000
        ctx.set_trailing_metadata((("x-count", str(n)),))

    def bidi(self, request_iterator, ctx):
        for req in request_iterator:
            yield req.upper()

    def fail(self, request: bytes, ctx) -> bytes:
        ctx.set_trailing_metadata((("x-why", "missing"),))
        ctx.abort(self.grpc.StatusCode.NOT_FOUND, f"widget {request.decode()} not found")

    def stop(self) -> None:
        self.server.stop(0).wait(5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["http"])
    parser.add_argument("--name", default="up")
    parser.add_argument("--delay-ms", type=int, default=0)
    args = parser.parse_args()
    os.environ.pop("HYPERCORN_CONFIG", None)
    _serve_http(args.name, args.delay_ms)
