"""Helpers for mesh tests with real processes: a control plane, sidecars joined to it, apps.

Everything runs on loopback with ephemeral ports. A `Mesh` owns every process and directory
it starts and stops them all in `close()`:

    mesh = Mesh(tmp_path)
    cp = mesh.control_plane("--lease-ttl", "2s")
    app, sidecar = mesh.shop("payments")           # app on a free port behind a sidecar
    sidecar.outbound_url                             # http://127.0.0.1:PORT for Host: routing
    mesh.close()
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml
from cp import ControlPlaneProcess
from cryptography import x509
from helpers import Metrics, eventually

__all__ = [
    "EchoApp",
    "Mesh",
    "Process",
    "ShopApp",
    "SidecarProcess",
    "Traffic",
    "bootstrap",
    "free_port",
    "meshpy",
]

READY_TIMEOUT = 20.0  # seconds a process may take to print its ready line
PROXY_READY = "meshpy proxy ready:"
SHOP_READY = re.compile(r"meshpy shop: \S+ listening on (\S+)")


def meshpy(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshpy", *args]


def free_port() -> int:
    """A port free right now (for an app whose sidecar must know it before it starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bootstrap(
    url: str | list[str],
    ca_bundle: Path,
    token_file: str,
    service: str,
    namespace: str,
    app: str,
    state_dir: str,
) -> str:
    """The YAML of a sidecar's bootstrap file (`meshpy proxy -c FILE`), every listener on an
    ephemeral loopback port; `url` is one control plane or several replicas, tried in order."""
    return yaml.safe_dump(
        {
            "control_plane": {"url": url, "ca_bundle": str(ca_bundle), "token_file": token_file},
            "service": service,
            "namespace": namespace,
            "app": app,
            "inbound": {"listen": "127.0.0.1:0"},
            "outbound": {"listen": "127.0.0.1:0"},
            "admin": {"listen": "127.0.0.1:0"},
            "state_dir": state_dir,
        }
    )


def _address(value: str) -> str:
    host, _, port = value.rpartition(":")
    return f"{host.strip('[]')}:{int(port)}"


class Process:
    """A subprocess whose stdout is read on a thread (so it never blocks on a full pipe) and
    whose stderr goes to a file, shown when it fails to start."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.stdout: list[str] = []
        self.stderr_path = workdir / f"{name}.stderr"
        self._line = threading.Condition()
        with open(self.stderr_path, "ab") as stderr:
            self.proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=workdir,
                env={**os.environ, **env},
            )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._line:
                self.stdout.append(line.rstrip("\n"))
                self._line.notify_all()
        with self._line:
            self._line.notify_all()

    def wait_line(self, match: Callable[[str], Any]) -> Any:
        """The first truthy `match(line)` of stdout; fails if the process exits or is slow."""
        deadline = time.monotonic() + READY_TIMEOUT
        with self._line:
            while True:
                for line in self.stdout:
                    if found := match(line):
                        return found
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.proc.kill()  # a slow starter is not left behind
                    raise RuntimeError(
                        f"{self.name} did not become ready (exit code {self.proc.poll()})\n"
                        f"stdout: {self.stdout!r}\nstderr:\n{self.stderr()[-8000:]}"
                    )
                self._line.wait(0.1)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no goodbye to anyone."""
        if self.alive():
            self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait for the exit status (killed if it does not stop in time)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


class SidecarProcess:
    """`meshpy proxy -c FILE` for a bootstrap FILE naming the control plane."""

    def __init__(
        self,
        workdir: Path,
        cp: ControlPlaneProcess,
        service: str,
        namespace: str,
        app: str,
        token: str,
        name: str,
    ) -> None:
        self.workdir = workdir
        self.name = name
        self.service = service
        self.state_dir = workdir / "state" / name
        self.bootstrap = workdir / f"{name}.yaml"
        token_file = workdir / f"{name}.token"
        token_file.write_text(token + "\n")
        self.bootstrap.write_text(
            bootstrap(
                cp.url, cp.ca_bundle, token_file.name, service, namespace, app, f"state/{name}"
            )
        )
        self.process: Process | None = None
        self.addresses: dict[str, str] = {}
        self.start()

    def start(self) -> None:
        """Start (again, on the same state_dir) and wait until admin /ready answers 200."""
        self.process = Process(
            f"sidecar-{self.name}", meshpy("proxy", "-c", str(self.bootstrap)), self.workdir, {}
        )
        ready = self.process.wait_line(lambda line: line.startswith(PROXY_READY) and line)
        self.addresses = {
            key: _address(value)
            for key, _, value in (t.partition("=") for t in ready[len(PROXY_READY) :].split())
        }
        eventually(self.ready, timeout=10)

    def ready(self) -> bool:
        try:
            return httpx.get(self.admin_url + "/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def inbound(self) -> str:
        return self.addresses["inbound"]

    @property
    def outbound_url(self) -> str:
        return f"http://{self.addresses['outbound']}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.addresses['admin']}"

    def config(self) -> dict[str, Any]:
        """The config the agent last applied (state_dir/sidecar.yaml)."""
        return yaml.safe_load((self.state_dir / "sidecar.yaml").read_text())

    def endpoints(self, service: str, namespace: str) -> list[str]:
        """The endpoints of `service` in the applied config ([] when it has no cluster)."""
        name = f"{service}.{namespace}"
        for cluster in self.config()["clusters"]:
            if cluster["name"] == name:
                return cluster["endpoints"]
        return []

    def applied_version(self) -> int | None:
        """The control plane's version the agent last logged as applied."""
        found = re.findall(r"meshpy\.agent: config version (\d+) applied", self.stderr())
        return int(found[-1]) if found else None

    def cert_serial(self) -> int:
        pem = (self.state_dir / "identity" / "cert.pem").read_bytes()
        return x509.load_pem_x509_certificate(pem).serial_number

    def served_serial(self, client: SidecarProcess) -> int:
        """The serial of the certificate this sidecar's inbound presents now, to a fresh
        mTLS connection made with `client`'s identity."""
        identity = client.state_dir / "identity"
        tls = ssl.create_default_context(cafile=identity / "bundle.pem")
        tls.check_hostname = False  # SPIFFE certificates name a URI, not a host
        tls.load_cert_chain(identity / "cert.pem", identity / "key.pem")
        host, _, port = self.inbound.rpartition(":")
        with (
            socket.create_connection((host, int(port)), timeout=5) as raw,
            tls.wrap_socket(raw) as conn,
        ):
            der = conn.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    def metrics(self) -> Metrics:
        return Metrics(httpx.get(self.admin_url + "/metrics", timeout=5).text)

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()

    def terminate(self) -> int:
        assert self.process is not None
        return self.process.terminate()

    def stderr(self) -> str:
        return self.process.stderr() if self.process else ""


class ShopApp:
    """`python -m meshpy.shop SERVICE` as a subprocess."""

    def __init__(self, workdir: Path, service: str, listen: str, outbound: str | None) -> None:
        argv = [sys.executable, "-m", "meshpy.shop", service, "--listen", listen]
        if outbound:
            argv += ["--outbound", outbound]
        self.process = Process(f"shop-{service}-{listen.rpartition(':')[2]}", argv, workdir, {})
        self.address = _address(
            self.process.wait_line(lambda line: (m := SHOP_READY.search(line)) and m[1])
        )
        self.url = f"http://{self.address}"

    def stop(self) -> None:
        self.process.terminate()


class EchoApp:
    """An in-process app answering every request with its name and the headers it got, as
    JSON, and `x-instance: NAME`: tells instances apart and shows what the sidecar added."""

    def __init__(self, name: str) -> None:
        self.name = name

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # head and body are two writes: no 40 ms stalls

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                body = json.dumps(
                    {"instance": name, "path": self.path, "headers": dict(self.headers)}
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.send_header("x-instance", name)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Traffic:
    """A client loop on a thread: one request after another until `stop()`, counting every
    answer that is not 200 (or no answer at all) as a failure."""

    def __init__(self, url: str, host: str, pause: float = 0.01) -> None:
        self.url = url
        self.host = host
        self.pause = pause
        self.ok = 0
        self.failures: list[str] = []
        self.instances: dict[str, int] = {}  # x-instance of the answers (echo apps)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(trust_env=False, timeout=5) as client:
            while not self._stop.is_set():
                try:
                    response = client.get(self.url, headers={"host": self.host})
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                else:
                    if response.status_code == 200:
                        self.ok += 1
                        instance = response.headers.get("x-instance", "")
                        self.instances[instance] = self.instances.get(instance, 0) + 1
                    else:
                        self.failures.append(f"{response.status_code}: {response.text[:200]}")
                self._stop.wait(self.pause)

    def stop(self) -> Traffic:
        self._stop.set()
        self._thread.join(10)
        return self


class Mesh:
    """Owns the processes and apps of one test mesh; `close()` stops them all.

    Sidecars and apps may be started from several threads at once (startup is mostly
    Python's import time, so starting them side by side keeps tests fast)."""

    def __init__(self, workdir: Path, namespace: str = "shop") -> None:
        self.workdir = workdir
        self.namespace = namespace
        self.cp: ControlPlaneProcess | None = None
        self.sidecars: list[SidecarProcess] = []
        self.apps: list[ShopApp | EchoApp] = []
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()

    def control_plane(self, *args: str) -> ControlPlaneProcess:
        """A started control plane (`tests/cp.py`) with its data in the work directory."""
        self.cp = ControlPlaneProcess(*args, data_dir=self.workdir / "cp-data").start()
        return self.cp

    def token(self, service: str) -> str:
        """One join token per service, shared by its instances (as a deployment would)."""
        assert self.cp is not None
        with self._lock:
            if service not in self._tokens:
                self._tokens[service] = self.cp.token(service, self.namespace)
            return self._tokens[service]

    def sidecar(self, service: str, app: str, name: str | None = None) -> SidecarProcess:
        assert self.cp is not None
        name = name or service
        sidecar = SidecarProcess(
            self.workdir, self.cp, service, self.namespace, app, self.token(service), name
        )
        with self._lock:
            self.sidecars.append(sidecar)
        return sidecar

    def shop(self, service: str, name: str | None = None) -> tuple[ShopApp, SidecarProcess]:
        """A shop app behind its sidecar. The app's port is chosen first: the sidecar needs it,
        and the app needs the sidecar's outbound address."""
        port = free_port()
        sidecar = self.sidecar(service, f"127.0.0.1:{port}", name)
        app = ShopApp(self.workdir, service, f"127.0.0.1:{port}", sidecar.addresses["outbound"])
        with self._lock:
            self.apps.append(app)
        return app, sidecar

    def echo(self, service: str, name: str) -> tuple[EchoApp, SidecarProcess]:
        """An echo app named `name` behind a sidecar of `service`."""
        app = EchoApp(name)
        with self._lock:
            self.apps.append(app)
        return app, self.sidecar(service, app.address, name)

    def logs(self) -> str:
        """The stderr tails of the control plane and every sidecar (for a failed test)."""
        stderrs = [(s.process.name, s.process.stderr()) for s in self.sidecars if s.process]
        if self.cp is not None:
            stderrs.append(("control-plane", self.cp.stderr()))
        return "".join(f"\n--- {name} stderr (tail) ---\n{text[-3000:]}" for name, text in stderrs)

    def close(self) -> None:
        """Stop everything and remove the work directory."""
        for sidecar in self.sidecars:
            if sidecar.alive():
                sidecar.kill()
        for app in self.apps:
            app.stop()
        if self.cp is not None:
            self.cp.kill()
            self.cp.close()  # its logs
        shutil.rmtree(self.workdir, ignore_errors=True)
