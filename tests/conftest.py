"""Fixtures for the meshpy integration tests.

Everything runs on loopback with ephemeral ports.  ``run_proxy(config_dict)`` starts
``python -m meshpy proxy -c <tmp>/sidecar.yaml`` and waits for its ready line; every
process and server a test starts is stopped when the test ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import Metrics
from servers import GrpcUpstream, HttpUpstream, TcpServer, wait_for

READY_PREFIX = "meshpy proxy ready:"
READY_TIMEOUT = 20.0


def meshpy_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshpy", *args]


def _parse_addr(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class Proxy:
    """A running ``meshpy proxy`` subprocess."""

    def __init__(self, config: dict, workdir: Path, args: list[str]) -> None:
        self.workdir = workdir
        self.config_path = workdir / "sidecar.yaml"
        self.config = config
        self.write_config(config)
        self.stderr_path = workdir / "proxy.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            meshpy_cmd("proxy", "-c", str(self.config_path), *args),
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=workdir,
        )
        self.pid = self.proc.pid
        self.stdout_lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                code = self.proc.poll()
                self.kill()
                raise RuntimeError(
                    f"meshpy proxy did not become ready (exit code {code}).\n"
                    f"stdout: {self.stdout_lines!r}\nstderr:\n{self.stderr()}"
                )
        ready = next(line for line in self.stdout_lines if line.startswith(READY_PREFIX))
        self.addrs: dict[str, tuple[str, int]] = {}
        for token in ready[len(READY_PREFIX) :].split():
            name, _, addr = token.partition("=")
            self.addrs[name] = _parse_addr(addr)
        self.admin_addr = self.addrs.pop("admin")
        self.admin_url = f"http://{self.admin_addr[0]}:{self.admin_addr[1]}"

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line.rstrip("\n"))
            if line.startswith(READY_PREFIX):
                self._ready.set()

    # -- addresses
    def addr(self, listener: str = "edge") -> tuple[str, int]:
        return self.addrs[listener]

    def url(self, listener: str = "edge", scheme: str = "http") -> str:
        host, port = self.addrs[listener]
        return f"{scheme}://{host}:{port}"

    # -- admin
    def admin_get(self, path: str) -> httpx.Response:
        with httpx.Client(trust_env=False, timeout=5) as c:
            return c.get(self.admin_url + path)

    def metrics(self) -> Metrics:
        r = self.admin_get("/metrics")
        assert r.status_code == 200, r.text
        return Metrics(r.text)

    def config_version(self) -> int:
        return int(self.admin_get("/config").json()["version"])

    # -- config / reload
    def write_config(self, config: dict) -> None:
        """Replace the config file atomically (write + rename, as editors and k8s do)."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(tmp, self.config_path)
        self.config = config

    def write_raw_config(self, text: str) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def reload(self, config: dict, *, sighup: bool = False, timeout: float = 5.0) -> int:
        """Write ``config``, optionally SIGHUP, and wait until /config's version moves on."""
        before = self.config_version()
        self.write_config(config)
        if sighup:
            self.proc.send_signal(signal.SIGHUP)
        return wait_for(
            lambda: (v := self.config_version()) > before and v,
            timeout,
            f"config version to move past {before}",
        )

    # -- lifecycle
    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for exit; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            self._stderr.close()
        self._reader.join(2)
        if self.proc.stdout:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def free_port() -> Callable[[], int]:
    """Return a function giving a currently free loopback port (bind-to-0 then release)."""

    def get() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return get


@pytest.fixture
def run_proxy(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Proxy]]:
    started: list[Proxy] = []

    def start(config: dict, *args: str, files: dict[str, str] | None = None) -> Proxy:
        """Start a proxy; `files` (name -> text) are written next to its config first."""
        workdir = tmp_path / f"proxy{len(started)}"
        workdir.mkdir()
        for name, text in (files or {}).items():
            (workdir / name).write_text(text)
        proxy = Proxy(config, workdir, list(args))
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        if proxy.proc.poll() is None:
            proxy.stop(timeout=5)
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            tail = proxy.stderr()[-4000:]
            print(f"\n--- proxy {proxy.pid} stderr (tail) ---\n{tail}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.when == "call":
        item.rep_call = rep
    return rep


class UpstreamPool:
    """Session-wide hypercorn upstreams, started on first use and shared between tests."""

    def __init__(self) -> None:
        self._servers: dict[tuple[str, int], HttpUpstream] = {}
        self._lock = threading.Lock()

    def get(self, name: str, delay_ms: int = 0) -> HttpUpstream:
        with self._lock:
            key = (name, delay_ms)
            if key not in self._servers:
                self._servers[key] = HttpUpstream(name, delay_ms)
            return self._servers[key]

    def many(self, *names: str) -> list[HttpUpstream]:
        threads = [threading.Thread(target=self.get, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [self.get(n) for n in names]

    def stop(self) -> None:
        for server in self._servers.values():
            server.stop()


@pytest.fixture(scope="session")
def upstreams() -> Iterator[UpstreamPool]:
    pool = UpstreamPool()
    yield pool
    pool.stop()


@pytest.fixture
def upstream(upstreams: UpstreamPool) -> HttpUpstream:
    """The default shared echo upstream ``a``."""
    return upstreams.get("a")


@pytest.fixture
def tcp_server() -> Iterator[Callable[..., TcpServer]]:
    servers: list[TcpServer] = []

    def start(handler, backlog: int = 128) -> TcpServer:
        server = TcpServer(handler, backlog)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def grpc_upstream() -> Iterator[GrpcUpstream]:
    server = GrpcUpstream()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed cert for 127.0.0.1/localhost (openssl CLI); returns (cert, key)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "server.pem", d / "server.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


__all__ = ["Proxy", "meshpy_cmd", "wait_for"]
