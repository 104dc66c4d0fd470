"""``python -m bench``: meshpy, nginx and HAProxy against no proxy, in interleaved rounds."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import churn, compare, filters, harness, load, memory, mesh, peers, report, steal, suite
from bench.harness import describe_meshpy, measure, start_service
from bench.report import SystemRuns


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Throughput (wrk, saturation) and optionally latency at a fixed rate "
        "(h2load) of meshpy, nginx and HAProxy, each forwarding to the same nginx upstream, "
        "against sending load to that upstream directly.",
        epilog="Other scenarios: `python -m bench filters` measures meshpy routes with Python "
        "filters against mitmproxy (see `python -m bench filters --help`); `python -m bench mesh` "
        "measures one and two sidecars, plaintext and mTLS between them, and new mTLS "
        "handshakes per second (see `python -m bench mesh --help`); `python -m bench memory` "
        "measures RSS idle, per idle connection, under load and over a soak; `python -m bench "
        "churn` new connections and TLS 1.3 handshakes (server certificate and mTLS) per "
        "second; `python -m bench suite` runs every scenario in interleaved rounds, in shared "
        "and isolated CPU modes, with medians, spreads, the performance targets as a checklist "
        "and PNG charts (see `python -m bench suite --help`); `python -m bench compare BEFORE.json "
        "AFTER.json` compares two result files of the same kind; `python -m bench steal "
        "SUITE.json...` shows how the p99 of fixed-rate runs moved with the CPU time stolen "
        "during them.",
    )
    parser.add_argument(
        "--systems",
        help=f"comma-separated subset of {','.join(peers.SYSTEMS)} (default: all; "
        "meshpy is skipped with a warning if it is not importable)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="worker threads/processes of every proxy (default 1)"
    )
    harness.add_load_arguments(parser, duration=10.0)
    parser.add_argument(
        "--path",
        choices=["/", peers.LARGE_PATH],
        default="/",
        help="request path: / is 100 B, /64k is 64 KiB (default /)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="also measure latency at this fixed total req/s with h2load (default 0: skip)",
    )
    harness.add_rate_connections_argument(parser)
    harness.add_latency_steal_limit_argument(parser)
    harness.add_latency_load_argument(parser)
    harness.add_pin_arguments(parser, "the proxy under test")
    harness.add_output_arguments(
        parser, "results-<timestamp>.json", "only say what to install if a tool is missing"
    )
    args = parser.parse_args(argv)
    harness.require_positive_counts(
        parser, args, ("threads", "rounds", "connections", "load_threads", "rate_connections")
    )
    if args.duration <= 0 or args.warmup < 0 or args.rate < 0:
        parser.error("--duration must be positive; --warmup and --rate not negative")
    return args


def choose_systems(
    args: argparse.Namespace, meshpy: dict[str, object] | None
) -> tuple[list[str], str]:
    """The systems to run, and a note on any that were skipped."""
    if args.systems:
        names = [name.strip() for name in args.systems.split(",") if name.strip()]
        unknown = [name for name in names if name not in peers.SYSTEMS]
        if unknown:
            sys.exit(f"unknown systems: {', '.join(unknown)} (choose from {peers.SYSTEMS})")
        if "meshpy" in names and meshpy is None:
            sys.exit(
                "meshpy is not importable here: `import meshpy._core` fails "
                "(install it with `pip install -e .` from the repository root)"
            )
        return names, ""
    if meshpy is None:
        note = "meshpy skipped: `import meshpy._core` fails in this interpreter"
        return [name for name in peers.SYSTEMS if name != "meshpy"], note
    return list(peers.SYSTEMS), ""


def run_benchmark(args: argparse.Namespace, names: list[str], root: Path) -> dict[str, Any]:
    size = peers.LARGE_SIZE if args.path == peers.LARGE_PATH else len(peers.SMALL_BODY)
    load_pin = peers.pin_prefix(args.pin_load)
    script = load.write_wrk_script(root)
    saturation = {name: SystemRuns(name) for name in names}
    fixed_rate = {name: SystemRuns(name) for name in names}
    logs: dict[str, str] = {}

    with contextlib.ExitStack() as stack:
        upstream = peers.upstream_nginx(root / "upstream", args.pin_upstream)
        start_service(stack, upstream, args.path, size)
        print(f"upstream nginx on port {upstream.port}", flush=True)

        systems: list[peers.System] = []
        for name in names:
            system = peers.make_system(name, root, upstream, args.threads, args.pin_proxy)
            if system.service is not None:
                try:
                    start_service(stack, system.service, args.path, size)
                except peers.PeerError as exc:
                    message = str(exc).splitlines()[0]
                    print(f"{name}: did not start: {exc}", file=sys.stderr)
                    saturation[name].failures.append(message)
                    fixed_rate[name].failures.append(message)
                    logs[name] = system.service.log_tail()
                    continue
                print(f"{name} on port {system.port}", flush=True)
            systems.append(system)

        for round_index in range(args.rounds):
            for system in harness.rotated(systems, round_index):
                measure(
                    args,
                    system,
                    system.url(args.path),
                    round_index,
                    script,
                    load_pin,
                    root,
                    saturation[system.name],
                    fixed_rate[system.name],
                )
        for system in systems:
            if system.service is not None:
                logs[system.name] = system.service.log_tail()

    return {
        "saturation": [saturation[name] for name in names],
        "fixed_rate": [fixed_rate[name] for name in names] if args.rate else [],
        "logs": logs,
    }


def summarize(runs: list[SystemRuns]) -> list[dict[str, Any]]:
    """Every system's summary, with req/s relative to direct and CPU time relative to nginx."""
    by_name = {r.name: r for r in runs}
    direct, nginx = by_name.get("direct"), by_name.get("nginx")
    baseline_rps = direct.median("rps") if direct else None
    nginx_cpu_us = nginx.median("cpu_us_per_req") if nginx else None
    return [r.summary(baseline_rps, nginx_cpu_us) for r in runs]


def header(
    args: argparse.Namespace,
    command_line: str,
    machine: dict[str, Any],
    meshpy: dict[str, object] | None,
    revision: str | None,
    pinning: dict[str, str],
    skipped: str,
) -> list[str]:
    lines = [
        *harness.header_start(command_line, machine),
        f"meshpy: {describe_meshpy(meshpy)}; checkout {revision or 'unknown'}",
        f"load: wrk -t{args.load_threads} -c{args.connections} -d{args.duration:g}s "
        f"(+{args.warmup:g}s warm-up), path {args.path}; proxy threads {args.threads}; "
        f"rounds {args.rounds}; CPU pinning upstream={pinning['upstream']} "
        f"proxy={pinning['proxy']} load={pinning['load']}",
        harness.steal_line(args),
    ]
    if skipped:
        lines.append(f"warning: {skipped}")
    return lines + harness.header_warnings(
        machine, meshpy, " (e.g. from `maturin develop` without --release)"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["filters"]:
        return filters.main(argv[1:])
    if argv[:1] == ["mesh"]:
        return mesh.main(argv[1:])
    if argv[:1] == ["suite"]:
        return suite.main(argv[1:])
    if argv[:1] == ["memory"]:
        return memory.main(argv[1:])
    if argv[:1] == ["churn"]:
        return churn.main(argv[1:])
    if argv[:1] == ["compare"]:
        return compare.main(argv[1:])
    if argv[:1] == ["steal"]:
        return steal.main(argv[1:])
    args = parse_args(argv)
    command_line = shlex.join(["python", "-m", "bench", *argv])
    harness.handle_signals()

    try:
        peers.ensure_tools(install=not args.no_install)
        harness.build_latency_load(args)
    except (peers.PeerError, subprocess.CalledProcessError, OSError) as exc:
        print(exc, file=sys.stderr)
        return 2
    meshpy = peers.meshpy_info()
    names, skipped = choose_systems(args, meshpy)

    machine = report.machine_info()
    revision = report.git_revision(harness.REPO)
    pinning = {
        "upstream": args.pin_upstream or "none",
        "proxy": args.pin_proxy or "none",
        "load": args.pin_load or "none",
    }
    started = time.strftime("%Y%m%d-%H%M%S")
    print("\n".join(header(args, command_line, machine, meshpy, revision, pinning, skipped)))
    print(flush=True)

    results, code = harness.run_in_workspace(
        args.keep_tmp, lambda root: run_benchmark(args, names, root)
    )
    if code is not None:
        return code

    meshpy_changed = harness.meshpy_changed(meshpy)
    saturation = summarize(results["saturation"])
    fixed_rate = summarize(results["fixed_rate"])
    print()
    print(
        f"Throughput at saturation (medians over {args.rounds} round(s); latency at saturation "
        "is mostly queueing):"
    )
    print(report.saturation_table(saturation))
    if fixed_rate:
        load_name, gap_note = harness.fixed_rate_load(args)
        print()
        print(
            f"Latency at a fixed {args.rate:g} req/s ({load_name}, {args.rate_connections} "
            f"connections, medians over {args.rounds} round(s); {gap_note}):"
        )
        print(report.fixed_rate_table(fixed_rate))

    document = {
        "command": command_line,
        "started": started,
        "machine": machine,
        "tools": peers.tool_versions(),
        "meshpy": meshpy,
        "meshpy_changed_during_run": meshpy_changed,
        "revision": revision,
        "skipped": skipped or None,
        "settings": harness.settings_json(args),
        "cpu_pinning": pinning,
        "saturation": {
            "summary": saturation,
            "runs": harness.runs_json(results["saturation"]),
        },
        "fixed_rate": {
            "summary": fixed_rate,
            "runs": harness.runs_json(results["fixed_rate"]),
        },
        "proxy_logs": results["logs"],
    }
    harness.write_results(args.out_dir, "results", started, document)
    failed = any(s["failures"] for s in saturation + fixed_rate)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
