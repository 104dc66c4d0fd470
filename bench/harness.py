"""What every scenario shares: the workspace, starting services, one system's runs in a round."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from bench import load, peers, report
from bench.report import SystemRuns

OUT_DIR = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parent.parent
BUSY_WARNING_PCT = 20.0
# On a shared virtual machine a whole run can lose a third of its CPU time to other guests;
# such a run measures the host, not the systems under test, so it is measured again.
STEAL_LIMIT_PCT = 10.0
# A p99 is decided by the slowest 1% of requests, which a 1% share of stolen CPU time can
# make on its own: fixed-rate runs, whose tails are the claim, are held to a lower limit.
LATENCY_STEAL_LIMIT_PCT = 1.0
RETAKES = 2
MESHPY_MISSING = (
    "meshpy is not importable here: `import meshpy._core` fails "
    "(install it with `pip install .` from the repository root)"
)

T = TypeVar("T")


# --------------------------------------------------------------------------- arguments


def add_load_arguments(parser: argparse.ArgumentParser, duration: float) -> None:
    """--rounds, --duration, --warmup, -c/--connections and --load-threads."""
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--duration",
        type=float,
        default=duration,
        help=f"seconds per measured run (default {duration:g})",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="seconds of unmeasured load before each run (default 2)",
    )
    parser.add_argument(
        "-c", "--connections", type=int, default=50, help="wrk connections (default 50)"
    )
    parser.add_argument(
        "--load-threads", type=int, default=1, help="wrk/h2load threads (default 1)"
    )
    parser.add_argument(
        "--steal-limit",
        type=_percentage,
        default=STEAL_LIMIT_PCT,
        metavar="PCT",
        help="a measured run during which the hypervisor took more than this share of the "
        f"machine's CPU time (steal in /proc/stat) is measured again (default {STEAL_LIMIT_PCT:g})",
    )
    parser.add_argument(
        "--retakes",
        type=_count,
        default=RETAKES,
        help=f"how many times one run may be measured again for steal (default {RETAKES}; 0: "
        "never)",
    )


def _percentage(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"expected a percentage from 0 to 100, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text}")
    return value


def add_rate_connections_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rate-connections",
        type=int,
        default=10,
        help="h2load connections for --rate (default 10)",
    )


def add_latency_steal_limit_argument(parser: argparse.ArgumentParser) -> None:
    """For the scenarios with fixed-rate runs."""
    parser.add_argument(
        "--latency-steal-limit",
        type=_percentage,
        default=LATENCY_STEAL_LIMIT_PCT,
        metavar="PCT",
        help="--steal-limit for the fixed-rate (latency) runs, whose p99 a few milliseconds "
        f"of stolen time can decide (default {LATENCY_STEAL_LIMIT_PCT:g})",
    )


LATENCY_LOADS = ("h2load", "open")


def add_latency_load_argument(parser: argparse.ArgumentParser) -> None:
    """For the scenarios with fixed-rate runs: which client sends the fixed rate."""
    parser.add_argument(
        "--latency-load",
        choices=LATENCY_LOADS,
        default="h2load",
        help="load of the fixed-rate runs: h2load --rps (default; every connection's timer "
        "fires at once, so requests arrive in bursts of one per connection) or open "
        "(bench/openload: requests 1/rate apart, each timed from when it fell due)",
    )


def build_latency_load(args: argparse.Namespace) -> None:
    """Builds meshpy-openload if the fixed-rate runs use it: before any measurement."""
    if args.latency_load == "open":
        peers.openload_binary()


def fixed_rate_load(args: argparse.Namespace) -> tuple[str, str]:
    """The fixed-rate tables' name for their load, and what their >gap column counts."""
    if args.latency_load == "open":
        return (
            "meshpy-openload HTTP/1.1, requests evenly spaced",
            ">gap counts requests that went out more than one connection's gap after they fell "
            "due, a wait their latency includes",
        )
    return "h2load HTTP/1.1", ">gap counts responses slow enough to delay the next request"


def add_pin_arguments(
    parser: argparse.ArgumentParser, proxy_help: str, load_help: str = "wrk/h2load"
) -> None:
    """--pin-upstream, --pin-proxy (for ``proxy_help``) and --pin-load (for ``load_help``)."""
    parser.add_argument(
        "--pin-upstream",
        metavar="CPUS",
        help="taskset CPU list for the upstream nginx (default: not pinned)",
    )
    parser.add_argument(
        "--pin-proxy",
        metavar="CPUS",
        help=f"taskset CPU list for {proxy_help} (default: not pinned)",
    )
    parser.add_argument(
        "--pin-load", metavar="CPUS", help=f"taskset CPU list for {load_help} (default: not pinned)"
    )


def add_output_arguments(
    parser: argparse.ArgumentParser, out_name: str, no_install_help: str
) -> None:
    """--out-dir (where ``out_name`` goes), --no-install and --keep-tmp."""
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=OUT_DIR,
        help=f"where {out_name} goes (default bench/out)",
    )
    parser.add_argument("--no-install", action="store_true", help=no_install_help)
    parser.add_argument(
        "--keep-tmp", action="store_true", help="keep the temporary directory with configs and logs"
    )


def require_positive_counts(
    parser: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str]
) -> None:
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")


def select_systems(
    parser: argparse.ArgumentParser, systems: str | None, known: Sequence[str]
) -> list[str]:
    """The names in ``--systems`` (all of ``known`` if not given), in ``known``'s order."""
    if not systems:
        return list(known)
    names = [name.strip() for name in systems.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown systems: {', '.join(unknown)} (choose from {tuple(known)})")
    return [name for name in known if name in names]


# --------------------------------------------------------------------------- process


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def handle_signals() -> None:
    """SIGTERM and SIGHUP stop the run like Ctrl-C, so every child process is stopped."""
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGHUP, raise_interrupt)


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


def run_in_workspace(
    keep_tmp: bool, run: Callable[[Path], dict[str, Any]]
) -> tuple[dict[str, Any], int | None]:
    """``run`` in a fresh workspace: its results, and an exit code if it did not finish."""
    with workspace(keep_tmp) as root:
        try:
            return run(root), None
        except KeyboardInterrupt:
            print("\ninterrupted: all child processes stopped", file=sys.stderr)
            return {}, 130
        except peers.PeerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return {}, 1


def rotated(systems: list[T], round_index: int) -> list[T]:
    """``systems`` in this round's order: the order rotates every round."""
    shift = round_index % max(len(systems), 1)
    return systems[shift:] + systems[:shift]


# --------------------------------------------------------------------------- header, results


def header_start(command_line: str, machine: dict[str, Any]) -> list[str]:
    """The command and machine lines every scenario's header begins with."""
    cpu = machine["cpu_before_start"]
    loadavg = " ".join(f"{x:.2f}" for x in machine["loadavg_at_start"])
    return [
        f"command: {command_line}",
        f"machine: nproc {machine['nproc']}, {machine['cpu_model']}, {machine['kernel']}, "
        f"loadavg {loadavg}, CPU busy before start {cpu['busy_pct']}%",
    ]


def steal_line(args: argparse.Namespace) -> str:
    """How runs that lost CPU time to other guests of the host are treated."""
    if args.retakes < 1:
        return "steal: runs are kept however much CPU time was stolen (--retakes 0)"
    latency_limit = getattr(args, "latency_steal_limit", None)  # scenarios with fixed rates
    fixed_rate = "" if latency_limit is None else f" ({latency_limit:g}% for a fixed-rate run)"
    return (
        f"steal: a run during which more than {args.steal_limit:g}% of the machine's CPU time "
        f"was stolen{fixed_rate} is measured again, up to {args.retakes} "
        f"time{'s' * (args.retakes > 1)}; the first run under the limit is kept, else the "
        "least stolen"
    )


def header_warnings(
    machine: dict[str, Any], meshpy: dict[str, object] | None, build_hint: str = ""
) -> list[str]:
    """Warnings for a debug build of meshpy and for a machine already busy at the start."""
    lines = []
    if meshpy is not None and meshpy["debug_info"]:
        lines.append(
            "warning: meshpy's extension carries debug info, so it is most likely a debug "
            f"build{build_hint}; its numbers say little about a release build"
        )
    cpu = machine["cpu_before_start"]
    if cpu["busy_pct"] + cpu["steal_pct"] > BUSY_WARNING_PCT:
        lines.append(
            f"warning: the machine was already {cpu['busy_pct']}% busy "
            f"({cpu['steal_pct']}% stolen) before the benchmark started; "
            "its numbers will be low and noisy"
        )
    return lines


def meshpy_changed(meshpy: dict[str, object] | None) -> bool:
    """Whether meshpy's extension changed on disk since ``meshpy`` was read; warns if so."""
    changed = meshpy is not None and peers.meshpy_info() != meshpy
    if changed:
        print(
            "warning: meshpy's extension changed on disk during the run; "
            "its numbers may mix two builds",
            file=sys.stderr,
        )
    return changed


def settings_json(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
    }


def runs_json(runs: Sequence[SystemRuns]) -> dict[str, list[dict[str, Any]]]:
    return {r.name: [run.to_json() for run in r.runs] for r in runs}


def write_results(out_dir: Path, prefix: str, started: str, document: dict[str, Any]) -> None:
    out = out_dir / f"{prefix}-{started}.json"
    report.write_json(out, document)
    print(f"\nresults: {out}")


def describe_meshpy(meshpy: dict[str, object] | None) -> str:
    if meshpy is None:
        return "not importable"
    debug = "with debug info" if meshpy["debug_info"] else "no debug info"
    return (
        f"{meshpy['version']} built from {meshpy['build_revision']}"
        f" ({meshpy['extension']}, {meshpy['extension_mib']} MiB, {debug})"
    )


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


def retake_while_stolen(
    args: argparse.Namespace,
    measure_once: Callable[[], T],
    steal_pct: Callable[[T], float],
    label: str,
    limit: float,
) -> tuple[T, list[T]]:
    """``measure_once()``, measured again (up to ``args.retakes`` times) while the share of
    CPU time stolen during the run is above ``limit``: the run kept (the first under the
    limit, else the least stolen) and the runs set aside."""
    attempts = [measure_once()]
    while steal_pct(attempts[-1]) > limit and len(attempts) <= args.retakes:
        print(
            f"{label} measured again: {steal_pct(attempts[-1])}% of CPU time was stolen "
            f"(limit {limit:g}%)",
            flush=True,
        )
        attempts.append(measure_once())
    over = steal_pct(attempts[-1]) > limit
    kept = min(attempts, key=steal_pct) if over else attempts[-1]
    return kept, [run for run in attempts if run is not kept]


def retaken_for_steal(
    args: argparse.Namespace,
    measure_once: Callable[[], load.LoadResult],
    runs: SystemRuns,
    round_index: int,
    label: str,
    limit: float,
) -> load.LoadResult:
    """``retake_while_stolen`` for a wrk or h2load run; the runs set aside go in
    ``runs.retaken``."""
    kept, set_aside = retake_while_stolen(
        args, measure_once, load.LoadResult.steal_pct, label, limit
    )
    runs.retaken += [
        {
            "round": round_index + 1,
            "steal_pct": run.steal_pct(),
            "rps": round(run.rps, 1),
            "p99_us": run.latency_us.get("p99"),
        }
        for run in set_aside
    ]
    return kept


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
        result = retaken_for_steal(
            args,
            lambda: load.run_wrk(command, args.duration, system.cpu_service.cpu_seconds),
            saturation,
            round_index,
            label,
            args.steal_limit,
        )
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
    """``rate`` req/s over ``args.rate_connections`` connections, from ``--latency-load``."""
    schedule = load.FixedRate(
        url,
        args.rate_connections,
        args.duration,
        args.warmup,
        rate,
        root / f"{args.latency_load}-{system.name}-{round_index}-{rate:g}.log",
        load_pin,
        headers,
    )
    if args.latency_load == "open":
        command = load.openload_command(peers.openload_binary(), schedule)
        run = load.run_openload
    else:
        command = load.h2load_command(schedule, args.load_threads)
        run = load.run_h2load
    try:
        result = retaken_for_steal(
            args,
            lambda: run(command, schedule),
            fixed_rate,
            round_index,
            label,
            args.latency_steal_limit,
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
