"""A real etcd cluster for tests: N members on loopback ephemeral ports in temp data dirs.

    with EtcdCluster(3) as cluster:
        store = EtcdStore.from_url(cluster.url)
        cluster.kill(0)

Call ``require_etcd()`` first in a test or fixture: it skips with a clear reason when the
``etcd`` binary is not on PATH.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx
import pytest

__all__ = ["EtcdCluster", "require_etcd"]

_START_TIMEOUT = 15.0  # seconds for every member to report healthy
_START_ATTEMPTS = 3  # a free port can be taken between picking it and etcd binding it


def require_etcd() -> str:
    """The path of the etcd binary; skips the calling test when there is none."""
    path = shutil.which("etcd")
    if path is None:
        pytest.skip("etcd is not installed (no `etcd` on PATH); install etcd-server to run this")
    return path


def _free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out; all held open together so they differ."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


class EtcdCluster:
    """`size` etcd members forming one new cluster; stopped and deleted on exit."""

    def __init__(self, size: int = 1) -> None:
        self.size = size
        self.endpoints: list[str] = []  # "127.0.0.1:port" client addresses, member order
        self._procs: list[subprocess.Popen[bytes]] = []
        self._dir: Path | None = None

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(self.endpoints)

    def start(self) -> EtcdCluster:
        binary = require_etcd()
        for attempt in range(_START_ATTEMPTS):
            try:
                self._launch(binary)
                self._wait_healthy()
                return self
            except RuntimeError:
                self.stop()
                if attempt == _START_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def kill(self, index: int) -> None:
        """SIGKILL member `index`, as a crash would."""
        proc = self._procs[index]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self._procs = []
        self.endpoints = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _launch(self, binary: str) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="meshpy-etcd-"))
        ports = _free_ports(2 * self.size)
        client_ports, peer_ports = ports[: self.size], ports[self.size :]
        names = [f"m{i}" for i in range(self.size)]
        initial_cluster = ",".join(
            f"{name}=http://127.0.0.1:{port}" for name, port in zip(names, peer_ports, strict=True)
        )
        self.endpoints = [f"127.0.0.1:{port}" for port in client_ports]
        for name, client_port, peer_port in zip(names, client_ports, peer_ports, strict=True):
            client_url = f"http://127.0.0.1:{client_port}"
            peer_url = f"http://127.0.0.1:{peer_port}"
            flags = {
                "--name": name,
                "--data-dir": str(self._dir / name),
                "--listen-client-urls": client_url,
                "--advertise-client-urls": client_url,
                "--listen-peer-urls": peer_url,
                "--initial-advertise-peer-urls": peer_url,
                "--initial-cluster": initial_cluster,
                "--initial-cluster-state": "new",
                "--initial-cluster-token": self._dir.name,
                # Fast elections so the cluster forms (and fails over) in well under 1 s.
                "--heartbeat-interval": "50",
                "--election-timeout": "500",
            }
            with open(self._dir / f"{name}.log", "wb") as log:  # the child keeps its own fd
                self._procs.append(
                    subprocess.Popen(
                        [binary, *(part for flag in flags.items() for part in flag)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )

    def _wait_healthy(self) -> None:
        """Every member answers /health with a leader elected; RuntimeError when one dies."""
        deadline = time.monotonic() + _START_TIMEOUT
        pending = set(range(self.size))
        with httpx.Client(timeout=1.0) as client:
            while pending:
                for index in sorted(pending):
                    if self._procs[index].poll() is not None:
                        raise RuntimeError(f"etcd member m{index} exited: {self._log_tail(index)}")
                    with contextlib.suppress(httpx.HTTPError, ValueError):
                        reply = client.get(f"http://{self.endpoints[index]}/health")
                        if reply.json().get("health") == "true":
                            pending.discard(index)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd members {sorted(pending)} not healthy in time")
                if pending:
                    time.sleep(0.05)

    def _log_tail(self, index: int) -> str:
        assert self._dir is not None
        path = self._dir / f"m{index}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else "(no log)"
