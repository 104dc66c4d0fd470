"""The processes a benchmark talks to: the upstream, the proxies under test, their configs.

Every process is started in its own directory and its own session (process group), so that
``Service.stop`` ends it together with any workers it forked.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
SMALL_BODY = b"x" * 99 + b"\n"  # 100 bytes
LARGE_PATH = "/64k"
LARGE_SIZE = 64 * 1024

# Executable -> Debian package that provides it.
TOOLS: dict[str, str] = {
    "nginx": "nginx",
    "haproxy": "haproxy",
    "wrk": "wrk",
    "h2load": "nghttp2-client",
}

SYSTEMS = ("direct", "meshpy", "nginx", "haproxy")
TLSLOAD_PACKAGE = "meshpy-tlsload"  # bench/tlsload: the TLS handshake client
OPENLOAD_PACKAGE = "meshpy-openload"  # bench/openload: evenly spaced HTTP/1.1 requests


class PeerError(RuntimeError):
    """A peer is missing, misconfigured, or did not start."""


# --------------------------------------------------------------------------- tools


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def ensure_tools(install: bool) -> None:
    """Make sure nginx, haproxy, wrk and h2load are on PATH, installing them if allowed."""
    missing = missing_tools()
    if not missing:
        return
    packages = sorted({TOOLS[tool] for tool in missing})
    command = ["apt-get", "install", "-y", *packages]
    can_install = install and os.geteuid() == 0 and shutil.which("apt-get") is not None
    if not can_install:
        raise PeerError(
            f"missing tools: {', '.join(missing)}; install them with:\n"
            f"  sudo apt-get update && sudo {' '.join(command)}"
        )
    print(f"installing {' '.join(packages)} ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(command, check=True, env=env)
    still_missing = missing_tools()
    if still_missing:
        raise PeerError(f"still missing after install: {', '.join(still_missing)}")


@functools.cache
def tlsload_binary() -> Path:
    """``bench/tlsload`` built in release mode (cargo does nothing if it is fresh); its path.

    openssl s_time and wrk cannot load one server core with full handshakes from the other
    core (s_time runs one connection at a time, wrk resumes sessions), so the handshake
    measurements use this rustls client.
    """
    return _bench_binary(TLSLOAD_PACKAGE)


def openload_binary() -> Path:
    """``bench/openload``, the evenly spaced load of ``--latency-load open``; its path.

    h2load ``--rps`` starts every connection's timer at once, so its requests arrive in
    bursts of one per connection; this client sends them ``1/rate`` apart.
    """
    return _bench_binary(OPENLOAD_PACKAGE)


@functools.cache
def _bench_binary(package: str) -> Path:
    """A package of the workspace built in release mode, once per process; its executable."""
    if shutil.which("cargo") is None:
        raise PeerError(
            f"cargo is needed to build {package}, a load client of the bench (https://rustup.rs)"
        )
    repo = Path(__file__).resolve().parent.parent
    command = ["cargo", "build", "--release", "-p", package, "--message-format", "json"]
    print(f"building {package} (cargo build --release) ...", flush=True)
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        raise PeerError(f"building {package} failed:\n{done.stderr[-3000:]}")
    for line in done.stdout.splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message.get("executable"):
            if message["target"]["name"] == package:
                return Path(message["executable"])
    raise PeerError(f"cargo built {package} but named no executable")


def tool_versions() -> dict[str, str]:
    probes = {
        "nginx": ["nginx", "-v"],
        "haproxy": ["haproxy", "-v"],
        "wrk": ["wrk", "-v"],
        "h2load": ["h2load", "--version"],
    }
    versions: dict[str, str] = {}
    for name, argv in probes.items():
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            versions[name] = "unavailable"
            continue
        text = (done.stdout + done.stderr).strip()
        versions[name] = text.splitlines()[0] if text else "unknown"
    return versions


def meshpy_info() -> dict[str, object] | None:
    """meshpy's version, the commit its extension was built from, and the extension file,
    if ``meshpy._core`` imports here, else None."""
    code = (
        "import meshpy, meshpy._core as core; "
        "print(getattr(meshpy, '__version__', 'unknown')); "
        "print(getattr(core, 'build_revision', 'unknown')); print(core.__file__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    version, build_revision, extension = done.stdout.strip().splitlines()[-3:]
    path = Path(extension)
    return {
        "version": version,
        "build_revision": build_revision,
        "extension": path.name,
        "path": str(path),
        "extension_mib": round(path.stat().st_size / 2**20, 1),
        "extension_mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(path.stat().st_mtime)),
        "debug_info": "debug_info" in elf_section_names(path),
    }


def elf_section_names(path: Path) -> set[str]:
    """Section names of a 64-bit little-endian ELF file (empty if it is not one)."""
    with path.open("rb") as elf:
        head = elf.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return set()
        shoff = int.from_bytes(head[0x28:0x30], "little")
        shentsize, shnum, shstrndx = (
            int.from_bytes(head[i : i + 2], "little") for i in (0x3A, 0x3C, 0x3E)
        )
        elf.seek(shoff)
        table = elf.read(shentsize * shnum)
        headers = [table[i * shentsize : (i + 1) * shentsize] for i in range(shnum)]
        strings = headers[shstrndx]
        elf.seek(int.from_bytes(strings[0x18:0x20], "little"))
        names = elf.read(int.from_bytes(strings[0x20:0x28], "little"))
    result = set()
    for header in headers:
        start = int.from_bytes(header[0:4], "little")
        result.add(names[start : names.index(b"\0", start)].decode(errors="replace").lstrip("."))
    return result


def meshpy_command() -> list[str]:
    """How to run the ``meshpy`` CLI that belongs to this interpreter."""
    beside = Path(sys.executable).parent / "meshpy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    code = "import sys; from meshpy.cli import main; sys.argv[0] = 'meshpy'; sys.exit(main())"
    return [sys.executable, "-c", code]


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def tree_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process and all its descendants, in seconds."""
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent pid, cpu seconds)
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # The command name may hold spaces; the fields after its closing parenthesis do not.
        fields = text[text.rindex(")") + 2 :].split()
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    tree, total = {pid}, 0.0
    for _ in range(8):  # a few generations are plenty for master/worker servers
        tree |= {child for child, (parent, _) in stats.items() if parent in tree}
    for member in tree:
        total += stats.get(member, (0, 0.0))[1]
    return total


def pin_prefix(cpus: str | None) -> list[str]:
    """A ``taskset`` prefix that pins a command to ``cpus`` (e.g. "1" or "0,1"), if given."""
    return ["taskset", "-c", cpus] if cpus else []


@dataclass(frozen=True)
class Creds:
    """A workload certificate (chain), its key, and the CA bundle its peers chain to."""

    cert: Path
    key: Path
    bundle: Path


@dataclass
class Service:
    """One child process with its own working directory and log files."""

    name: str
    port: int
    argv: list[str]
    workdir: Path
    ready_text: str | None = None  # a line that must appear on stdout before it is ready
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def stdout_path(self) -> Path:
        return self.workdir / "stdout.log"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "stderr.log"

    def start(self, timeout: float = 20.0) -> None:
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},  # so a ready line is seen at once
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerError(
                    f"{self.name} exited with code {self.proc.returncode}\n{self.log_tail()}"
                )
            if self._port_open() and self._ready_text_seen():
                return
            time.sleep(0.05)
        raise PeerError(f"{self.name} not ready after {timeout:.0f}s\n{self.log_tail()}")

    def _port_open(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _ready_text_seen(self) -> bool:
        if self.ready_text is None:
            return True
        return self.ready_text in self.stdout_path.read_text(errors="replace")

    def stop(self, grace: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def cpu_seconds(self) -> float:
        """CPU time used so far by this service's process and its descendants."""
        if self.proc is None:
            raise PeerError(f"{self.name} is not running")
        return tree_cpu_seconds(self.proc.pid)

    def log_tail(self, lines: int = 20) -> str:
        parts = []
        for path in (self.stdout_path, self.stderr_path):
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                if tail:
                    parts.append(f"--- {self.name} {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)


@dataclass
class System:
    """A configuration under test: where load is sent and the proxy process, if any."""

    name: str
    port: int
    cpu_service: Service  # whose CPU time per request is reported: the proxy, or the upstream
    service: Service | None = None

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"


def check_response(port: int, path: str, expected_size: int, timeout: float = 5.0) -> None:
    """One GET through ``port``; raises unless it is a 200 with the expected body size."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
    except OSError as exc:
        raise PeerError(f"GET {path} on port {port} failed: {exc}") from exc
    finally:
        conn.close()
    if response.status != 200 or len(body) != expected_size:
        raise PeerError(
            f"GET {path} on port {port}: status {response.status}, {len(body)} bytes "
            f"(expected 200 and {expected_size} bytes)"
        )


# --------------------------------------------------------------------------- configs


def _nginx_argv(workdir: Path, cpus: str | None) -> list[str]:
    return [
        *pin_prefix(cpus),
        "nginx",
        "-p",
        str(workdir),
        "-c",
        str(workdir / "nginx.conf"),
        "-e",
        str(workdir / "error.log"),
    ]


def _nginx_main(workdir: Path, workers: int) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}daemon off;\n"
        f"worker_processes {workers};\n"
        f"pid {workdir / 'nginx.pid'};\n"
        f"error_log {workdir / 'error.log'} warn;\n"
        "events { worker_connections 16384; }\n"
    )


def _nginx_http_common(workdir: Path) -> str:
    return (
        "    access_log off;\n"
        f"    client_body_temp_path {workdir / 'tmp-body'};\n"
        f"    proxy_temp_path {workdir / 'tmp-proxy'};\n"
        "    keepalive_requests 1000000;\n"
        "    keepalive_timeout 300s;\n"
    )


def upstream_nginx(workdir: Path, cpus: str | None = None) -> Service:
    """The origin every system forwards to: 100 B at any path, 64 KiB at /64k."""
    workdir.mkdir(parents=True)
    port = free_port()
    static = workdir / "static"
    static.mkdir()
    (static / LARGE_PATH.lstrip("/")).write_bytes(b"y" * LARGE_SIZE)
    body = SMALL_BODY.decode().rstrip("\n") + "\\n"
    conf = (
        _nginx_main(workdir, 1)
        + "http {\n"
        + _nginx_http_common(workdir)
        + "    sendfile on;\n"
        + "    server {\n"
        + f"        listen {HOST}:{port} backlog=4096;\n"
        + f"        location = {LARGE_PATH} {{\n"
        + f"            root {static};\n"
        + "            default_type application/octet-stream;\n"
        + "        }\n"
        + "        location / {\n"
        + "            default_type text/plain;\n"
        + f'            return 200 "{body}";\n'
        + "        }\n"
        + "    }\n"
        + "}\n"
    )
    (workdir / "nginx.conf").write_text(conf)
    return Service("upstream", port, _nginx_argv(workdir, cpus), workdir)


# nginx and HAProxy add the request headers meshpy adds to every request it forwards, for
# the same work per request: X-Forwarded-For, Forwarded, X-Forwarded-Proto, and an
# X-Request-ID unless the client sent one.
def nginx_proxy(
    workdir: Path,
    upstream_port: int,
    threads: int,
    cpus: str | None,
    mutual_tls: Creds | None = None,
) -> Service:
    """``mutual_tls``: the listener serves TLS 1.3 with that certificate and requires a client
    certificate chaining to its bundle, as a sidecar's ``mtls: strict`` listener does."""
    workdir.mkdir(parents=True)
    port = free_port()
    tls = (
        "        ssl_protocols TLSv1.3;\n"
        f"        ssl_certificate {mutual_tls.cert};\n"
        f"        ssl_certificate_key {mutual_tls.key};\n"
        f"        ssl_client_certificate {mutual_tls.bundle};\n"
        "        ssl_verify_client on;\n"
        "        ssl_verify_depth 3;\n"
        if mutual_tls is not None
        else ""
    )
    conf = (
        _nginx_main(workdir, threads)
        + "http {\n"
        + _nginx_http_common(workdir)
        + "    map $http_x_request_id $mesh_request_id {\n"
        + "        default $http_x_request_id;\n"
        + '        "" $request_id;\n'
        + "    }\n"
        + "    upstream origin {\n"
        + f"        server {HOST}:{upstream_port};\n"
        + "        keepalive 64;\n"
        + "        keepalive_requests 1000000;\n"
        + "        keepalive_timeout 300s;\n"
        + "    }\n"
        + "    server {\n"
        + f"        listen {HOST}:{port} backlog=4096{' ssl' if mutual_tls else ''};\n"
        + tls
        + "        location / {\n"
        + "            proxy_pass http://origin;\n"
        + "            proxy_http_version 1.1;\n"
        + '            proxy_set_header Connection "";\n'
        + "            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n"
        + '            proxy_set_header Forwarded "for=$remote_addr;proto=$scheme";\n'
        + "            proxy_set_header X-Forwarded-Proto $scheme;\n"
        + "            proxy_set_header X-Request-ID $mesh_request_id;\n"
        + "        }\n"
        + "    }\n"
        + "}\n"
    )
    (workdir / "nginx.conf").write_text(conf)
    return Service("nginx", port, _nginx_argv(workdir, cpus), workdir)


def add_h2c_listener(service: Service) -> int:
    """Give an nginx service (not yet started) a second listener speaking h2c; its port.

    nginx 1.22 cannot serve HTTP/1.1 and h2c on one plaintext port (``listen ... http2``
    makes the port HTTP/2 only), so HTTP/2 goes to a second ``listen`` of the same server.
    """
    config = service.workdir / "nginx.conf"
    text = config.read_text()
    listen = f"listen {HOST}:{service.port} backlog=4096;"
    if listen not in text:
        raise PeerError(f"{config}: no '{listen}' line to add an h2c listener next to")
    port = free_port()
    config.write_text(
        text.replace(listen, f"{listen}\n        listen {HOST}:{port} http2 backlog=4096;")
    )
    return port


def force_http1_upstream(service: Service) -> None:
    """meshpy's cluster speaks HTTP/1.1 to the upstream, as nginx and HAProxy do.

    Its default (``protocol: auto``) would forward HTTP/2 as h2c, which the upstream's
    HTTP/1.1 port does not take; the cluster is the last block of the generated config.
    """
    config = service.workdir / "sidecar.yaml"
    config.write_text(config.read_text() + "    protocol: http1\n")


def haproxy_proxy(
    workdir: Path,
    upstream_port: int,
    threads: int,
    cpus: str | None,
    maxconn: int = 4096,
    mutual_tls: Creds | None = None,
) -> Service:
    """``maxconn``: HAProxy refuses connections beyond it (the memory bench holds thousands).
    ``mutual_tls``: as for nginx, TLS 1.3 requiring a client certificate."""
    workdir.mkdir(parents=True)
    port = free_port()
    bind, proto = f"{HOST}:{port}", "http"
    if mutual_tls is not None:
        # HAProxy reads a certificate and its key from one file.
        pem = workdir / "server.pem"
        pem.write_bytes(mutual_tls.cert.read_bytes() + mutual_tls.key.read_bytes())
        bind += f" ssl crt {pem} ca-file {mutual_tls.bundle} verify required ssl-min-ver TLSv1.3"
        proto = "https"
    conf = (
        "global\n"
        f"    nbthread {threads}\n"
        f"    maxconn {maxconn}\n"
        "defaults\n"
        "    mode http\n"
        "    option http-keep-alive\n"
        "    timeout connect 5s\n"
        "    timeout client 300s\n"
        "    timeout server 300s\n"
        "    timeout http-keep-alive 300s\n"
        "frontend bench\n"
        f"    bind {bind}\n"
        "    default_backend origin\n"
        "backend origin\n"
        "    http-reuse always\n"
        "    option forwardfor\n"
        f'    http-request set-header Forwarded "for=%[src];proto={proto}"\n'
        f"    http-request set-header X-Forwarded-Proto {proto}\n"
        "    http-request set-header X-Request-ID %[uuid]"
        " unless { req.hdr(x-request-id) -m found }\n"
        f"    server origin {HOST}:{upstream_port}\n"
    )
    config = workdir / "haproxy.cfg"
    config.write_text(conf)
    argv = [*pin_prefix(cpus), "haproxy", "-db", "-f", str(config)]
    return Service("haproxy", port, argv, workdir)


def meshpy_proxy(workdir: Path, upstream_port: int, threads: int, cpus: str | None) -> Service:
    workdir.mkdir(parents=True)
    port, admin = free_port(), free_port()
    conf = (
        f"admin: {{listen: {HOST}:{admin}}}\n"
        "listeners:\n"
        "  - name: bench\n"
        f"    listen: {HOST}:{port}\n"
        "    protocol: http\n"
        "    routes:\n"
        "      - match: {path_prefix: /}\n"
        "        cluster: upstream\n"
        "clusters:\n"
        "  - name: upstream\n"
        f"    endpoints: [{HOST}:{upstream_port}]\n"
        "    lb: round_robin\n"
    )
    config = workdir / "sidecar.yaml"
    config.write_text(conf)
    argv = [
        *pin_prefix(cpus),
        *meshpy_command(),
        "proxy",
        "-c",
        str(config),
        "--workers",
        str(threads),
    ]
    return Service("meshpy", port, argv, workdir, ready_text="meshpy proxy ready:")


PROXIES = {"meshpy": meshpy_proxy, "nginx": nginx_proxy, "haproxy": haproxy_proxy}


def make_system(name: str, root: Path, upstream: Service, threads: int, cpus: str | None) -> System:
    """A system under test; its proxy (if any) is configured but not started.

    ``direct`` has no proxy, so the CPU time reported for it is the upstream's.
    """
    if name == "direct":
        return System(name, upstream.port, upstream)
    service = PROXIES[name](root / name, upstream.port, threads, cpus)
    return System(name, service.port, service, service)
