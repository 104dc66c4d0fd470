"""Opaque TCP listeners: bytes both ways, half-close, round robin, byte metrics."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections import Counter

from helpers import config, connect, eventually, read_until_close
from servers import echo_handler, half_close_handler, named_echo_handler


def tcp_config(endpoints: list[str], lb: str | None = None) -> dict:
    cluster = {"name": "tcpback", "endpoints": endpoints}
    if lb:
        cluster["lb"] = lb
    listener = {"name": "raw", "listen": "127.0.0.1:0", "protocol": "tcp", "cluster": "tcpback"}
    return config([listener], [cluster])


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(min(65536, n - len(buf)))
        assert data, f"connection closed after {len(buf)} of {n} bytes"
        buf += data
    return bytes(buf)


def test_tcp_bytes_both_ways(run_proxy, tcp_server):
    server = tcp_server(echo_handler)
    proxy = run_proxy(tcp_config([server.addr]))
    payload = os.urandom(4 << 20)
    with connect(proxy.addr("raw")) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        echoed = recv_exactly(sock, len(payload))
        sender.join()
        # a second exchange on the same connection
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
    assert echoed == payload


def test_tcp_half_close_reply_after_eof(run_proxy, tcp_server):
    server = tcp_server(half_close_handler)
    proxy = run_proxy(tcp_config([server.addr]))
    payload = os.urandom(300_000)
    with connect(proxy.addr("raw")) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # upstream must see EOF, yet still be able to answer
        reply = read_until_close(sock, timeout=10)
    assert reply == f"got {len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()


def test_tcp_round_robin_over_two_endpoints(run_proxy, tcp_server):
    one = tcp_server(named_echo_handler(b"one"))
    two = tcp_server(named_echo_handler(b"two"))
    proxy = run_proxy(tcp_config([one.addr, two.addr], lb="round_robin"))
    counts: Counter = Counter()
    for _ in range(10):
        with connect(proxy.addr("raw")) as sock:
            name = sock.makefile("rb").readline().strip().decode()
            counts[name] += 1
    assert counts == {"one": 5, "two": 5}


def test_tcp_upstream_refused_closes_client_connection(run_proxy, free_port):
    proxy = run_proxy(tcp_config([f"127.0.0.1:{free_port()}"]))
    with connect(proxy.addr("raw")) as sock:
        sock.sendall(b"hello?")
        assert read_until_close(sock, timeout=10) == b""


def test_tcp_connection_and_byte_metrics(run_proxy, tcp_server):
    server = tcp_server(echo_handler)
    proxy = run_proxy(tcp_config([server.addr]))
    before = proxy.metrics()
    sent = received = 0
    for size in (1000, 50_000, 123_457):
        with connect(proxy.addr("raw")) as sock:
            data = os.urandom(size)
            sock.sendall(data)
            assert recv_exactly(sock, size) == data
            sent += size
            received += size
            sock.sendall(b"xyz")  # 3 bytes in, 3 bytes out
            assert recv_exactly(sock, 3) == b"xyz"
            sent += 3
            received += 3

    def delta(m, name):
        return m.get(name, listener="raw") - before.get(name, listener="raw")

    def settled():
        m = proxy.metrics()
        assert delta(m, "tcp_close_total") == 3
        assert delta(m, "tcp_read_bytes_total") == sent
        assert delta(m, "tcp_write_bytes_total") == received
        return m

    m = eventually(settled)
    assert delta(m, "tcp_open_total") == 3
    assert m.get("tcp_open_connections", listener="raw") == 0
