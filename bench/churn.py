"""``python -m bench churn``: new connections per second, plain and with mTLS handshakes.

Two measurements, both about the cost of a connection rather than of a request:

- **Plain churn**: wrk with ``Connection: close``, so every request opens a new TCP connection
  and the server closes it after the response, through ``direct`` (the upstream nginx itself),
  meshpy, nginx and HAProxy (configured as in ``python -m bench``; each keeps its connections
  to the upstream alive, so only the client side churns). req/s is new connections per second,
  and the proxy's CPU µs per request is its CPU per new connection. Interleaved, rotating
  rounds as in the other scenarios.
- **mTLS handshakes** into a meshpy listener with ``mtls: strict``: ``openssl s_time -new``
  (``bench.mesh.measure_handshakes``: full TLS 1.3 handshake with a client certificate, no
  resumption, then a close). Twice per round: unpinned, and with the sidecar pinned to
  ``--handshake-proxy-cpu`` (default 1) and openssl to ``--handshake-load-cpu`` (default 0), the
  "one core" setting of the target (>= 3,000 handshakes/s). With openssl on the other core the
  clients themselves may be the limit, so ``one-core capacity`` (1 s / the sidecar's CPU per
  handshake) is reported too: what one core fully spent on handshakes would do.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import harness, load, mesh, peers, report
from bench.report import SystemRuns

SYSTEMS = peers.SYSTEMS
CLOSE_HEADER = "Connection: close"
TARGET_HANDSHAKES_PER_S = 3000.0  # TLS 1.3 handshakes per second on one core
UNPINNED, PINNED = "unpinned", "one-core"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench churn",
        description="New connections per second (wrk, one request per connection) through no "
        "proxy, meshpy, nginx and HAProxy, and new mTLS handshakes per second into a meshpy "
        "listener with mtls: strict (openssl s_time -new), unpinned and on one core.",
    )
    parser.add_argument(
        "--systems", help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="worker threads/processes of every proxy (default 1)"
    )
    harness.add_load_arguments(parser, duration=5.0)
    parser.add_argument(
        "--handshake-seconds",
        type=int,
        default=5,
        help="seconds of openssl s_time -new per round and pinning (default 5; 0 skips them)",
    )
    parser.add_argument(
        "--handshake-clients",
        type=int,
        default=2,
        help="parallel openssl s_time processes (default 2)",
    )
    parser.add_argument(
        "--handshake-proxy-cpu",
        default="1",
        help="CPU the sidecar is pinned to for the one-core handshake run (default 1)",
    )
    parser.add_argument(
        "--handshake-load-cpu",
        default="0",
        help="CPU openssl is pinned to for the one-core handshake run (default 0)",
    )
    harness.add_pin_arguments(parser, "the proxy under test (plain churn)")
    harness.add_output_arguments(
        parser, "churn-<timestamp>.json", "only say what to install if a tool is missing"
    )
    args = parser.parse_args(argv)
    harness.require_positive_counts(
        parser, args, ("threads", "rounds", "connections", "load_threads", "handshake_clients")
    )
    if args.duration <= 0 or args.warmup < 0 or args.handshake_seconds < 0:
        parser.error("--duration must be positive; --warmup, --handshake-seconds not negative")
    args.names = harness.select_systems(parser, args.systems, SYSTEMS)
    return args


# --------------------------------------------------------------------------- runs


def start_handshake_sidecars(
    args: argparse.Namespace, root: Path, upstream: peers.Service, stack: contextlib.ExitStack
) -> tuple[dict[str, peers.Service], mesh.Creds]:
    """Two ``mtls: strict`` sidecars, one unpinned and one on ``--handshake-proxy-cpu``, and the
    client credentials that they accept."""
    creds = mesh.issue_certificates(root / "pki")
    sidecars = {}
    for label, cpus in ((UNPINNED, None), (PINNED, args.handshake_proxy_cpu)):
        sidecar = mesh.sidecar(
            f"mtls-{label}",
            root / f"mtls-{label}",
            upstream.port,
            args.threads,
            cpus,
            identity=creds["b"],
            inbound_mtls=True,
        )
        stack.callback(sidecar.stop)
        sidecar.start()
        sidecars[label] = sidecar
    return sidecars, creds["a"]


def run_benchmark(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """``args.rounds`` rounds of plain churn through every system, then the handshake runs."""
    script = load.write_wrk_script(root)
    load_pin = peers.pin_prefix(args.pin_load)
    churn = {name: SystemRuns(name) for name in args.names}
    handshakes: dict[str, list[dict[str, Any]]] = {UNPINNED: [], PINNED: []}
    handshake_failures: dict[str, list[str]] = {UNPINNED: [], PINNED: []}
    logs: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        upstream = peers.upstream_nginx(root / "upstream", args.pin_upstream)
        harness.start_service(stack, upstream, "/", len(peers.SMALL_BODY))
        systems = []
        for name in args.names:
            system = peers.make_system(name, root, upstream, args.threads, args.pin_proxy)
            if system.service is not None:
                harness.start_service(stack, system.service, "/", len(peers.SMALL_BODY))
            systems.append(system)
        sidecars: dict[str, peers.Service] = {}
        if args.handshake_seconds:
            sidecars, client = start_handshake_sidecars(args, root, upstream, stack)
        for round_index in range(args.rounds):
            for system in harness.rotated(systems, round_index):
                label = f"round {round_index + 1}/{args.rounds} {system.name:<8}"
                if harness.still_running(system, round_index, label, [churn[system.name]]):
                    harness.measure_saturation(
                        args,
                        system,
                        system.url("/"),
                        round_index,
                        script,
                        load_pin,
                        churn[system.name],
                        (CLOSE_HEADER,),
                        label,
                    )
            for pinning, sidecar in sidecars.items():
                label = f"round {round_index + 1}/{args.rounds} mtls {pinning:<8}"
                pin = [] if pinning == UNPINNED else peers.pin_prefix(args.handshake_load_cpu)
                result = mesh.measure_handshakes(args, sidecar, client, pin, label)
                if result is None:
                    handshake_failures[pinning].append(f"round {round_index + 1}: s_time failed")
                else:
                    handshakes[pinning].append(result)
        for service in [*(s.service for s in systems if s.service), *sidecars.values()]:
            logs[service.name] = service.log_tail()
    return {
        "churn": list(churn.values()),
        "handshakes": handshakes,
        "handshake_failures": handshake_failures,
        "logs": logs,
    }


# --------------------------------------------------------------------------- summaries


def summarize_churn(runs: list[SystemRuns]) -> list[dict[str, Any]]:
    """``report``'s saturation summaries: with one request per connection, req/s are new
    connections/s and cpu µs/req is CPU µs per new connection."""
    by_name = {r.name: r for r in runs}
    baseline = by_name["direct"].median("rps") if "direct" in by_name else None
    nginx_cpu = by_name["nginx"].median("cpu_us_per_req") if "nginx" in by_name else None
    return [r.summary(baseline, nginx_cpu) for r in runs]


def summarize_handshakes(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``mesh``'s handshake summary for each pinning, plus the one-core capacity from CPU."""
    out = {}
    for pinning, runs in results["handshakes"].items():
        summary = mesh.summarize_handshakes(runs, results["handshake_failures"][pinning])
        cpu_us = summary.get("b_cpu_us_per_handshake_median")
        summary["one_core_capacity_per_s"] = round(1e6 / cpu_us) if cpu_us else None
        out[pinning] = summary
    return out


def handshake_target(handshakes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The handshake target, judged twice: on the rate measured with the sidecar pinned to one
    core (bounded by openssl on the other core, too) and on the one-core capacity from CPU."""
    pinned = handshakes.get(PINNED, {})
    measured = pinned.get("handshakes_per_s_median")
    capacity = pinned.get("one_core_capacity_per_s")
    return {
        "target": f">= {TARGET_HANDSHAKES_PER_S:,.0f} TLS 1.3 handshakes/s on one core",
        "measured_per_s": measured,
        "met_measured": None if measured is None else measured >= TARGET_HANDSHAKES_PER_S,
        "capacity_per_s": capacity,
        "met_capacity": None if capacity is None else capacity >= TARGET_HANDSHAKES_PER_S,
    }


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "NOT met")


def handshake_lines(handshakes: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[str]:
    lines = [
        f"New mTLS handshakes into a meshpy listener (mtls: strict, --workers {args.threads}); "
        f"openssl s_time -new x {args.handshake_clients}, {args.handshake_seconds} s per round:"
    ]
    pinned = f"sidecar on CPU {args.handshake_proxy_cpu}, openssl on CPU {args.handshake_load_cpu}"
    for pinning, meaning in ((UNPINNED, "nothing pinned"), (PINNED, pinned)):
        s = handshakes.get(pinning)
        if s is None:
            continue
        if not s["rounds_ok"]:
            lines.append(f"  {pinning:<8} failed: {'; '.join(s['failures'])[:100]}")
            continue
        lines.append(
            f"  {pinning:<8} {s['handshakes_per_s_median']:>8,.0f} /s "
            f"(spread {s['handshakes_per_s_min']:,.0f}-{s['handshakes_per_s_max']:,.0f}); "
            f"sidecar cpu {report._num(s['b_cpu_us_per_handshake_median'], '.1f')} µs each, "
            f"one-core capacity {report._rate(s['one_core_capacity_per_s'])} /s ({meaning})"
        )
    target = handshake_target(handshakes)
    lines.append(
        f"Target {target['target']}: measured one-core rate {_verdict(target['met_measured'])}; "
        f"one-core capacity {_verdict(target['met_capacity'])}"
    )
    return lines


def measure(args: argparse.Namespace, command_line: str) -> dict[str, Any]:
    """The whole scenario: prints progress and tables, returns the JSON-serializable document.

    Raises ``peers.PeerError`` if a service cannot start, KeyboardInterrupt when stopped.
    """
    meshpy = peers.meshpy_info()
    if meshpy is None:
        raise peers.PeerError(harness.MESHPY_MISSING)
    machine = report.machine_info()
    revision = report.git_revision(harness.REPO)
    print("\n".join(harness.header_start(command_line, machine)))
    print(f"meshpy: {harness.describe_meshpy(meshpy)}; revision {revision or 'unknown'}")
    print(
        f"load: wrk -t{args.load_threads} -c{args.connections} -d{args.duration:g}s "
        f"(+{args.warmup:g}s warm-up) -H '{CLOSE_HEADER}'; rounds {args.rounds}; proxy workers "
        f"{args.threads}"
    )
    for warning in harness.header_warnings(machine, meshpy):
        print(warning)
    with harness.workspace(args.keep_tmp) as root:
        results = run_benchmark(args, root)
    churn = summarize_churn(results["churn"])
    handshakes = summarize_handshakes(results) if args.handshake_seconds else {}
    print()
    print(
        f"New connections per second (wrk, one request per connection, medians over "
        f"{args.rounds} round(s); req/s = connections/s, cpu µs/req = µs per new connection):"
    )
    print(report.saturation_table(churn))
    if handshakes:
        print()
        print("\n".join(handshake_lines(handshakes, args)))
    return {
        "scenario": "churn",
        "command": command_line,
        "machine": machine,
        "tools": {**peers.tool_versions(), "openssl": mesh.openssl_version()},
        "meshpy": meshpy,
        "meshpy_changed_during_run": harness.meshpy_changed(meshpy),
        "revision": revision,
        "settings": harness.settings_json(args),
        "churn": {"summary": churn, "runs": harness.runs_json(results["churn"])},
        "handshakes": {"summary": handshakes, "runs": results["handshakes"]},
        "handshake_target": handshake_target(handshakes) if handshakes else None,
        "proxy_logs": results["logs"],
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command_line = shlex.join(["python", "-m", "bench", "churn", *argv])
    harness.handle_signals()
    try:
        peers.ensure_tools(install=not args.no_install)
        if args.handshake_seconds and not shutil.which("openssl"):
            raise peers.PeerError("openssl is not on PATH (apt-get install openssl)")
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
    harness.write_results(args.out_dir, "churn", started, {"started": started, **document})
    summaries = [*document["churn"]["summary"], *document["handshakes"]["summary"].values()]
    return 1 if any(s["failures"] or s.get("errors") for s in summaries) else 0
