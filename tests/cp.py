"""A real `meshpy control-plane` process for tests: HTTPS on loopback, state in a data dir.

    with ControlPlaneProcess() as cp:
        cp.admin().apply([...])             # AdminClient with the admin token
        cp.apply("kind: Service ...")       # YAML text or resource dicts, through the same
        cp.request("GET", "/v1/services")   # any admin API call: the decoded answer
        cp.http().get("/v1/health")         # plain httpx, trusting the mesh CA
        cp.meshpy("get", "services")        # the CLI, pointed at this control plane
        cp.kill(); cp.restart()             # same data dir, same port

Extra arguments go to `meshpy control-plane` as given (``"--store", "etcd://..."``,
``"--ca", DIR``, ``"--cert-ttl", "1m"``, ``"--lease-ttl", "2s"``, ``"--name", "a"``).
Without `data_dir` a temporary one is used, deleted on exit (or `close()`) with the logs; a given
one is kept (several replicas over one etcd each need their own).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import yaml

from meshpy.controlplane.client import AdminClient

__all__ = ["ControlPlaneProcess"]

READY_TIMEOUT = 20.0  # seconds for the process to print its URL and answer /v1/health
STOP_TIMEOUT = 10.0
_READY = re.compile(r"meshpy control plane ready: (\S+)")
_EXPORTS = re.compile(r"export (.*)$", re.MULTILINE)


class ControlPlaneProcess:
    """One `meshpy control-plane` subprocess; `start()` (or `with`) waits until it serves."""

    def __init__(
        self,
        *extra_args: str,
        data_dir: str | os.PathLike[str] | None = None,
        listen: str = "127.0.0.1:0",
    ) -> None:
        self.extra_args = list(extra_args)
        self._workdir = Path(tempfile.mkdtemp(prefix="meshpy-cp-"))  # logs, and a default data dir
        self.data_dir = Path(data_dir) if data_dir is not None else self._workdir / "data"
        self.listen = listen
        self.url = ""
        self.ca_bundle = self.data_dir / "bundle.pem"
        self.admin_token_file = self.data_dir / "admin-token"
        self._proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    # -- lifecycle

    def start(self) -> ControlPlaneProcess:
        """Start (again: on the port of the previous run) and wait until it serves."""
        self.spawn()
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def spawn(self) -> None:
        """Start the process without waiting for it (`wait_ready()` does): replicas side by side."""
        self._starts += 1
        self.url = ""
        self.stdout_path = self._workdir / f"control-plane.{self._starts}.stdout"
        self.stderr_path = self._workdir / f"control-plane.{self._starts}.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "meshpy",
                    "control-plane",
                    "--listen",
                    self.listen,
                    "--data-dir",
                    str(self.data_dir),
                    *self.extra_args,
                ],
                stdout=out,
                stderr=err,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.url:
            self._check_alive(deadline)
            banner = self.stdout_path.read_text()
            match = _READY.search(banner)
            if match and "MESHPY_TOKEN_FILE=" in banner:
                self._read_banner(match.group(1), banner)
            else:
                time.sleep(0.05)
        # The URL is printed once the socket listens; the app (and its store) starts after.
        with self.http() as client:
            while True:
                self._check_alive(deadline)
                try:
                    if client.get("/v1/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)

    def _read_banner(self, url: str, banner: str) -> None:
        exports = dict(
            item.split("=", 1) for line in _EXPORTS.findall(banner) for item in line.split()
        )
        self.url = url
        self.ca_bundle = Path(exports["MESHPY_CA"])
        self.admin_token_file = Path(exports["MESHPY_TOKEN_FILE"])
        # A restart must come back where sidecars and clients already point.
        self.listen = url.removeprefix("https://")

    def _check_alive(self, deadline: float) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"meshpy control-plane did not become ready (exit code {self._proc.poll()})\n"
                f"stdout:\n{self.stdout_path.read_text()}\nstderr:\n{self.stderr()}"
            )

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to flush or clean up anything."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: a graceful shutdown."""
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signum)
        try:
            self._proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def send_signal(self, signum: int) -> None:
        """Send `signum` and return at once (SIGSTOP, SIGCONT: a hung host and its recovery)."""
        assert self._proc is not None
        self._proc.send_signal(signum)

    def restart(self) -> ControlPlaneProcess:
        """Stop it if it runs (SIGTERM), then start again on the same data dir and port."""
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def __enter__(self) -> ControlPlaneProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop it if it runs (SIGTERM) and delete the logs (and the data dir if temporary)."""
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    # -- clients

    @property
    def admin_token(self) -> str:
        return self.admin_token_file.read_text().strip()

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def http(self, token: str | None = None, **kwargs: object) -> httpx.Client:
        """An httpx client for this control plane; `token` adds ``Authorization: Bearer``."""
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.Client(
            base_url=self.url,
            verify=self.ssl_context(),
            headers=headers,
            timeout=10.0,
            **kwargs,  # type: ignore[arg-type]
        )

    def admin_http(self) -> httpx.Client:
        return self.http(self.admin_token)

    def admin(self) -> AdminClient:
        return AdminClient(self.url, self.admin_token, self.ca_bundle)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """An admin API call; the decoded answer (raises `ClientError` on an error status)."""
        with closing(self.admin()) as admin:
            return admin.request(method, path, body)

    def apply(self, *resources: str | Mapping[str, Any]) -> list[dict[str, Any]]:
        """Apply resources, each given as a dict or as YAML text (one or more documents)."""
        listed: list[Any] = []
        for item in resources:
            if isinstance(item, str):
                listed.extend(doc for doc in yaml.safe_load_all(item) if doc)
            else:
                listed.append(item)
        with closing(self.admin()) as admin:
            return admin.apply(listed)

    def token(self, service: str, namespace: str, ttl: str | None = None) -> str:
        """A join token for `service` (the control plane's default TTL unless `ttl` is given)."""
        body = {"service": service, "namespace": namespace}
        if ttl is not None:
            body["ttl"] = ttl
        return self.request("POST", "/v1/tokens", body)["token"]

    def sidecars(self) -> list[dict[str, Any]]:
        with closing(self.admin()) as admin:
            return admin.sidecars()

    @property
    def env(self) -> dict[str, str]:
        """The environment `meshpy apply/get/token/status` and sidecars find this one by."""
        return {
            **os.environ,
            "MESHPY_SERVER": self.url,
            "MESHPY_CA": str(self.ca_bundle),
            "MESHPY_TOKEN_FILE": str(self.admin_token_file),
        }

    def meshpy(
        self, *args: str, timeout: float = 30.0, cwd: str | os.PathLike[str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the `meshpy` CLI against this control plane (the caller checks returncode)."""
        return subprocess.run(
            [sys.executable, "-m", "meshpy", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
        )
