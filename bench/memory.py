"""``python -m bench memory``: how much memory a sidecar costs, next to nginx and HAProxy.

Each system (meshpy, nginx, HAProxy: one HTTP listener forwarding to the shared upstream nginx,
configured as in ``python -m bench``) is started alone, measured, and stopped, so the others do
not share the machine with it. RSS is summed over the process tree (nginx's master and workers;
the single ``meshpy proxy`` process, whose RSS includes the Python interpreter, because that is
what a user of the sidecar pays). Measured, in this order, on the same process but for the
last two, which each get an instance of their own:

- idle RSS right after start (after the readiness check and one GET);
- RSS growth per 1,000 idle keep-alive connections: ``--idle-connections`` client connections
  each send one request (so the proxy has allocated its per-connection state and its upstream
  pool exists) and then stay open and idle; then they are closed, to see whether RSS comes back
  within a second or two. An allocator may keep freed memory and hand it back to the OS only on
  a later allocation or trim, so a low "released" share means "not yet", not necessarily "never":
  the RSS under load, measured next on the same process, shows whether it came back later;
- RSS under sustained load: wrk keep-alive at saturation, sampled every 0.5 s;
- for ``--soak-systems`` only: a soak of ``--soak`` seconds at a fixed ``--soak-rate`` (h2load),
  sampled every ``--soak-interval`` seconds. The soak is *flat* when the least-squares slope of
  RSS over time is below 1% of the median RSS per 10 minutes: about 0.4 MB per 10 minutes for a
  40 MB sidecar. A leak of one small allocation per request (say 100 B at 1,000 req/s, 6 MB per
  minute) is far above that, while allocator noise of a few hundred KB over a soak is below it.
  A soak of a minute or less is too short for the verdict to mean much (the slope of a short
  run is dominated by the allocator settling); the suite runs 600 s;
- RSS growth per 1,000 idle HTTP/2 connections (h2c, prior knowledge; nginx on a second
  ``listen ... http2`` of the same server, as in ``python -m bench``), on a second instance of
  the proxy, so that memory the first one freed is not reused: ``--h2-connections``
  connections, each completing one GET on one stream and then left idle. It is what a sidecar
  holds for gRPC and other HTTP/2 clients' long-lived connections;
- RSS growth per 1,000 idle mutual-TLS connections, on a second instance of the proxy whose
  listener serves TLS 1.3 and requires a client certificate (meshpy: ``mtls: strict`` with a
  workload identity; nginx: ``ssl_verify_client on``; HAProxy: ``verify required``, each with
  the same certificate from a CA made for the run): ``--mtls-connections`` connections, each
  completing one GET with a client certificate and then left idle. It is what a sidecar's
  inbound listener holds for the pooled connections of the sidecars that call it.

For context, the RSS of ``python -c pass`` and of ``python -c 'import meshpy.cli, meshpy.proxy'``
(what a sidecar imports before its proxy starts) is reported, to split the sidecar's figure into
interpreter, meshpy's Python modules and the proxy itself.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import resource
import shlex
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import psutil

from bench import harness, load, mesh, peers, report

SYSTEMS = ("meshpy", "nginx", "haproxy")
TARGET_IDLE_MB = 40.0  # idle sidecar RSS, Python included
TARGET_KB_PER_CONNECTION = 50.0  # per idle keep-alive connection
FLAT_PCT_PER_10_MIN = 1.0  # a soak is flat when RSS grows by less than this share in 10 min
LOAD_SAMPLE_SECONDS = 0.5
SETTLE_SECONDS = 1.0  # let a proxy finish allocating/freeing before a reading
CONNECT_BATCH = 100  # connections opened (and requests sent) before their responses are read
SPARE_FILES = 1024  # file descriptors kept beyond the idle connections

# What a sidecar imports before its proxy starts: the baseline for "meshpy's Python modules".
SIDECAR_IMPORTS = "import meshpy.cli, meshpy.proxy"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench memory",
        description="RSS of a meshpy sidecar, nginx and HAProxy forwarding to one nginx "
        "upstream: idle, per idle keep-alive connection, under load (wrk) and over a soak "
        "at a fixed rate (h2load).",
        epilog="Quick run: --soak 60 --idle-connections 2000 --duration 5.",
    )
    parser.add_argument(
        "--systems", help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="worker threads/processes of every proxy (default 1)"
    )
    parser.add_argument(
        "--idle-connections",
        type=int,
        default=5000,
        help="idle keep-alive connections held open at once (default 5000)",
    )
    parser.add_argument(
        "--h2-connections",
        type=int,
        default=2000,
        help="idle HTTP/2 (h2c) connections held open at once (default 2000; 0 skips them)",
    )
    parser.add_argument(
        "--mtls-connections",
        type=int,
        default=2000,
        help="idle mutual-TLS connections held open at once (default 2000; 0 skips them)",
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds of wrk load (default 10)"
    )
    parser.add_argument(
        "-c", "--connections", type=int, default=50, help="wrk connections (default 50)"
    )
    parser.add_argument(
        "--soak",
        type=float,
        default=600.0,
        help="soak seconds per system in --soak-systems (default 600; 60 for a quick look; "
        "0 skips it)",
    )
    parser.add_argument(
        "--soak-systems",
        default="meshpy",
        help="comma-separated systems that get the soak (default meshpy)",
    )
    parser.add_argument(
        "--soak-rate", type=float, default=1000.0, help="soak req/s in total (default 1000)"
    )
    parser.add_argument(
        "--soak-connections", type=int, default=10, help="h2load connections (default 10)"
    )
    parser.add_argument(
        "--soak-interval", type=float, default=5.0, help="seconds between soak RSS samples"
    )
    harness.add_pin_arguments(parser, "the proxy under test")
    harness.add_output_arguments(
        parser, "memory-<timestamp>.json", "only say what to install if a tool is missing"
    )
    args = parser.parse_args(argv)
    harness.require_positive_counts(
        parser, args, ("threads", "idle_connections", "connections", "soak_connections")
    )
    if args.h2_connections < 0 or args.mtls_connections < 0:
        parser.error("--h2-connections and --mtls-connections must be 0 or more")
    if args.duration <= 0 or args.soak < 0 or args.soak_rate <= 0 or args.soak_interval <= 0:
        parser.error("--duration, --soak-rate, --soak-interval must be positive; --soak >= 0")
    args.names = harness.select_systems(parser, args.systems, SYSTEMS)
    args.soak_names = harness.select_systems(parser, args.soak_systems, SYSTEMS)
    return args


# --------------------------------------------------------------------------- measuring RSS


def tree_rss_kb(pid: int) -> int:
    """Resident memory of a process and all its descendants, in KiB."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total // 1024


def settled_rss_kb(pid: int, samples: int = 3) -> int:
    """Median of a few readings after ``SETTLE_SECONDS``, so one reading mid-change counts less."""
    time.sleep(SETTLE_SECONDS)
    readings = []
    for _ in range(samples):
        readings.append(tree_rss_kb(pid))
        time.sleep(0.2)
    return int(statistics.median(readings))


def python_rss_kb(code: str) -> int:
    """RSS of a fresh interpreter of this Python after running ``code``, in KiB."""
    probe = (
        f"{code}\n"
        "for line in open('/proc/self/status'):\n"
        "    if line.startswith('VmRSS:'):\n"
        "        print(line.split()[1])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    return int(done.stdout.split()[-1])


def least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Slope of the least-squares line through the points (0.0 if the xs do not vary)."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


def soak_summary(samples: Sequence[tuple[float, int]]) -> dict[str, Any]:
    """Slope, first-vs-last-minute growth and the flat/growing verdict of (seconds, KiB) samples.

    The windows are a minute each, or a third of the soak if it is shorter than three minutes.
    """
    times = [t for t, _ in samples]
    rss = [kb for _, kb in samples]
    slope = least_squares_slope([t / 60 for t in times], rss)
    median_kb = statistics.median(rss)
    flat_limit = median_kb * FLAT_PCT_PER_10_MIN / 100 / 10  # KiB per minute
    window = min(60.0, (times[-1] - times[0]) / 3)
    first = [kb for t, kb in samples if t <= times[0] + window]
    last = [kb for t, kb in samples if t >= times[-1] - window]
    return {
        "samples": len(samples),
        "rss_kb_first": rss[0],
        "rss_kb_last": rss[-1],
        "rss_kb_median": median_kb,
        "rss_kb_max": max(rss),
        "slope_kb_per_min": round(slope, 2),
        "flat_limit_kb_per_min": round(flat_limit, 2),
        "window_s": round(window, 1),
        "growth_first_to_last_window_kb": round(statistics.fmean(last) - statistics.fmean(first)),
        "verdict": "flat" if slope < flat_limit else "growing",
    }


def sample_while(
    pid: int, interval: float, work: Callable[[], load.LoadResult]
) -> tuple[load.LoadResult, list[tuple[float, int]]]:
    """Run ``work`` in a thread and sample the tree's RSS every ``interval`` s until it ends."""
    samples: list[tuple[float, int]] = []
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(work)
        while True:
            try:
                result = future.result(timeout=interval)
                break
            except concurrent.futures.TimeoutError:
                samples.append((round(time.monotonic() - start, 2), tree_rss_kb(pid)))
    return result, samples


# --------------------------------------------------------------------------- idle connections


def raise_open_files_limit(needed: int) -> None:
    """Lift RLIMIT_NOFILE to ``needed`` for this process and the proxies it starts after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
    except (ValueError, OSError) as exc:
        raise peers.PeerError(
            f"cannot raise the open files limit to {needed} (hard limit {hard}): {exc}; "
            "lower --idle-connections"
        ) from exc


def read_response(sock: socket.socket) -> int:
    """Read one HTTP/1.1 response with a Content-Length body; return its status code."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise peers.PeerError("connection closed before a response")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise peers.PeerError("connection closed in the middle of a response")
        body += chunk
    return int(lines[0].split()[1])


def h2_request() -> tuple[h2.connection.H2Connection, bytes]:
    """A client HTTP/2 connection's state and its first bytes: the preface, its settings and
    a GET / on stream 1."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    headers = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", peers.HOST)]
    connection.send_headers(1, headers, end_stream=True)
    return connection, connection.data_to_send()


def read_h2_response(sock: socket.socket, connection: h2.connection.H2Connection) -> int:
    """Read stream 1's response to its end, answering the server's settings; its status."""
    status = 0
    while True:
        data = sock.recv(65536)
        if not data:
            raise peers.PeerError("connection closed before an HTTP/2 response")
        for event in connection.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                sock.sendall(connection.data_to_send())
                return status
            elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                raise peers.PeerError(f"HTTP/2 GET refused: {event}")
        sock.sendall(connection.data_to_send())


def open_idle_connections(
    port: int, count: int, tls: ssl.SSLContext | None = None, http2: bool = False
) -> list[socket.socket]:
    """``count`` keep-alive connections, each having completed one GET, left open and idle;
    over TLS with ``tls``, over HTTP/2 (h2c, prior knowledge) with ``http2``."""
    request = f"GET / HTTP/1.1\r\nHost: {peers.HOST}\r\n\r\n".encode()
    h2_states: dict[socket.socket, h2.connection.H2Connection] = {}
    opened: list[socket.socket] = []
    try:
        while len(opened) < count:
            batch = []
            for _ in range(min(CONNECT_BATCH, count - len(opened))):
                sock = socket.create_connection((peers.HOST, port), timeout=30)
                if tls is not None:
                    try:
                        sock = tls.wrap_socket(sock)
                    except (OSError, ssl.SSLError):
                        sock.close()
                        raise
                opened.append(sock)
                batch.append(sock)
                if http2:
                    h2_states[sock], first_bytes = h2_request()
                    sock.sendall(first_bytes)
                else:
                    sock.sendall(request)
            for sock in batch:
                status = read_h2_response(sock, h2_states[sock]) if http2 else read_response(sock)
                if status != 200:
                    raise peers.PeerError(f"GET / on port {port} answered {status}")
    except (OSError, peers.PeerError) as exc:
        close_all(opened)
        raise peers.PeerError(f"connection {len(opened)} of {count} failed: {exc}") from exc
    return opened


def close_all(sockets: Sequence[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def measure_idle_connections(
    pid: int, port: int, count: int, tls: ssl.SSLContext | None = None, http2: bool = False
) -> dict[str, Any]:
    """RSS before, with ``count`` idle keep-alive connections open, and after closing them."""
    before = settled_rss_kb(pid)
    sockets = open_idle_connections(port, count, tls, http2)
    try:
        held = settled_rss_kb(pid)
    finally:
        close_all(sockets)
    after_close = settled_rss_kb(pid)
    growth = held - before
    return {
        "connections": count,
        "rss_kb_before": before,
        "rss_kb_held": held,
        "rss_kb_after_close": after_close,
        "kb_per_1000": round(growth / count * 1000, 1),
        "kb_per_connection": round(growth / count, 2),
        "released_pct": round(100 * (held - after_close) / growth, 1) if growth > 0 else None,
    }


def client_tls(client: peers.Creds, trusted: Path) -> ssl.SSLContext:
    """TLS 1.3 presenting ``client``'s certificate and trusting ``trusted``'s CAs. Workload
    certificates name a SPIFFE ID, not a host, so the chain is checked and not the name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.load_verify_locations(str(trusted))
    context.load_cert_chain(str(client.cert), str(client.key))
    return context


def measure_h2_connections(
    name: str, args: argparse.Namespace, root: Path, upstream: peers.Service
) -> dict[str, Any]:
    """RSS growth per idle HTTP/2 (h2c) connection of a fresh instance of ``name``: on the
    first one, the allocator would reuse what the plaintext connections left, and the growth
    would read low. meshpy and HAProxy take h2c on their HTTP/1.1 port, nginx on a second
    listener; meshpy's cluster speaks HTTP/1.1, as the upstream's port and the peers do."""
    service = proxy_service(name, root / "h2", upstream.port, args)
    port = service.port
    if name == "meshpy":
        peers.force_http1_upstream(service)
    if name == "nginx":
        port = peers.add_h2c_listener(service)
    return measure_on_own_instance(service, port, args.h2_connections, http2=True)


def measure_mtls_connections(
    name: str,
    args: argparse.Namespace,
    root: Path,
    upstream: peers.Service,
    creds: dict[str, peers.Creds],
) -> dict[str, Any]:
    """RSS growth per idle mutual-TLS connection of a fresh instance of ``name`` serving
    ``creds["b"]``, its clients presenting ``creds["a"]``."""
    service = proxy_service(name, root, upstream.port, args, creds["b"])
    tls = client_tls(creds["a"], creds["b"].bundle)
    return measure_on_own_instance(service, service.port, args.mtls_connections, tls)


def measure_on_own_instance(
    service: peers.Service,
    port: int,
    count: int,
    tls: ssl.SSLContext | None = None,
    http2: bool = False,
) -> dict[str, Any]:
    """Starts ``service``, measures ``count`` idle connections to ``port`` as
    ``measure_idle_connections`` does, and stops it."""
    try:
        service.start()
        assert service.proc is not None
        # Its first connection, as the readiness check: the handshake if any, and one GET.
        close_all(open_idle_connections(port, 1, tls, http2))
        return measure_idle_connections(service.proc.pid, port, count, tls, http2)
    finally:
        service.stop()


# --------------------------------------------------------------------------- load and soak


def measure_under_load(
    service: peers.Service,
    url: str,
    duration: float,
    connections: int,
    script: Path,
    pin: str | None,
) -> dict[str, Any]:
    """RSS sampled every 0.5 s while wrk keeps ``connections`` keep-alive connections busy."""
    command = load.wrk_command(url, 1, connections, duration, script, peers.pin_prefix(pin))
    assert service.proc is not None
    result, samples = sample_while(
        service.proc.pid,
        LOAD_SAMPLE_SECONDS,
        lambda: load.run_wrk(command, duration, service.cpu_seconds),
    )
    rss = [kb for _, kb in samples] or [tree_rss_kb(service.proc.pid)]
    return {
        "command": command,
        "rps": result.rps,
        "errors": result.errors,
        "rss_kb_median": int(statistics.median(rss)),
        "rss_kb_max": max(rss),
        "samples": samples,
    }


def measure_soak(
    service: peers.Service, url: str, args: argparse.Namespace, root: Path
) -> dict[str, Any]:
    """``args.soak`` seconds at ``args.soak_rate`` req/s, RSS sampled every ``soak_interval``."""
    schedule = load.FixedRate(
        url,
        args.soak_connections,
        args.soak,
        0,
        args.soak_rate,
        root / f"h2load-soak-{service.name}.log",
        peers.pin_prefix(args.pin_load),
    )
    command = load.h2load_command(schedule, threads=1)
    assert service.proc is not None
    result, samples = sample_while(
        service.proc.pid, args.soak_interval, lambda: load.run_h2load(command, schedule)
    )
    if len(samples) < 3:
        raise load.LoadError(f"soak too short: {len(samples)} RSS samples")
    return {
        "command": command,
        "seconds": args.soak,
        "rps": result.rps,
        "errors": result.errors,
        **soak_summary(samples),
        "rss_kb_samples": samples,
    }


# --------------------------------------------------------------------------- one system


def proxy_service(
    name: str,
    root: Path,
    upstream_port: int,
    args: argparse.Namespace,
    mutual_tls: peers.Creds | None = None,
) -> peers.Service:
    """The proxy ``name`` configured as in ``python -m bench``; HAProxy admits every idle one.
    With ``mutual_tls`` its listener serves that certificate and requires a client's."""
    if mutual_tls is None:
        workdir, idle = root / name, max(args.idle_connections, args.h2_connections)
    else:
        workdir, idle = root / f"{name}-mtls", args.mtls_connections
    pin = args.pin_proxy
    if name == "haproxy":
        maxconn = idle + SPARE_FILES
        return peers.haproxy_proxy(workdir, upstream_port, args.threads, pin, maxconn, mutual_tls)
    if mutual_tls is None:
        return peers.PROXIES[name](workdir, upstream_port, args.threads, pin)
    if name == "meshpy":
        return mesh.sidecar(
            name, workdir, upstream_port, args.threads, pin, mutual_tls, inbound_mtls=True
        )
    return peers.nginx_proxy(workdir, upstream_port, args.threads, pin, mutual_tls)


def measure_system(
    name: str,
    args: argparse.Namespace,
    root: Path,
    upstream: peers.Service,
    script: Path,
    creds: dict[str, peers.Creds] | None,
) -> dict[str, Any]:
    """Every memory figure of one proxy, started for this and stopped afterwards; the
    mutual-TLS one with ``creds`` (the run's certificates), if given."""
    result: dict[str, Any] = {"system": name, "failures": []}
    service = proxy_service(name, root, upstream.port, args)
    url = f"http://{peers.HOST}:{service.port}/"
    with contextlib.ExitStack() as stack:
        harness.start_service(stack, service, "/", len(peers.SMALL_BODY))
        assert service.proc is not None
        pid = service.proc.pid
        result["idle_rss_kb"] = settled_rss_kb(pid)
        print(f"{name:<8} idle {result['idle_rss_kb'] / 1024:.1f} MB", flush=True)
        phases: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            (
                "idle_connections",
                lambda: measure_idle_connections(pid, service.port, args.idle_connections),
            ),
            (
                "load",
                lambda: measure_under_load(
                    service, url, args.duration, args.connections, script, args.pin_load
                ),
            ),
        ]
        if args.soak and name in args.soak_names:
            phases.append(("soak", lambda: measure_soak(service, url, args, root)))
        if args.h2_connections:
            phases.append(
                ("h2_connections", lambda: measure_h2_connections(name, args, root, upstream))
            )
        if creds is not None:
            phases.append(
                (
                    "mtls_connections",
                    lambda: measure_mtls_connections(name, args, root, upstream, creds),
                )
            )
        for phase, run in phases:
            if service.proc.poll() is not None:
                result["failures"].append(f"{phase}: exited with code {service.proc.returncode}")
                break
            try:
                result[phase] = run()
            except (peers.PeerError, load.LoadError, OSError) as exc:
                result["failures"].append(f"{phase}: {str(exc).splitlines()[0]}")
                print(f"{name:<8} {phase} failed: {exc}", file=sys.stderr, flush=True)
                continue
            print(f"{name:<8} {phase_line(phase, result[phase])}", flush=True)
        result["log_tail"] = service.log_tail()
    return result


def phase_line(phase: str, figures: dict[str, Any]) -> str:
    if phase == "idle_connections":
        return (
            f"{figures['connections']} idle connections: +{figures['kb_per_1000']:,.0f} KB per "
            f"1,000 ({figures['kb_per_connection']} KB each), released after close "
            f"{_pct(figures['released_pct'])}"
        )
    if phase == "h2_connections":
        return (
            f"{figures['connections']} idle HTTP/2 connections (another instance): "
            f"+{figures['kb_per_1000']:,.0f} KB per 1,000 ({figures['kb_per_connection']} KB each)"
        )
    if phase == "mtls_connections":
        return (
            f"{figures['connections']} idle mutual-TLS connections (another instance): "
            f"+{figures['kb_per_1000']:,.0f} KB per 1,000 ({figures['kb_per_connection']} KB each)"
        )
    if phase == "load":
        return (
            f"under load ({figures['rps']:,.0f} req/s, errors {figures['errors']}): RSS median "
            f"{_mb(figures['rss_kb_median'])} MB, max {_mb(figures['rss_kb_max'])} MB"
        )
    return soak_line(figures)


def soak_line(soak: dict[str, Any]) -> str:
    return (
        f"soak {soak['seconds']:g} s at {soak['rps']:,.0f} req/s (errors {soak['errors']}), "
        f"{soak['samples']} samples: RSS {_mb(soak['rss_kb_first'])} -> "
        f"{_mb(soak['rss_kb_last'])} MB, slope {soak['slope_kb_per_min']:+,.1f} KB/min "
        f"(flat below {soak['flat_limit_kb_per_min']:,.1f}), last vs first "
        f"{soak['window_s']:g} s {soak['growth_first_to_last_window_kb']:+,} KB: {soak['verdict']}"
    )


def _mb(kb: float | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


# --------------------------------------------------------------------------- run, report


def run_benchmark(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Every system in turn against one upstream, plus the interpreter baselines."""
    most = max(args.idle_connections, args.h2_connections, args.mtls_connections)
    raise_open_files_limit(most + SPARE_FILES)
    baselines = {
        "python_kb": python_rss_kb("pass"),
        "python_import_sidecar_kb": python_rss_kb(SIDECAR_IMPORTS),
    }
    script = load.write_wrk_script(root)
    creds = mesh.issue_certificates(root / "pki") if args.mtls_connections else None
    systems = []
    with contextlib.ExitStack() as stack:
        upstream = peers.upstream_nginx(root / "upstream", args.pin_upstream)
        harness.start_service(stack, upstream, "/", len(peers.SMALL_BODY))
        for name in args.names:
            try:
                systems.append(measure_system(name, args, root, upstream, script, creds))
            except peers.PeerError as exc:
                systems.append({"system": name, "failures": [str(exc).splitlines()[0]]})
                print(f"{name:<8} failed: {exc}", file=sys.stderr, flush=True)
    return {"baselines": baselines, "systems": systems}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The three memory targets of the meshpy sidecar, each met, not met, or not measured."""
    meshpy = next((s for s in results["systems"] if s["system"] == "meshpy"), {})
    idle = meshpy.get("idle_rss_kb")
    per_connection = meshpy.get("idle_connections", {}).get("kb_per_connection")
    verdict = meshpy.get("soak", {}).get("verdict")
    return [
        {
            "target": f"idle sidecar RSS (Python included) <= {TARGET_IDLE_MB:g} MB",
            "value": None if idle is None else f"{idle / 1024:.1f} MB",
            "met": None if idle is None else idle / 1024 <= TARGET_IDLE_MB,
        },
        {
            "target": f"<= {TARGET_KB_PER_CONNECTION:g} KB per idle keep-alive connection",
            "value": None if per_connection is None else f"{per_connection:.1f} KB",
            "met": None if per_connection is None else per_connection <= TARGET_KB_PER_CONNECTION,
        },
        {
            "target": f"flat over the soak (slope < {FLAT_PCT_PER_10_MIN:g}% of RSS per 10 min)",
            "value": verdict,
            "met": None if verdict is None else verdict == "flat",
        },
    ]


def table(systems: list[dict[str, Any]]) -> str:
    header = (
        f"{'system':<8} {'idle MB':>8} {'KB/1k idle conns':>16} {'KB/conn':>8} "
        f"{'released':>8} {'KB/h2 conn':>10} {'KB/mTLS conn':>12} {'load median MB':>14} "
        f"{'load max MB':>11} "
        f"{'load req/s':>10}"
    )
    lines = [header, "-" * len(header)]
    for s in systems:
        if "idle_rss_kb" not in s:
            lines.append(f"{s['system']:<8} failed: {'; '.join(s['failures'])[:80]}")
            continue
        conns, under = s.get("idle_connections", {}), s.get("load", {})
        h2c, mtls = s.get("h2_connections", {}), s.get("mtls_connections", {})
        lines.append(
            f"{s['system']:<8} {_mb(s['idle_rss_kb']):>8} "
            f"{report._num(conns.get('kb_per_1000'), ',.0f'):>16} "
            f"{report._num(conns.get('kb_per_connection'), '.2f'):>8} "
            f"{_pct(conns.get('released_pct')):>8} "
            f"{report._num(h2c.get('kb_per_connection'), '.2f'):>10} "
            f"{report._num(mtls.get('kb_per_connection'), '.2f'):>12} "
            f"{_mb(under.get('rss_kb_median')):>14} "
            f"{_mb(under.get('rss_kb_max')):>11} {report._rate(under.get('rps')):>10}"
        )
    return "\n".join(lines)


def summary_lines(args: argparse.Namespace, results: dict[str, Any]) -> list[str]:
    base = results["baselines"]
    lines = [
        f"RSS summed over each process tree; {args.idle_connections} idle keep-alive connections "
        "(one GET each); released: share of their growth gone 1 s after closing them; load: "
        f"wrk -c{args.connections} keep-alive for {args.duration:g} s, RSS every 0.5 s; "
        f"KB/h2 conn: {args.h2_connections} idle HTTP/2 (h2c) connections (one GET each); "
        f"KB/mTLS conn: {args.mtls_connections} idle TLS 1.3 connections with a client "
        "certificate (one GET each) to another instance requiring one.",
        f"Baselines: python -c pass {_mb(base['python_kb'])} MB; python -c '{SIDECAR_IMPORTS}' "
        f"{_mb(base['python_import_sidecar_kb'])} MB (the meshpy row includes this interpreter).",
    ]
    for s in results["systems"]:
        if "soak" in s:
            lines.append(f"{s['system']} {soak_line(s['soak'])}")
        for failure in s["failures"]:
            lines.append(f"{s['system']} failed: {failure}")
    lines.append("Targets (meshpy sidecar):")
    for t in targets(results):
        verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(f"  {t['target']}: {t['value'] or '-'}: {verdict}")
    return lines


def measure(args: argparse.Namespace, command_line: str) -> dict[str, Any]:
    """The whole scenario: prints progress, the table and the targets; returns the document.

    Raises ``peers.PeerError`` if the upstream cannot start, KeyboardInterrupt when stopped.
    """
    meshpy = peers.meshpy_info()
    machine = report.machine_info()
    revision = report.git_revision(harness.REPO)
    print("\n".join(harness.header_start(command_line, machine)))
    print(f"meshpy: {harness.describe_meshpy(meshpy)}; checkout {revision or 'unknown'}")
    for warning in harness.header_warnings(machine, meshpy):
        print(warning)
    if meshpy is None and "meshpy" in args.names:
        raise peers.PeerError(harness.MESHPY_MISSING)
    with harness.workspace(args.keep_tmp) as root:
        results = run_benchmark(args, root)
    print()
    print(table(results["systems"]))
    print("\n".join(summary_lines(args, results)))
    return {
        "scenario": "memory",
        "command": command_line,
        "machine": machine,
        "loadavg_at_end": list(psutil.getloadavg()),
        "tools": peers.tool_versions(),
        "meshpy": meshpy,
        "meshpy_changed_during_run": harness.meshpy_changed(meshpy),
        "revision": revision,
        "settings": harness.settings_json(args),
        **results,
        "targets": targets(results),
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command_line = shlex.join(["python", "-m", "bench", "memory", *argv])
    harness.handle_signals()
    try:
        peers.ensure_tools(install=not args.no_install)
    except (peers.PeerError, subprocess.CalledProcessError, OSError) as exc:
        print(exc, file=sys.stderr)
        return 2
    started = time.strftime("%Y%m%d-%H%M%S")
    try:
        document = measure(args, command_line)
    except KeyboardInterrupt:
        print("\ninterrupted: all child processes stopped", file=sys.stderr)
        return 130
    except peers.PeerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    harness.write_results(args.out_dir, "memory", started, {"started": started, **document})
    return 1 if any(s["failures"] for s in document["systems"]) else 0
