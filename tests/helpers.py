"""Shared helpers for the integration tests: config builders, raw HTTP, metrics parsing."""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass, field

import httpx
from servers import wait_for

__all__ = [
    "Metrics",
    "RawResponse",
    "client",
    "config",
    "connect",
    "eventually",
    "http_listener",
    "read_response",
    "read_until_close",
    "simple_config",
    "wait_for",
]

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)


# ---------------------------------------------------------------------------- config


def config(listeners: list[dict], clusters: list[dict], admin: str = "127.0.0.1:0") -> dict:
    return {"admin": {"listen": admin}, "listeners": listeners, "clusters": clusters}


def http_listener(routes: list[dict], name: str = "edge", **extra) -> dict:
    return {"name": name, "listen": "127.0.0.1:0", "protocol": "http", "routes": routes, **extra}


def cluster(name: str, endpoints: list[str], **extra) -> dict:
    return {"name": name, "endpoints": list(endpoints), **extra}


def simple_config(
    endpoints: list[str],
    *,
    cluster_name: str = "backend",
    route_name: str = "all",
    timeout: str | None = None,
    listener_extra: dict | None = None,
    cluster_extra: dict | None = None,
) -> dict:
    """One http listener ``edge`` with one catch-all route ``all`` -> ``backend``."""
    route = {"name": route_name, "match": {"path_prefix": "/"}, "cluster": cluster_name}
    if timeout:
        route["timeout"] = timeout
    return config(
        [http_listener([route], **(listener_extra or {}))],
        [cluster(cluster_name, endpoints, **(cluster_extra or {}))],
    )


# ---------------------------------------------------------------------------- clients


def client(**kwargs) -> httpx.Client:
    kwargs.setdefault("timeout", 10)
    return httpx.Client(trust_env=False, **kwargs)


def connect(addr: tuple[str, int], timeout: float = 10) -> socket.socket:
    return socket.create_connection(addr, timeout=timeout)


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    rest: bytes = b""
    raw_head: bytes = field(default=b"", repr=False)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def _recv_more(sock: socket.socket, buf: bytes) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("connection closed while reading response")
    return buf + data


def read_response(sock: socket.socket, buf: bytes = b"", head: bool = False) -> RawResponse:
    """Read exactly one HTTP/1.x response from ``sock`` (``buf`` holds bytes already read)."""
    while b"\r\n\r\n" not in buf:
        buf = _recv_more(sock, buf)
    raw_head, buf = buf.split(b"\r\n\r\n", 1)
    lines = raw_head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1])
    reason = parts[2] if len(parts) > 2 else ""
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.append((k.strip(), v.strip()))
    hmap = {k.lower(): v for k, v in headers}
    if head or status in (204, 304) or 100 <= status < 200:
        return RawResponse(status, reason, headers, b"", buf, raw_head)
    if "chunked" in hmap.get("transfer-encoding", "").lower():
        body = b""
        while True:
            while b"\r\n" not in buf:
                buf = _recv_more(sock, buf)
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                buf = _recv_more(sock, buf)
            body += buf[:size]
            buf = buf[size + 2 :]
            if size == 0:
                # (no trailers expected from our upstreams)
                return RawResponse(status, reason, headers, body, buf, raw_head)
    if "content-length" in hmap:
        n = int(hmap["content-length"])
        while len(buf) < n:
            buf = _recv_more(sock, buf)
        return RawResponse(status, reason, headers, buf[:n], buf[n:], raw_head)
    # close-delimited
    while True:
        data = sock.recv(65536)
        if not data:
            return RawResponse(status, reason, headers, buf, b"", raw_head)
        buf += data


def read_until_close(sock: socket.socket, timeout: float = 10) -> bytes:
    """Read until EOF (or RST); raise AssertionError if the peer keeps it open past timeout."""
    sock.settimeout(timeout)
    buf = b""
    try:
        while data := sock.recv(65536):
            buf += data
    except ConnectionResetError:
        pass
    except TimeoutError as exc:
        raise AssertionError(f"connection not closed within {timeout}s; got {buf[:200]!r}") from exc
    return buf


def is_closed(sock: socket.socket, timeout: float) -> bool:
    try:
        read_until_close(sock, timeout)
        return True
    except AssertionError:
        return False


# ---------------------------------------------------------------------------- metrics

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Metrics:
    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE_RE.match(line)
            if not m:
                continue
            labels = dict(_LABEL_RE.findall(m.group(3) or ""))
            self.samples.append((m.group(1), labels, float(m.group(4))))

    def names(self) -> set[str]:
        return {name for name, _, _ in self.samples}

    def get(self, name: str, **labels: str) -> float:
        """Sum of all samples named ``name`` whose labels include ``labels`` (0 if none)."""
        return sum(
            value
            for n, lbls, value in self.samples
            if n == name and all(lbls.get(k) == str(v) for k, v in labels.items())
        )

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(lbls, value) for n, lbls, value in self.samples if n == name]


def eventually(check, timeout: float = 5.0, interval: float = 0.05):
    """Run ``check`` until it passes; after ``timeout`` re-raise its failure.

    ``check`` passes when it neither raises AssertionError nor returns ``False``, so a
    plain predicate (``lambda: x in text``) waits and fails like an assertion would.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result is False:
                raise AssertionError(f"{getattr(check, '__name__', 'check')} stayed false")
            return result
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(interval)
