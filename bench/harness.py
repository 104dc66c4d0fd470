"""What every scenario shares: the workspace, starting services, one system's runs in a round."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from bench import load, peers
from bench.report import SystemRuns


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="meshpy-bench-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def describe_meshpy(meshpy: dict[str, object] | None) -> str:
    if meshpy is None:
        return "not importable"
    debug = "with debug info" if meshpy["debug_info"] else "no debug info"
    return f"{meshpy['version']} ({meshpy['extension']}, {meshpy['extension_mib']} MiB, {debug})"


def start_service(
    stack: contextlib.ExitStack, service: peers.Service, path: str, size: int
) -> None:
    stack.callback(service.stop)
    service.start()
    peers.check_response(service.port, path, size)


def measure(
    args: argparse.Namespace,
    system: peers.System,
    url: str,
    round_index: int,
    script: Path,
    load_pin: list[str],
    root: Path,
    saturation: SystemRuns,
    fixed_rate: SystemRuns,
    headers: Sequence[str] = (),
    name_width: int = 8,
) -> None:
    """One round of one system: wrk at saturation, then h2load at ``args.rate`` if set.

    ``headers`` ("name: value") are sent with every request by both load generators.
    """
    label = f"round {round_index + 1}/{args.rounds} {system.name:<{name_width}}"
    if not still_running(
        system, round_index, label, [saturation, fixed_rate] if args.rate else [saturation]
    ):
        return
    measure_saturation(args, system, url, round_index, script, load_pin, saturation, headers, label)
    if args.rate:
        measure_fixed_rate(
            args, system, url, round_index, args.rate, load_pin, root, fixed_rate, headers, label
        )


def still_running(
    system: peers.System, round_index: int, label: str, phases: Sequence[SystemRuns]
) -> bool:
    """False, with the reason recorded in every phase, if the system's proxy has exited."""
    exit_code = system.service.proc.poll() if system.service and system.service.proc else None
    if exit_code is None:
        return True
    reason = f"round {round_index + 1}: process had exited with code {exit_code}"
    for runs in phases:
        runs.failures.append(reason)
    print(f"{label} skipped: {reason}", flush=True)
    return False


def measure_saturation(
    args: argparse.Namespace,
    system: peers.System,
    url: str,
    round_index: int,
    script: Path,
    load_pin: list[str],
    saturation: SystemRuns,
    headers: Sequence[str],
    label: str,
) -> None:
    """wrk for ``args.warmup`` seconds unmeasured, then ``args.duration`` seconds measured."""
    try:
        if args.warmup:
            warm = load.wrk_command(
                url, args.load_threads, args.connections, args.warmup, script, load_pin, headers
            )
            load.run_wrk(warm, args.warmup, system.cpu_service.cpu_seconds)
        command = load.wrk_command(
            url, args.load_threads, args.connections, args.duration, script, load_pin, headers
        )
        result = load.run_wrk(command, args.duration, system.cpu_service.cpu_seconds)
        saturation.runs.append(result)
        print(
            f"{label} saturation {result.rps:>12,.0f} req/s  p50 "
            f"{result.latency_us['p50'] / 1000:.3f} ms  p99 "
            f"{result.latency_us['p99'] / 1000:.3f} ms  errors {result.errors}  "
            f"{system.cpu_service.name} cpu {result.cpu_us_per_req} µs/req  "
            f"cpu busy {result.cpu['busy_pct']}% steal {result.cpu['steal_pct']}%",
            flush=True,
        )
    except load.LoadError as exc:
        saturation.failures.append(f"round {round_index + 1}: {str(exc).splitlines()[0]}")
        print(f"{label} saturation failed: {exc}", file=sys.stderr, flush=True)


def measure_fixed_rate(
    args: argparse.Namespace,
    system: peers.System,
    url: str,
    round_index: int,
    rate: float,
    load_pin: list[str],
    root: Path,
    fixed_rate: SystemRuns,
    headers: Sequence[str],
    label: str,
) -> None:
    """h2load at ``rate`` req/s over ``args.rate_connections`` connections."""
    log_file = root / f"h2load-{system.name}-{round_index}-{rate:g}.log"
    command = load.h2load_command(
        url,
        args.load_threads,
        args.rate_connections,
        args.duration,
        args.warmup,
        rate,
        log_file,
        load_pin,
        headers,
    )
    try:
        result = load.run_h2load(
            command, args.duration, args.warmup, rate, args.rate_connections, log_file
        )
    except (load.LoadError, OSError) as exc:
        fixed_rate.failures.append(f"round {round_index + 1}: {str(exc).splitlines()[0]}")
        print(f"{label} fixed rate failed: {exc}", file=sys.stderr, flush=True)
        return
    fixed_rate.runs.append(result)
    print(
        f"{label} fixed rate {result.rps:>12,.0f} req/s  p50 "
        f"{result.latency_us['p50'] / 1000:.3f} ms  p99 "
        f"{result.latency_us['p99'] / 1000:.3f} ms  >gap {result.extra['slower_than_gap']}  "
        f"errors {result.errors}",
        flush=True,
    )
