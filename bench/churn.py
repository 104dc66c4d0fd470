"""``python -m bench churn``: new connections per second, plain and with TLS 1.3 handshakes.

Two measurements, both about the cost of a connection rather than of a request:

- **Plain churn**: wrk with ``Connection: close``, so every request opens a new TCP connection
  and the server closes it after the response, through ``direct`` (the upstream nginx itself),
  meshpy, nginx and HAProxy (configured as in ``python -m bench``; each keeps its connections
  to the upstream alive, so only the client side churns). req/s is new connections per second,
  and the proxy's CPU µs per request is its CPU per new connection. Interleaved, rotating
  rounds as in the other scenarios.
- **TLS 1.3 handshakes** into a meshpy listener with ``bench/tlsload`` (a rustls client
  keeping ``--handshake-connections`` connections in handshakes at once, each a handshake
  both ends complete, then a close), of three kinds:

  - ``tls``: the listener has ``tls: {cert, key}`` (sidecar b's workload certificate) and asks
    for no client certificate; every connection is a full handshake (the client does not
    resume). This is the handshake the target is about (>= 3,000 TLS 1.3 handshakes/s on one
    core), judged on it.
  - ``resumed``: the same listener, the client resuming its sessions (TLS 1.3 tickets, the
    listener's default ``session_resumption: true``): what returning clients cost. For
    reference.
  - ``mtls``: the listener has ``mtls: strict`` (b's identity) and the client presents a's
    certificate. The server also verifies the client's chain and its CertificateVerify
    signature, two more ECDSA verifications per handshake, so this is the harder case;
    reported beside the target, for reference.

  Each kind twice per round: unpinned, and with the sidecar pinned to
  ``--handshake-proxy-cpu`` (default 1) and the client to ``--handshake-load-cpu`` (default
  0), the "one core" setting of the target; one sidecar per kind and pinning, and the runs of
  a round in an order that rotates every round. With the client on the other core it may be
  the limit, so ``one-core capacity`` (1 s / the sidecar's CPU per handshake) is reported
  too: what one core fully spent on handshakes would do.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
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
# server certificate only; the same, resumed; client certificate verified too
TLS, RESUMED, MTLS = "tls", "resumed", "mtls"
KINDS = (TLS, RESUMED, MTLS)
UNPINNED, PINNED = "unpinned", "one-core"
PINNINGS = (UNPINNED, PINNED)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench churn",
        description="New connections per second (wrk, one request per connection) through no "
        "proxy, meshpy, nginx and HAProxy, and new TLS 1.3 handshakes per second into a meshpy "
        "listener (bench/tlsload), with a server certificate only (tls, full and resumed) and "
        "with mtls: strict (mtls), unpinned and on one core.",
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
        help="seconds of bench/tlsload per round, kind and pinning (default 5; 0 skips them)",
    )
    mesh.add_handshake_connections_argument(parser)
    parser.add_argument(
        "--handshake-proxy-cpu",
        default="1",
        help="CPU the sidecar is pinned to for the one-core handshake run (default 1)",
    )
    parser.add_argument(
        "--handshake-load-cpu",
        default="0",
        help="CPU bench/tlsload is pinned to for the one-core handshake run (default 0)",
    )
    harness.add_pin_arguments(parser, "the proxy under test (plain churn)")
    harness.add_output_arguments(
        parser, "churn-<timestamp>.json", "only say what to install if a tool is missing"
    )
    args = parser.parse_args(argv)
    harness.require_positive_counts(
        parser, args, ("threads", "rounds", "connections", "load_threads", "handshake_connections")
    )
    if args.duration <= 0 or args.warmup < 0 or args.handshake_seconds < 0:
        parser.error("--duration must be positive; --warmup, --handshake-seconds not negative")
    args.names = harness.select_systems(parser, args.systems, SYSTEMS)
    return args


# --------------------------------------------------------------------------- runs


def start_handshake_sidecars(
    args: argparse.Namespace, root: Path, upstream: peers.Service, stack: contextlib.ExitStack
) -> tuple[dict[tuple[str, str], peers.Service], dict[str, mesh.Creds]]:
    """One sidecar per kind and pinning (unpinned, on ``--handshake-proxy-cpu``): ``tls`` and
    ``resumed`` serve b's certificate (``tls: {cert, key}``), ``mtls`` is ``mtls: strict``
    with b's identity. Returns them and the run's certificates (a's is the mTLS client's)."""
    creds = mesh.issue_certificates(root / "pki")
    listener: dict[str, dict[str, Any]] = {
        TLS: {"server_tls": creds["b"]},
        RESUMED: {"server_tls": creds["b"]},
        MTLS: {"identity": creds["b"], "inbound_mtls": True},
    }
    sidecars = {}
    for kind in KINDS:
        for pinning, cpus in ((UNPINNED, None), (PINNED, args.handshake_proxy_cpu)):
            name = f"{kind}-{pinning}"
            sidecar = mesh.sidecar(
                name, root / name, upstream.port, args.threads, cpus, **listener[kind]
            )
            stack.callback(sidecar.stop)
            sidecar.start()
            sidecars[kind, pinning] = sidecar
    return sidecars, creds


def tlsload_command(
    kind: str, port: int, creds: dict[str, mesh.Creds], args: argparse.Namespace, pin: list[str]
) -> list[str]:
    """``mtls``: presenting a's certificate; ``tls`` and ``resumed``: no client certificate
    (the listener asks for none), ``resumed`` resuming its sessions."""
    client = creds["a"] if kind == MTLS else None
    return mesh.tlsload_command(
        port,
        args.handshake_seconds,
        args.handshake_connections,
        pin,
        client,
        resume=kind == RESUMED,
    )


def run_benchmark(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """``args.rounds`` rounds of plain churn through every system, then the handshake runs:
    each kind unpinned and on one core, in an order that rotates every round."""
    script = load.write_wrk_script(root)
    load_pin = peers.pin_prefix(args.pin_load)
    churn = {name: SystemRuns(name) for name in args.names}
    handshakes: dict[str, dict[str, list[dict[str, Any]]]] = {
        kind: {pinning: [] for pinning in PINNINGS} for kind in KINDS
    }
    handshake_failures: dict[str, dict[str, list[str]]] = {
        kind: {pinning: [] for pinning in PINNINGS} for kind in KINDS
    }
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
        sidecars: dict[tuple[str, str], peers.Service] = {}
        creds: dict[str, mesh.Creds] = {}
        if args.handshake_seconds:
            sidecars, creds = start_handshake_sidecars(args, root, upstream, stack)
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
            for (kind, pinning), sidecar in harness.rotated(list(sidecars.items()), round_index):
                label = f"round {round_index + 1}/{args.rounds} {kind:<7} {pinning:<8}"
                failures = handshake_failures[kind][pinning]
                code = sidecar.proc.poll() if sidecar.proc else None
                if code is not None:
                    failures.append(f"round {round_index + 1}: sidecar had exited ({code})")
                    print(f"{label} skipped: the sidecar had exited with code {code}", flush=True)
                    continue
                pin = [] if pinning == UNPINNED else peers.pin_prefix(args.handshake_load_cpu)
                command = tlsload_command(kind, sidecar.port, creds, args, pin)
                result = mesh.measure_handshakes(args, sidecar, command, label, round_index)
                if result is None:
                    failures.append(f"round {round_index + 1}: tlsload failed")
                else:
                    handshakes[kind][pinning].append(result)
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


def summarize_handshakes(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``mesh``'s handshake summary for each kind and pinning, plus the one-core capacity from
    CPU: ``{"tls": {"unpinned": ..., "one-core": ...}, "mtls": {...}}``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for kind, by_pinning in results["handshakes"].items():
        out[kind] = {}
        for pinning, runs in by_pinning.items():
            failures = results["handshake_failures"][kind][pinning]
            summary = mesh.summarize_handshakes(runs, failures)
            cpu_us = summary.get("b_cpu_us_per_handshake_median")
            summary["one_core_capacity_per_s"] = round(1e6 / cpu_us) if cpu_us else None
            out[kind][pinning] = summary
    return out


def handshake_target(handshakes: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """The handshake target, on the ``tls`` kind (server certificate only), judged twice: on the
    rate measured with the sidecar pinned to one core (bounded by the client on the other
    core, too) and on the one-core capacity from CPU. The ``mtls`` kind's one-core figures are
    added for reference (``mtls_*``), not judged."""
    pinned = handshakes.get(TLS, {}).get(PINNED, {})
    mutual = handshakes.get(MTLS, {}).get(PINNED, {})
    measured = pinned.get("handshakes_per_s_median")
    capacity = pinned.get("one_core_capacity_per_s")
    return {
        "target": f">= {TARGET_HANDSHAKES_PER_S:,.0f} TLS 1.3 handshakes/s on one core "
        "(server certificate)",
        "measured_per_s": measured,
        "met_measured": None if measured is None else measured >= TARGET_HANDSHAKES_PER_S,
        "capacity_per_s": capacity,
        "met_capacity": None if capacity is None else capacity >= TARGET_HANDSHAKES_PER_S,
        "mtls_measured_per_s": mutual.get("handshakes_per_s_median"),
        "mtls_capacity_per_s": mutual.get("one_core_capacity_per_s"),
    }


def _verdict(value: float | None, met: bool | None) -> str:
    if met is None or value is None:
        return "not measured"
    return f"{value:,.0f}/s, {'met' if met else 'NOT met'}"


def _per_s(value: float | None) -> str:
    return "not measured" if value is None else f"{value:,.0f}/s"


def handshake_lines(
    handshakes: dict[str, dict[str, dict[str, Any]]], args: argparse.Namespace
) -> list[str]:
    lines = [
        f"New TLS 1.3 handshakes into a meshpy listener (--workers {args.threads}); "
        f"bench/tlsload, {args.handshake_connections} connections, {args.handshake_seconds} s "
        "per round:",
        "  (tls: listener tls: {cert, key}, server certificate only, full handshakes; resumed: "
        "the same listener, sessions resumed; mtls: mtls: strict, the client's certificate "
        "verified too)",
    ]
    pinned = f"sidecar on CPU {args.handshake_proxy_cpu}, client on CPU {args.handshake_load_cpu}"
    meanings = {UNPINNED: "nothing pinned", PINNED: pinned}
    for kind in KINDS:
        for pinning in PINNINGS:
            s = handshakes.get(kind, {}).get(pinning)
            if s is None:
                continue
            if not s["rounds_ok"]:
                lines.append(f"  {kind:<7} {pinning:<8} failed: {'; '.join(s['failures'])[:100]}")
                continue
            lines.append(
                f"  {kind:<7} {pinning:<8} {s['handshakes_per_s_median']:>8,.0f} /s "
                f"(spread {s['handshakes_per_s_min']:,.0f}-{s['handshakes_per_s_max']:,.0f}); "
                f"sidecar cpu {report._num(s['b_cpu_us_per_handshake_median'], '.1f')} µs each, "
                f"one-core capacity {report._rate(s['one_core_capacity_per_s'])} /s "
                f"({meanings[pinning]})"
            )
            lines += ["  " + line for line in mesh.retaken_handshake_lines(s)]
    target = handshake_target(handshakes)
    lines += [
        f"Target {target['target']}: measured one-core rate "
        f"{_verdict(target['measured_per_s'], target['met_measured'])}; one-core capacity "
        f"{_verdict(target['capacity_per_s'], target['met_capacity'])}",
        "Mutual TLS (client certificate verified too), for reference: measured one-core rate "
        f"{_per_s(target['mtls_measured_per_s'])}; one-core capacity "
        f"{_per_s(target['mtls_capacity_per_s'])}",
    ]
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
    print(f"meshpy: {harness.describe_meshpy(meshpy)}; checkout {revision or 'unknown'}")
    print(
        f"load: wrk -t{args.load_threads} -c{args.connections} -d{args.duration:g}s "
        f"(+{args.warmup:g}s warm-up) -H '{CLOSE_HEADER}'; rounds {args.rounds}; proxy workers "
        f"{args.threads}"
    )
    print(harness.steal_line(args))
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
        "tools": peers.tool_versions(),
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
        if args.handshake_seconds:
            peers.tlsload_binary()
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
    handshakes = document["handshakes"]["summary"]
    summaries = [
        *document["churn"]["summary"],
        *(s for by_pinning in handshakes.values() for s in by_pinning.values()),
    ]
    return 1 if any(s["failures"] or s.get("errors") for s in summaries) else 0
