"""``python -m bench suite``: every scenario in one run, in interleaved rounds, with spreads.

For each mode (``shared``: nothing pinned; ``isolated``: the proxy on core 1, the load generator
and the upstream on core 0) it measures, against one nginx upstream:

- throughput at saturation of direct, meshpy, nginx and HAProxy with the same worker threads:
  HTTP/1.1 keep-alive with wrk and HTTP/2 (h2c, prior knowledge) with h2load, 100 B and 64 KiB
  responses, with the proxy's CPU time per request from ``/proc``;
- latency at fixed rates (h2load over HTTP/1.1, percentiles from its per-request log): at
  1,000 req/s and at 25%, 50% and 75% of the slowest peer's (nginx's or HAProxy's) HTTP/1.1
  100 B saturation throughput measured just before, as latency added over direct;
- the mesh path and the Python filter path, by running ``bench.mesh`` and ``bench.filters``
  with the suite's rounds and durations;

then memory and connection churn once, through ``bench.memory`` and ``bench.churn`` when those
modules are there. It prints every table, the performance targets as a PASS/FAIL checklist, writes
``bench/out/suite-<timestamp>.json`` and two PNG charts next to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from bench import chart, filters, harness, load, mesh, peers, report
from bench.report import SystemRuns, _ms, _num, _rate, _signed_ms

PARTS = ("throughput", "latency", "mesh", "filters", "memory", "churn")
MODES = ("shared", "isolated")
DIRECT = "direct"
PROXIES = ("meshpy", "nginx", "haproxy")
SYSTEMS = (DIRECT, *PROXIES)
PEERS = ("nginx", "haproxy")  # what meshpy is compared with; the slowest sets the rates
# Isolated mode: the proxy has core 1 to itself; load generator and upstream share core 0.
ISOLATED_PINNING = {"upstream": "0", "proxy": "1", "load": "0"}
# The fixed rates: a constant 1,000 req/s, then shares of the slowest peer's saturation.
DEFAULT_LATENCY_RATES = "1000,25%,50%,75%"
MAX_RATE = 1e6  # req/s; the load generators refuse more
TARGET_RATE_SHARE = 0.5  # the latency target is checked at this share of the slowest peer
PERCENTILES = ("p50", "p90", "p99", "p99.9")
CHARTS_DIR = Path(__file__).resolve().parent  # next to RESULTS.md
QUICK_DEFAULTS = {"rounds": 1, "duration": 2.0, "warmup": 0.0}
# Extra arguments for the modules run as parts, in a --quick run (the full run uses theirs).
QUICK_PART_ARGS = {
    "mesh": ["--handshake-seconds", "2"],
    "memory": [
        *("--soak", "10", "--soak-interval", "1"),
        *("--idle-connections", "500", "--h2-connections", "200", "--mtls-connections", "200"),
    ],
    "churn": ["--handshake-seconds", "2"],
}

# Issue targets.
THROUGHPUT_VS_BEST_PEER = 1.1
CPU_US_PER_REQUEST = 30.0
HANDSHAKES_PER_S = 3000.0


@dataclass(frozen=True)
class Config:
    """One throughput configuration: protocol between client and proxy, and response size."""

    protocol: str  # "h1" (wrk, keep-alive) or "h2" (h2load, h2c prior knowledge)
    path: str

    @property
    def size(self) -> int:
        return peers.LARGE_SIZE if self.path == peers.LARGE_PATH else len(peers.SMALL_BODY)

    @property
    def key(self) -> str:
        return f"{self.protocol}-{'64KiB' if self.path == peers.LARGE_PATH else '100B'}"

    @property
    def label(self) -> str:
        protocol = "HTTP/1.1" if self.protocol == "h1" else "HTTP/2"
        return f"{protocol} {'64 KiB' if self.path == peers.LARGE_PATH else '100 B'}"


CONFIGS = (
    Config("h1", "/"),
    Config("h1", peers.LARGE_PATH),
    Config("h2", "/"),
    Config("h2", peers.LARGE_PATH),
)
BASE_CONFIG = CONFIGS[0]  # its saturation sets the latency rates; the targets refer to it


# --------------------------------------------------------------------------- arguments


def _csv(
    parser: argparse.ArgumentParser, option: str, value: str, known: Sequence[str]
) -> list[str]:
    """The comma-separated names of ``value`` in ``known``'s order; an error for unknown ones."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        parser.error(f"{option}: expected a subset of {','.join(known)}, got {value!r}")
    return [name for name in known if name in names]


def default_mitmproxy_python() -> str:
    """The interpreter the existing mitmproxy virtualenv was made with, if there is one:
    asking ``bench.filters`` for another one would rebuild it under whoever else uses it."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        stamp = json.loads((filters.MITMPROXY_VENV / "meshpy-bench.json").read_text())
        return str(stamp["python"])
    return sys.executable


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench suite",
        description="Every benchmark in one run: throughput (HTTP/1.1 and HTTP/2, 100 B and "
        "64 KiB) and latency at fixed rates of direct, meshpy, nginx and HAProxy, the mesh "
        "path, the Python filter path, memory and churn; interleaved rounds, medians and "
        "spreads, the performance targets as a checklist, JSON and PNG charts.",
        epilog="With the defaults a run takes about 80 minutes on 2 cores (two modes of about "
        "30 minutes each, then memory with its 10-minute soak, and churn); --quick takes about "
        "5 minutes.",
    )
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run (default: all of {','.join(PARTS)})",
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help="shared (nothing pinned) and/or isolated (proxy on core 1, load and upstream on "
        "core 0) (default: both)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short try: 1 round of 2 s runs without warm-up, short handshake and "
        "soak phases (explicit --rounds/--duration/--warmup still win)",
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"throughput/latency systems, a subset of {','.join(SYSTEMS)} (default: all)",
    )
    parser.add_argument(
        "--configs",
        default=",".join(c.key for c in CONFIGS),
        help=f"throughput configurations, a subset of {','.join(c.key for c in CONFIGS)} "
        "(default: all)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="worker threads of every proxy (default 1)"
    )
    harness.add_load_arguments(parser, duration=10.0)
    parser.add_argument(
        "--h2-connections",
        type=int,
        default=10,
        help="h2load connections for HTTP/2 saturation (default 10)",
    )
    parser.add_argument(
        "--h2-streams",
        type=int,
        default=10,
        help="concurrent streams per HTTP/2 connection at saturation (default 10)",
    )
    parser.add_argument(
        "--rate-connections",
        type=int,
        default=50,
        help="h2load connections of the fixed-rate runs (default 50, as many as wrk's, so a "
        "rate near a proxy's saturation is reachable)",
    )
    parser.add_argument(
        "--latency-rates",
        default=DEFAULT_LATENCY_RATES,
        metavar="RATES",
        help="the fixed rates of the latency part, comma-separated: req/s (1000) or a share "
        "of the slowest peer's HTTP/1.1 saturation (50%%) (default: "
        f"{DEFAULT_LATENCY_RATES.replace('%', '%%')}; the latency target is checked at "
        f"{share_text(TARGET_RATE_SHARE)}%)",
    )
    harness.add_latency_steal_limit_argument(parser)
    harness.add_latency_load_argument(parser)
    parser.add_argument(
        "--mitmproxy-python",
        default=default_mitmproxy_python(),
        metavar="PYTHON",
        help="interpreter of mitmproxy's virtualenv (default: the one it was made with, so an "
        "existing one is reused; else this one)",
    )
    parser.add_argument(
        "--charts-dir",
        type=Path,
        default=CHARTS_DIR,
        help="where suite-throughput.png and suite-latency.png go (default bench/)",
    )
    harness.add_output_arguments(
        parser, "suite-<timestamp>.json", "only say what to install if a tool is missing"
    )
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK_DEFAULTS)
        args = parser.parse_args(argv)
    harness.require_positive_counts(
        parser,
        args,
        (
            "threads",
            "rounds",
            "connections",
            "load_threads",
            "rate_connections",
            "h2_connections",
            "h2_streams",
        ),
    )
    if args.duration < 1 or args.warmup < 0:
        parser.error("--duration must be at least 1 and --warmup not negative")
    if not (args.duration.is_integer() and args.warmup.is_integer()):
        parser.error("--duration and --warmup must be whole seconds (h2load takes no fractions)")
    args.parts = _csv(parser, "--only", args.only, PARTS)
    args.mode_names = _csv(parser, "--modes", args.modes, MODES)
    args.names = _csv(parser, "--systems", args.systems, SYSTEMS)
    args.config_keys = _csv(parser, "--configs", args.configs, [c.key for c in CONFIGS])
    args.rate_specs = _rate_specs(parser, args.latency_rates)
    return args


def _rate_specs(parser: argparse.ArgumentParser, value: str) -> list[tuple[str, float]]:
    """``--latency-rates`` as ("req/s", rate) and ("share", fraction) in the order given."""
    specs: list[tuple[str, float]] = []
    for item in (part.strip() for part in value.split(",")):
        kind = "share" if item.endswith("%") else "req/s"
        try:
            number = float(item.removesuffix("%")) / (100 if kind == "share" else 1)
        except ValueError:
            number = 0.0
        spec = (kind, number)
        if not (0 < number <= (1 if kind == "share" else MAX_RATE)) or spec in specs:
            parser.error(
                "--latency-rates: expected distinct req/s up to 1,000,000 or shares up to 100% "
                f"of the slowest peer, like {DEFAULT_LATENCY_RATES}; got {item!r} in {value!r}"
            )
        specs.append(spec)
    return specs


def pinning(mode: str) -> dict[str, str | None]:
    return dict(ISOLATED_PINNING) if mode == "isolated" else dict.fromkeys(ISOLATED_PINNING)


def pin_argv(mode: str) -> list[str]:
    """``--pin-*`` options giving a scenario module this mode's pinning."""
    return [
        arg
        for role, cpus in pinning(mode).items()
        if cpus is not None
        for arg in (f"--pin-{role}", cpus)
    ]


# --------------------------------------------------------------------------- HTTP/2 set-up


def check_h2(port: int, path: str) -> None:
    """One HTTP/2 (h2c prior knowledge) GET must succeed with a 2xx."""
    url = f"http://{peers.HOST}:{port}{path}"
    done = subprocess.run(
        ["h2load", "-n", "1", "-c", "1", url], capture_output=True, text=True, timeout=20
    )
    try:
        summary = load.parse_h2load_summary(done.stdout)
    except load.LoadError as exc:
        raise peers.PeerError(f"h2c GET {path}: {str(exc).splitlines()[0]}") from exc
    status = re.search(r"status codes: (\d+) 2xx", done.stdout)
    if summary["succeeded"] != 1 or status is None or status.group(1) != "1":
        first = next((line for line in done.stdout.splitlines() if "status codes" in line), "")
        raise peers.PeerError(f"h2c GET {path} on port {port} did not succeed: {first.strip()}")


@dataclass
class Target:
    """A system under test in this suite, with where HTTP/2 goes, or why it cannot."""

    system: peers.System
    h2_port: int | None
    h2_unavailable: str = ""

    @property
    def name(self) -> str:
        return self.system.name

    def port(self, config: Config) -> int | None:
        return self.system.port if config.protocol == "h1" else self.h2_port


# --------------------------------------------------------------------------- HTTP/2 saturation


def h2_saturation_command(
    url: str, args: argparse.Namespace, duration: float, pin: list[str], log: Path | None
) -> list[str]:
    return [
        *pin,
        "h2load",
        "-t",
        str(min(args.load_threads, args.h2_connections)),
        "-c",
        str(args.h2_connections),
        "-m",
        str(args.h2_streams),
        "-D",
        f"{duration:g}",
        *(["--log-file", str(log)] if log else []),
        url,
    ]


_FINISHED_RE = re.compile(r"finished in ([\d.]+)s,")


def run_h2_saturation(
    argv: list[str], duration: float, log: Path, cpu_seconds: Callable[[], float]
) -> load.LoadResult:
    """One measured h2load run; req/s counts 2xx responses over h2load's own run time."""
    start, cpu_start = load.CpuSample.now(), cpu_seconds()
    done = load._run(argv, timeout=duration + 60)
    cpu_used = cpu_seconds() - cpu_start
    cpu = load.CpuSample.now().usage_since(start)
    summary = load.parse_h2load_summary(done.stdout)
    latencies, bad_status = load.parse_h2load_log(log.read_text())
    log.unlink()
    latencies.sort()
    finished = _FINISHED_RE.search(done.stdout)
    seconds = float(finished.group(1)) if finished else duration
    n = len(latencies)
    return load.LoadResult(
        tool="h2load-h2c",
        command=argv,
        requests=n,
        duration_s=seconds,
        rps=round(n / seconds, 1) if seconds else 0.0,
        errors=summary["failed"] + summary["errored"] + summary["timeout"] + bad_status,
        latency_us=load.latency_percentiles(latencies),
        cpu=cpu,
        cpu_us_per_req=round(cpu_used * 1e6 / n, 2) if n else None,
        extra={"h2load_requests": summary},
    )


def measure_h2_saturation(
    args: argparse.Namespace,
    system: peers.System,
    url: str,
    round_index: int,
    load_pin: list[str],
    root: Path,
    runs: SystemRuns,
    label: str,
) -> None:
    """Like ``harness.measure_saturation``, with h2load over h2c: an unmeasured warm-up run,
    then the measured one, so the CPU time per request leaves the warm-up out."""
    log = root / f"h2load-h2-{system.name}-{round_index}.log"
    try:
        if args.warmup:
            load._run(h2_saturation_command(url, args, args.warmup, load_pin, None), 60)
        command = h2_saturation_command(url, args, args.duration, load_pin, log)
        result = harness.retaken_for_steal(
            args,
            lambda: run_h2_saturation(command, args.duration, log, system.cpu_service.cpu_seconds),
            runs,
            round_index,
            label,
            args.steal_limit,
        )
    except (load.LoadError, OSError) as exc:
        runs.failures.append(f"round {round_index + 1}: {str(exc).splitlines()[0]}")
        print(f"{label} failed: {exc}", file=sys.stderr, flush=True)
        return
    runs.runs.append(result)
    print(
        f"{label} {result.rps:>12,.0f} req/s  p50 {_ms(result.latency_us['p50'])} ms  p99 "
        f"{_ms(result.latency_us['p99'])} ms  errors {result.errors}  cpu "
        f"{result.cpu_us_per_req} µs/req  cpu busy {result.cpu['busy_pct']}% "
        f"steal {result.cpu['steal_pct']}%",
        flush=True,
    )


# --------------------------------------------------------------------------- one mode


@dataclass
class ModeRuns:
    """Everything measured in one mode's throughput and latency parts."""

    throughput: dict[str, dict[str, SystemRuns]] = field(default_factory=dict)  # config key
    not_applicable: dict[str, dict[str, str]] = field(default_factory=dict)  # config -> system
    rates: list[dict[str, Any]] = field(default_factory=list)  # {"rate", "label"}
    latency: list[dict[str, SystemRuns]] = field(default_factory=list)  # one per rate
    logs: dict[str, str] = field(default_factory=dict)
    did_not_start: dict[str, str] = field(default_factory=dict)  # system -> why

    def phases(self, names: Sequence[str]) -> dict[str, SystemRuns]:
        """A fresh run list per system; one that did not start has its reason recorded."""
        return {
            n: SystemRuns(n, failures=[self.did_not_start[n]] if n in self.did_not_start else [])
            for n in names
        }


def start_targets(
    args: argparse.Namespace,
    mode: str,
    configs: Sequence[Config],
    root: Path,
    stack: contextlib.ExitStack,
    did_not_start: dict[str, str],
) -> list[Target]:
    """The upstream and every system's proxy, started and checked with one request per
    configuration; the systems that fail go in ``did_not_start``, and a system that fails
    only over HTTP/2 keeps running with HTTP/2 marked n/a."""
    pins = pinning(mode)
    upstream = peers.upstream_nginx(root / "upstream", pins["upstream"])
    upstream_h2 = peers.add_h2c_listener(upstream)
    harness.start_service(stack, upstream, "/", len(peers.SMALL_BODY))
    print(f"[{mode}] upstream nginx on port {upstream.port} (h2c {upstream_h2})", flush=True)
    targets = []
    for name in args.names:
        system = peers.make_system(name, root, upstream, args.threads, pins["proxy"])
        target = Target(system, system.port)
        if name == DIRECT:
            target.h2_port = upstream_h2
        elif name == "nginx" and system.service is not None:
            target.h2_port = peers.add_h2c_listener(system.service)
        elif name == "meshpy" and system.service is not None:
            peers.force_http1_upstream(system.service)
        try:
            if system.service is not None:
                harness.start_service(stack, system.service, "/", len(peers.SMALL_BODY))
            for config in configs:
                if config.protocol == "h1":
                    peers.check_response(system.port, config.path, config.size)
        except peers.PeerError as exc:
            print(f"[{mode}] {name}: did not start: {exc}", file=sys.stderr)
            did_not_start[name] = f"did not start: {str(exc).splitlines()[0]}"
            continue
        for config in configs:
            if config.protocol == "h2" and target.h2_port is not None:
                try:
                    check_h2(target.h2_port, config.path)
                except (peers.PeerError, OSError, subprocess.TimeoutExpired) as exc:
                    target.h2_port, target.h2_unavailable = None, str(exc).splitlines()[0]
        h2 = target.h2_port or f"n/a, {target.h2_unavailable}"
        print(f"[{mode}] {name} on port {system.port} (HTTP/2: {h2})", flush=True)
        targets.append(target)
    return targets


def measure_throughput(
    args: argparse.Namespace,
    mode: str,
    configs: Sequence[Config],
    targets: list[Target],
    root: Path,
    runs: ModeRuns,
) -> None:
    """Every configuration of every system, systems interleaved and rotated every round."""
    load_pin = peers.pin_prefix(pinning(mode)["load"])
    script = load.write_wrk_script(root)
    for config in configs:
        runs.throughput.setdefault(config.key, runs.phases(args.names))
        runs.not_applicable.setdefault(config.key, {})
        for target in targets:
            if target.port(config) is None:
                reason = f"no HTTP/2: {target.h2_unavailable}"
                runs.not_applicable[config.key][target.name] = reason
    for round_index in range(args.rounds):
        for config in configs:
            for target in harness.rotated(targets, round_index):
                port = target.port(config)
                phase = runs.throughput[config.key][target.name]
                label = (
                    f"[{mode}] round {round_index + 1}/{args.rounds} {config.label:<15} "
                    f"{target.name:<8}"
                )
                if port is None or not harness.still_running(
                    target.system, round_index, label, [phase]
                ):
                    continue
                url = f"http://{peers.HOST}:{port}{config.path}"
                if config.protocol == "h1":
                    harness.measure_saturation(
                        args, target.system, url, round_index, script, load_pin, phase, (), label
                    )
                else:
                    measure_h2_saturation(
                        args, target.system, url, round_index, load_pin, root, phase, label
                    )


def latency_rates(
    summaries: list[dict[str, Any]], specs: Sequence[tuple[str, float]]
) -> list[dict[str, Any]]:
    """The fixed rates of ``specs``: req/s as given, shares of the slowest peer's saturation
    req/s (left out when no peer's was measured)."""
    slowest = slowest_peer(summaries)
    rates: list[dict[str, Any]] = []
    for kind, number in specs:
        if kind == "req/s":
            rates.append({"rate": number, "label": f"{number:,.0f} req/s", "share": None})
        elif slowest is not None:
            name, rps = slowest
            rate = float(round(number * rps))
            label = f"{share_text(number)} of {name} ({rate:,.0f} req/s)"
            rates.append({"rate": rate, "label": label, "share": number, "of": name})
    return rates


def share_text(share: float) -> str:
    """0.5 as 50%, 0.125 as 12.5%."""
    return f"{share * 100:g}%"


def slowest_peer(summaries: list[dict[str, Any]]) -> tuple[str, float] | None:
    """The peer (nginx or HAProxy; any proxy if neither ran) with the lowest median req/s."""
    measured = {s["system"]: s["rps_median"] for s in summaries if s.get("rounds_ok")}
    candidates = [n for n in PEERS if n in measured] or [n for n in PROXIES if n in measured]
    if not candidates:
        return None
    name = min(candidates, key=lambda n: measured[n])
    return name, measured[name]


def measure_latency(
    args: argparse.Namespace, mode: str, targets: list[Target], root: Path, runs: ModeRuns
) -> None:
    """h2load at each fixed rate over HTTP/1.1 to ``/``, systems interleaved every round."""
    load_pin = peers.pin_prefix(pinning(mode)["load"])
    base = summarize_throughput(
        list(runs.throughput[BASE_CONFIG.key].values()), runs.not_applicable[BASE_CONFIG.key]
    )
    runs.rates = latency_rates(base, args.rate_specs)
    runs.latency = [runs.phases(args.names) for _ in runs.rates]
    print(f"[{mode}] latency rates: {'; '.join(e['label'] for e in runs.rates)}", flush=True)
    for round_index in range(args.rounds):
        for entry, by_name in zip(runs.rates, runs.latency, strict=True):
            for target in harness.rotated(targets, round_index):
                phase = by_name[target.name]
                label = (
                    f"[{mode}] round {round_index + 1}/{args.rounds} "
                    f"{entry['rate']:>7,.0f} req/s {target.name:<8}"
                )
                if not harness.still_running(target.system, round_index, label, [phase]):
                    continue
                harness.measure_fixed_rate(
                    args,
                    target.system,
                    target.system.url("/"),
                    round_index,
                    entry["rate"],
                    load_pin,
                    root,
                    phase,
                    (),
                    label,
                )


def run_mode(args: argparse.Namespace, mode: str, root: Path) -> ModeRuns:
    """The throughput and latency parts of one mode, on one set of started processes."""
    runs = ModeRuns()
    with contextlib.ExitStack() as stack:
        configs = [c for c in CONFIGS if "throughput" in args.parts and c.key in args.config_keys]
        if "latency" in args.parts and BASE_CONFIG not in configs:
            print(f"[{mode}] measuring {BASE_CONFIG.label} saturation to set the latency rates")
            configs.insert(0, BASE_CONFIG)
        targets = start_targets(args, mode, configs, root, stack, runs.did_not_start)
        measure_throughput(args, mode, configs, targets, root, runs)
        if "latency" in args.parts:
            measure_latency(args, mode, targets, root, runs)
        for target in targets:
            if target.system.service is not None:
                runs.logs[target.name] = target.system.service.log_tail()
    return runs


# --------------------------------------------------------------------------- summaries


def summarize_throughput(
    runs: list[SystemRuns], not_applicable: dict[str, str], load_cpus: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Per system: median req/s, spread, ratio to direct, CPU µs per request (the proxy's;
    the upstream's for direct), how busy the load generator's CPUs were when it was pinned
    (``load_cpus``), or why the configuration does not apply."""
    direct = next((r for r in runs if r.name == DIRECT), None)
    baseline = direct.median("rps") if direct else None
    summaries = []
    for r in runs:
        if r.name in not_applicable:
            summaries.append(
                {"system": r.name, "rounds_ok": 0, "n/a": not_applicable[r.name], "failures": []}
            )
            continue
        s = r.summary(baseline, None)
        s.pop("cpu_vs_nginx", None)
        if s["rounds_ok"]:
            cpu = r.median("cpu_us_per_req")
            s["cpu_of"] = "upstream" if r.name == DIRECT else "proxy"
            s["cpu_us_per_req_median"] = None if cpu is None else round(cpu, 2)
            busy = [
                run.rps * run.cpu_us_per_req / 1e6
                for run in r.runs
                if run.cpu_us_per_req is not None
            ]
            s["cores_busy_median"] = round(statistics.median(busy), 2) if busy else None
            shares = (_busy_share(run, load_cpus) for run in r.runs)
            load_busy = [share for share in shares if share is not None]
            s["load_cores_busy_median"] = (
                round(statistics.median(load_busy), 2) if load_busy else None
            )
        summaries.append(s)
    return summaries


def _busy_share(run: load.LoadResult, cpus: Sequence[str]) -> float | None:
    """How busy ``cpus`` were over the run, as a share of their time (None: not recorded)."""
    by_cpu = run.cpu.get("busy_pct_by_cpu", {})
    shares = [by_cpu.get(cpu) for cpu in cpus]
    if not shares or None in shares:
        return None
    return sum(shares) / len(shares) / 100


def cpu_list(spec: str | None) -> list[str]:
    """The CPU numbers of a ``taskset -c`` list such as ``0``, ``0,2`` or ``0-3``."""
    cpus: list[str] = []
    for part in (spec or "").split(","):
        first, _, last = part.partition("-")
        if first:
            cpus += [str(n) for n in range(int(first), int(last or first) + 1)]
    return cpus


def summarize_latency(runs: list[SystemRuns]) -> list[dict[str, Any]]:
    """Fixed-rate summaries with every percentile's difference to direct's at the same rate."""
    return report.latency_over(runs, DIRECT, "latency_us_added")


def summarize_mode(runs: ModeRuns, load_cpus: Sequence[str] = ()) -> dict[str, Any]:
    configs = {c.key: c for c in CONFIGS}
    return {
        "throughput": [
            {
                "config": key,
                "label": configs[key].label,
                "protocol": configs[key].protocol,
                "path": configs[key].path,
                "systems": summarize_throughput(
                    list(by_name.values()), runs.not_applicable[key], load_cpus
                ),
            }
            for key, by_name in runs.throughput.items()
        ],
        "latency": [
            {**entry, "systems": summarize_latency(list(by_name.values()))}
            for entry, by_name in zip(runs.rates, runs.latency, strict=True)
        ],
    }


# --------------------------------------------------------------------------- tables


def throughput_table(blocks: list[dict[str, Any]]) -> str:
    header = (
        f"{'configuration':<15} {'system':<8} {'req/s median':>12} {'spread (min-max)':>19} "
        f"{'vs direct':>9} {'p99 ms':>8} {'errors':>6} {'cpu µs/req':>10} {'cores':>5} "
        f"{'load':>5}"
    )
    lines = [header, "-" * len(header)]
    for block in blocks:
        for s in block["systems"]:
            start = f"{block['label']:<15} {s['system']:<8}"
            if "n/a" in s:
                lines.append(f"{start} n/a: {s['n/a'][:70]}")
            elif not s["rounds_ok"]:
                lines.append(f"{start} failed: {'; '.join(s['failures'])[:70]}")
            else:
                cpu = _num(s["cpu_us_per_req_median"], ".1f")
                cpu += "*" if s["cpu_of"] == "upstream" and cpu != "-" else ""
                cores = _num(s.get("cores_busy_median"), ".2f")
                load_busy = _num(s.get("load_cores_busy_median"), ".2f")
                spread = f"{_rate(s['rps_min'])}-{_rate(s['rps_max'])}"
                lines.append(
                    f"{start} {_rate(s['rps_median']):>12} {spread:>19} "
                    f"{_num(s['ratio_to_direct'], '.2f'):>9} "
                    f"{_ms(s['latency_us_median']['p99']):>8} {s['errors']:>6} {cpu:>10} "
                    f"{cores:>5} {load_busy:>5}"
                )
    lines.append(
        "cpu µs/req: the proxy's own CPU time per request; * direct: the upstream's;"
        " cores: how much of a core that CPU time kept busy (req/s x cpu µs/req);"
        " load: how busy the load generator's and upstream's core was (isolated mode), near"
        " 1.00 it set the pace, not the proxy"
    )
    for block in blocks:
        lines += [f"{block['label']}: {line}" for line in report.retaken_lines(block["systems"])]
    return "\n".join(lines)


def latency_table(summaries: list[dict[str, Any]]) -> str:
    header = (
        f"{'system':<8} {'req/s done':>10} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} "
        + " ".join(f"{'+' + p + ' ms':>10}" for p in PERCENTILES)
        + f" {'>gap':>5} {'errors':>6}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        if not s["rounds_ok"]:
            lines.append(f"{s['system']:<8} failed: {'; '.join(s['failures'])[:80]}")
            continue
        lat, added = s["latency_us_median"], s["latency_us_added"] or {}
        lines.append(
            f"{s['system']:<8} {_rate(s['rps_median']):>10} {_ms(lat['p50']):>8} "
            f"{_ms(lat['p99']):>8} {_ms(lat['p99.9']):>9} "
            + " ".join(f"{_signed_ms(added.get(p)):>10}" for p in PERCENTILES)
            + f" {s['slower_than_gap']:>5} {s['errors']:>6}"
        )
    return "\n".join(lines + report.retaken_lines(summaries))


def print_mode(args: argparse.Namespace, mode: str, summary: dict[str, Any]) -> None:
    pins = pinning(mode)
    where = (
        "nothing pinned"
        if mode == "shared"
        else (f"proxy on core {pins['proxy']}, load and upstream on core {pins['load']}")
    )
    if summary["throughput"]:
        print(
            f"\n[{mode}: {where}] Throughput at saturation, medians over {args.rounds} "
            f"round(s) (HTTP/1.1: wrk -c{args.connections}; HTTP/2: h2load "
            f"-c{args.h2_connections} -m{args.h2_streams}, h2c):"
        )
        print(throughput_table(summary["throughput"]))
    load_name, gap_note = harness.fixed_rate_load(args)
    for entry in summary["latency"]:
        print(
            f"\n[{mode}] Latency at {entry['label']} ({load_name}, {args.rate_connections} "
            f"connections, medians over {args.rounds} round(s); +: over direct at this rate; "
            f"{gap_note}):"
        )
        print(latency_table(entry["systems"]))
        for line in filters.unsustained(entry["rate"], entry["systems"]):
            print(line)


# --------------------------------------------------------------------------- mesh, filters


def scenario_argv(args: argparse.Namespace, mode: str) -> list[str]:
    """The suite's load settings as options of ``bench.mesh`` / ``bench.filters``."""
    argv = [
        "--threads",
        str(args.threads),
        "--rounds",
        str(args.rounds),
        "--duration",
        f"{args.duration:g}",
        "--warmup",
        f"{args.warmup:g}",
        "-c",
        str(args.connections),
        "--load-threads",
        str(args.load_threads),
        "--rate-connections",
        str(args.rate_connections),
        "--steal-limit",
        f"{args.steal_limit:g}",
        "--latency-steal-limit",
        f"{args.latency_steal_limit:g}",
        "--latency-load",
        args.latency_load,
        "--retakes",
        str(args.retakes),
        *pin_argv(mode),
    ]
    return argv + (["--no-install"] if args.no_install else [])


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a part: the suite stops after its processes are gone."""


def in_workspace(args: argparse.Namespace, run: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """``run`` in a fresh workspace; its results, or ``{"error": ...}`` if a peer failed."""
    results, code = harness.run_in_workspace(args.keep_tmp, run)
    if code == 130:
        raise Interrupted
    return {"error": "a process did not start (see above)"} if code is not None else results


def run_mesh(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """``bench.mesh`` with the suite's settings: one/two sidecars, plaintext and mTLS."""
    argv = scenario_argv(args, mode) + (QUICK_PART_ARGS["mesh"] if args.quick else [])
    mesh_args = mesh.parse_args(argv)
    print(f"\n[{mode}] mesh: python -m bench mesh {shlex.join(argv)}", flush=True)
    results = in_workspace(args, lambda root: mesh.run_benchmark(mesh_args, root))
    if "error" in results:
        return results
    saturation = mesh.summarize_saturation(results["saturation"])
    fixed_rate = mesh.summarize_fixed_rate(results["fixed_rate"])
    handshakes = mesh.summarize_handshakes(results["handshakes"], results["handshake_failures"])
    ratios = mesh.ratios(saturation)
    print(f"\n[{mode}] Mesh path at saturation (wrk keep-alive, medians over {args.rounds}):")
    print(mesh.saturation_table(saturation))
    if fixed_rate:
        print(f"\n[{mode}] Mesh path at {mesh_args.rate:g} req/s (+: over two-hop-plain):")
        print(mesh.fixed_rate_table(fixed_rate))
    if mesh_args.handshake_seconds:
        print("\n".join(mesh.handshake_lines(handshakes, mesh_args)))
    print("\n".join(mesh.ratio_lines(ratios)))
    return {
        "argv": argv,
        "saturation": {"summary": saturation, "runs": harness.runs_json(results["saturation"])},
        "fixed_rate": {"summary": fixed_rate, "runs": harness.runs_json(results["fixed_rate"])},
        "handshakes": {"summary": handshakes, "runs": results["handshakes"]},
        "ratios": ratios,
        "proxy_logs": results["logs"],
    }


def run_filters(args: argparse.Namespace, mode: str, mitmdump: Path | None) -> dict[str, Any]:
    """``bench.filters`` with the suite's settings: no filter, sync, async, mitmproxy."""
    argv = scenario_argv(args, mode)
    argv += ["--mitmproxy-python", args.mitmproxy_python]
    if mitmdump is None:
        argv += ["--systems", ",".join(n for n in filters.SYSTEMS if n != filters.MITMPROXY)]
    filter_args = filters.parse_args(argv)
    print(f"\n[{mode}] filters: python -m bench filters {shlex.join(argv)}", flush=True)
    results = in_workspace(args, lambda root: filters.run_benchmark(filter_args, mitmdump, root))
    if "error" in results:
        return results
    saturation = filters.summarize_saturation(results["saturation"])
    fixed_rate = {
        r: filters.summarize_fixed_rate(runs) for r, runs in results["fixed_rate"].items()
    }
    print(f"\n[{mode}] Python filters at saturation (medians over {args.rounds}):")
    print(filters.saturation_table(saturation))
    for rate, summaries in fixed_rate.items():
        print(f"\n[{mode}] Python filters at {rate:g} req/s (+: over {filters.NO_FILTER}):")
        print(filters.fixed_rate_table(summaries))
        for line in filters.unsustained(rate, summaries):
            print(line)
    print("\n".join(filters.ratio_lines(saturation)))
    return {
        "argv": argv,
        "saturation": {"summary": saturation, "runs": harness.runs_json(results["saturation"])},
        "fixed_rate": [
            {"rate": rate, "summary": fixed_rate[rate], "runs": harness.runs_json(runs)}
            for rate, runs in results["fixed_rate"].items()
        ],
        "targets": filters.targets(saturation),
        "meshpy_filter_metrics": results["metrics"],
        "proxy_logs": results["logs"],
    }


# --------------------------------------------------------------------------- memory, churn


def optional_module(name: str) -> tuple[ModuleType | None, str]:
    """``bench.<name>`` if it can be imported and has ``parse_args`` and ``measure``."""
    try:
        module = importlib.import_module(f"bench.{name}")
    except ImportError as exc:
        return None, f"skipped: module not available (bench.{name}: {exc})"
    if not all(callable(getattr(module, f, None)) for f in ("parse_args", "measure")):
        return None, f"skipped: bench.{name} has no parse_args()/measure() to call"
    return module, ""


def run_optional(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """``bench.<name>.measure(parse_args(argv), command)``'s document, or why it did not run."""
    module, skipped = optional_module(name)
    if module is None:
        print(f"\n{name}: {skipped}", flush=True)
        return {"skipped": skipped}
    argv = ["--threads", str(args.threads), "--duration", f"{args.duration:g}"]
    argv += ["-c", str(args.connections)] + (["--keep-tmp"] if args.keep_tmp else [])
    if name == "churn":
        argv += ["--rounds", str(args.rounds), "--warmup", f"{args.warmup:g}"]
        argv += ["--steal-limit", f"{args.steal_limit:g}", "--retakes", str(args.retakes)]
    argv += QUICK_PART_ARGS.get(name, []) if args.quick else []
    command = shlex.join(["python", "-m", "bench", name, *argv])
    print(f"\n{name}: {command}", flush=True)
    try:
        document: dict[str, Any] = module.measure(module.parse_args(argv), command)
    except KeyboardInterrupt as exc:
        raise Interrupted from exc
    except Exception as exc:  # a failing part written elsewhere must not lose the whole run
        print(f"{name} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    return document


# --------------------------------------------------------------------------- targets


def _check(target: str, value: str | None, met: bool | None, note: str = "") -> dict[str, Any]:
    return {"target": target, "value": value, "met": met, "note": note}


def _by_system(summaries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["system"]: s for s in summaries}


def throughput_checks(mode: str, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """meshpy's HTTP/1.1 100 B req/s against the better peer, and its CPU per request."""
    block = next((b for b in summary["throughput"] if b["config"] == BASE_CONFIG.key), None)
    systems = _by_system(block["systems"]) if block else {}
    meshpy = systems.get("meshpy", {}).get("rps_median")
    best = max((systems.get(p, {}).get("rps_median") or 0 for p in PEERS), default=0)
    ratio = round(meshpy / best, 3) if meshpy and best else None
    cpu = systems.get("meshpy", {}).get("cpu_us_per_req_median")
    return [
        _check(
            f"[{mode}] HTTP/1.1 keep-alive req/s: meshpy >= {THROUGHPUT_VS_BEST_PEER:g}x the "
            "better of nginx and HAProxy (same threads)",
            None if ratio is None else f"{ratio:.2f}x",
            None if ratio is None else ratio >= THROUGHPUT_VS_BEST_PEER,
            _cores_note(mode, systems),
        ),
        _check(
            f"[{mode}] meshpy CPU per plaintext request (HTTP/1.1 100 B) <= "
            f"{CPU_US_PER_REQUEST:g} µs",
            None if cpu is None else f"{cpu:.1f} µs",
            None if cpu is None else cpu <= CPU_US_PER_REQUEST,
        ),
    ]


def _cores_note(mode: str, systems: dict[str, dict[str, Any]]) -> str:
    """In isolated mode, how busy each proxy's own core was: one that did not fill it was
    held back by the load core, so the ratio is that core's ceiling, not the proxy's."""
    if mode != "isolated":
        return ""
    notes = []
    for what, key in (("proxy", "cores_busy_median"), ("load", "load_cores_busy_median")):
        busy = {name: systems.get(name, {}).get(key) for name in ("meshpy", *PEERS)}
        if None not in busy.values():
            shares = ", ".join(f"{name} {share:.2f}" for name, share in busy.items())
            notes.append(f"{what} core busy: {shares}")
    return "; ".join(notes)


def latency_check(mode: str, summary: dict[str, Any]) -> dict[str, Any]:
    """meshpy's added p99 at half the slowest peer's saturation against both peers'."""
    target = (
        f"[{mode}] added p99 at {TARGET_RATE_SHARE:.0%} of the slowest peer's saturation: "
        "meshpy no worse than nginx and HAProxy"
    )
    entry = next((e for e in summary["latency"] if e["share"] == TARGET_RATE_SHARE), None)
    if entry is None:
        return _check(target, None, None)
    added = {
        name: (s.get("latency_us_added") or {}).get("p99")
        for name, s in _by_system(entry["systems"]).items()
    }
    peers_added = [added.get(p) for p in PEERS]
    if added.get("meshpy") is None or None in peers_added:
        return _check(target, None, None)
    worst_allowed = min(v for v in peers_added if v is not None)
    value = "meshpy {} ms; nginx {} ms; haproxy {} ms".format(
        *(_signed_ms(added[n]) for n in ("meshpy", *PEERS))
    )
    rounds = rounds_at_or_below(_by_system(entry["systems"]))
    if rounds:
        value += f" (meshpy's p99 at or below {rounds} rounds)"
    return _check(target, value, added["meshpy"] <= worst_allowed)


def rounds_at_or_below(systems: dict[str, dict[str, Any]]) -> str:
    """In how many rounds meshpy's p99 was at or below each peer's, as "nginx's in 5/9,
    haproxy's in 6/9"; empty unless every system has a run in every round (the runs of a
    round then share an index) and the peers are there."""
    if any(name not in systems for name in ("meshpy", *PEERS)):
        return ""
    by_round = {name: systems[name].get("p99_us_by_run") or [] for name in ("meshpy", *PEERS)}
    if any(systems[name].get("failures") for name in by_round):
        return ""
    ours = by_round["meshpy"]
    if not ours or any(len(theirs) != len(ours) for theirs in by_round.values()):
        return ""
    counts = (sum(a <= b for a, b in zip(ours, by_round[p], strict=True)) for p in PEERS)
    return ", ".join(f"{p}'s in {n}/{len(ours)}" for p, n in zip(PEERS, counts, strict=True))


def mesh_check(mode: str, result: dict[str, Any]) -> dict[str, Any]:
    target = f"[{mode}] mTLS two-hop >= {mesh.TARGET:g}x plaintext two-hop req/s"
    entry = next((r for r in result.get("ratios", []) if "target" in r), None)
    if entry is None or entry["value"] is None:
        return _check(target, None, None, result.get("error", ""))
    return _check(target, f"{entry['value']:.2f}x", entry["met"])


def filter_checks(mode: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    texts = (
        "trivial Python filter >= 0.5x no-filter req/s",
        "trivial Python filter >= 20x mitmproxy req/s",
    )
    found = result.get("targets") or [{"value": None, "met": None}] * len(texts)
    return [
        _check(
            f"[{mode}] {text}",
            None if t["value"] is None else f"{t['value']:g}x",
            t["met"],
            result.get("error", ""),
        )
        for text, t in zip(texts, found, strict=True)
    ]


def module_targets(document: dict[str, Any]) -> list[dict[str, Any]]:
    """A module's targets: ``targets`` (memory) or ``handshake_target`` (churn), as checks.

    churn judges TLS 1.3 handshakes with a server certificate only: the measured one-core rate
    (``met_measured``), saying what one core's CPU time per handshake would allow; the check is
    on the measured rate. Its mutual-TLS one-core capacity (``mtls_capacity_per_s``: client
    certificate verified too) is shown beside it, not judged."""
    found = list(document.get("targets") or [])
    if document.get("handshake_target"):
        found.append(document["handshake_target"])
    checks = []
    for t in found:
        value, met = t.get("value"), t.get("met", t.get("met_measured"))
        if value is None and t.get("measured_per_s") is not None:
            value = f"{t['measured_per_s']:,.0f}/s"
            if t.get("capacity_per_s") is not None:
                value += (
                    f" (one-core capacity from CPU per handshake: {t['capacity_per_s']:,.0f}/s)"
                )
            if t.get("mtls_capacity_per_s") is not None:
                value += (
                    "; mutual TLS (client certificate verified too), for reference: one-core "
                    f"capacity {t['mtls_capacity_per_s']:,.0f}/s"
                )
        checks.append(_check(t["target"], value, met))
    return checks


def module_checks(
    name: str, document: dict[str, Any], expected: Sequence[str]
) -> list[dict[str, Any]]:
    """A module's own targets, or each of ``expected`` as not measured with the reason."""
    checks = module_targets(document)
    if checks:
        return checks
    why = document.get("skipped") or document.get("error") or f"bench.{name} not run"
    return [_check(text, None, None, why) for text in expected]


def checklist(
    modes: dict[str, dict[str, Any]], memory: dict[str, Any], churn: dict[str, Any]
) -> list[dict[str, Any]]:
    """The performance targets, in order; a figure that was not measured is ``met: None``."""
    checks = []
    for mode, result in modes.items():
        summary = result.get("summary", {"throughput": [], "latency": []})
        throughput, cpu = throughput_checks(mode, summary)
        checks += [throughput, latency_check(mode, summary)]
        checks.append(mesh_check(mode, result.get("mesh", {"error": "mesh not run"})))
        checks += filter_checks(mode, result.get("filters", {"error": "filters not run"}))
        checks.append(cpu)
    checks += module_checks(
        "memory",
        memory,
        (
            "idle sidecar RSS <= 40 MB",
            "<= 50 KB per idle keep-alive connection",
            "RSS flat over the soak",
        ),
    )
    checks += module_checks(
        "churn",
        churn,
        (f">= {HANDSHAKES_PER_S:,.0f} TLS 1.3 handshakes/s on one core (server certificate)",),
    )
    return checks


def checklist_lines(checks: list[dict[str, Any]]) -> list[str]:
    lines = []
    for c in checks:
        if c["met"] is None:
            why = f" ({c['note']})" if c["note"] else ""
            lines.append(f"  [ -- ] {c['target']}: not measured{why}")
        else:
            lines.append(f"  [{'PASS' if c['met'] else 'FAIL'}] {c['target']}: {c['value']}")
    return lines


# --------------------------------------------------------------------------- charts


def throughput_rows(modes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per mode, configuration and system that has a median, for the chart."""
    return [
        {
            "mode": mode,
            "config": block["label"],
            "system": s["system"],
            "median": s["rps_median"],
            "min": s["rps_min"],
            "max": s["rps_max"],
        }
        for mode, result in modes.items()
        for block in result.get("summary", {}).get("throughput", [])
        for s in block["systems"]
        if s.get("rounds_ok")
    ]


def latency_rows(modes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per mode, rate and proxy with the latency it adds over direct, in ms.

    ``rate`` places the row in the chart's grid, ``title`` is the rate as measured."""
    return [
        {
            "mode": mode,
            "rate": rate_key(entry),
            "title": entry["label"],
            "system": s["system"],
            "added_ms": {p: s["latency_us_added"][p] / 1000 for p in PERCENTILES},
        }
        for mode, result in modes.items()
        for entry in result.get("summary", {}).get("latency", [])
        for s in entry["systems"]
        if s.get("rounds_ok") and s["system"] != DIRECT and s.get("latency_us_added")
    ]


def rate_key(entry: dict[str, Any]) -> str:
    """The rate's place in the chart's grid: the same in every mode, whose rates differ."""
    if entry.get("share") is None:
        return entry["label"]
    return f"{share_text(entry['share'])} of slowest peer"


def write_charts(charts_dir: Path, modes: dict[str, dict[str, Any]]) -> list[str]:
    """The two PNGs (if matplotlib is installed and there is something to draw); their paths."""
    throughput, latency = throughput_rows(modes), latency_rows(modes)
    if not throughput and not latency:
        return []
    if not chart.available():
        print(f"\ncharts skipped: matplotlib is not installed ({chart.INSTALL_HINT})")
        return []
    written = []
    if throughput:
        written.append(str(chart.throughput_chart(charts_dir / "suite-throughput.png", throughput)))
    if latency:
        written.append(str(chart.latency_chart(charts_dir / "suite-latency.png", latency)))
    print(f"\ncharts: {', '.join(written)}")
    return written


# --------------------------------------------------------------------------- main


def header(
    args: argparse.Namespace,
    command_line: str,
    machine: dict[str, Any],
    meshpy: dict[str, object] | None,
    revision: str | None,
    tools: dict[str, str],
) -> list[str]:
    lines = [
        *harness.header_start(command_line, machine),
        f"meshpy: {harness.describe_meshpy(meshpy)}; checkout {revision or 'unknown'}; "
        f"Python {machine['python']}",
        f"meshpy extension: {meshpy['path'] if meshpy else '-'}",
        "tools: " + "; ".join(f"{name}: {version}" for name, version in tools.items()),
        f"parts: {','.join(args.parts)}; modes: {','.join(args.mode_names)}; rounds "
        f"{args.rounds}; {args.duration:g} s runs after {args.warmup:g} s warm-up; proxy "
        f"threads {args.threads}; wrk -t{args.load_threads} -c{args.connections}; h2load "
        f"-c{args.h2_connections} -m{args.h2_streams}; fixed rates {args.latency_rates} over "
        f"{args.rate_connections} connections with --latency-load {args.latency_load}",
        harness.steal_line(args),
    ]
    return lines + harness.header_warnings(machine, meshpy)


def prepare(args: argparse.Namespace) -> tuple[Path | None, str]:
    """Install or find the peers (and mitmproxy for the filter part); mitmdump, or why not."""
    peers.ensure_tools(install=not args.no_install)
    if {"mesh", "churn"} & set(args.parts):
        peers.tlsload_binary()  # built before any measurement, not in the middle of one
    if {"latency", "mesh", "filters"} & set(args.parts):
        harness.build_latency_load(args)
    if "filters" not in args.parts:
        return None, ""
    try:
        mitmdump = filters.ensure_mitmproxy(args.mitmproxy_python, "mitmproxy", not args.no_install)
        return mitmdump, ""
    except (peers.PeerError, subprocess.CalledProcessError, OSError) as exc:
        return None, f"mitmproxy unavailable, filters run without it: {exc}"


def tool_versions(mitmdump: Path | None) -> dict[str, str]:
    tools = peers.tool_versions()
    if mitmdump is not None:
        tools["mitmproxy"] = filters.mitmproxy_version(mitmdump).get("mitmproxy", "unknown")
    return tools


def run_parts(
    args: argparse.Namespace, mitmdump: Path | None
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Every selected part, mode by mode; memory and churn once at the end."""
    modes: dict[str, dict[str, Any]] = {}
    for mode in args.mode_names:
        result: dict[str, Any] = {"pinning": pinning(mode)}
        modes[mode] = result
        if {"throughput", "latency"} & set(args.parts):
            runs = in_workspace(args, lambda root, mode=mode: {"runs": run_mode(args, mode, root)})
            if "runs" in runs:
                load_cpus = cpu_list(pinning(mode)["load"])
                result["summary"] = summarize_mode(runs["runs"], load_cpus)
                result["runs"] = {
                    "throughput": {
                        key: harness.runs_json(list(by.values()))
                        for key, by in runs["runs"].throughput.items()
                    },
                    "latency": [
                        {"rate": entry["rate"], "runs": harness.runs_json(list(by.values()))}
                        for entry, by in zip(runs["runs"].rates, runs["runs"].latency, strict=True)
                    ],
                }
                result["proxy_logs"] = runs["runs"].logs
                print_mode(args, mode, result["summary"])
            else:
                result["error"] = runs["error"]
        if "mesh" in args.parts:
            result["mesh"] = run_mesh(args, mode)
        if "filters" in args.parts:
            result["filters"] = run_filters(args, mode, mitmdump)
    memory = run_optional(args, "memory") if "memory" in args.parts else {"skipped": "not selected"}
    churn = run_optional(args, "churn") if "churn" in args.parts else {"skipped": "not selected"}
    return modes, memory, churn


def failed(modes: dict[str, dict[str, Any]], memory: dict[str, Any], churn: dict[str, Any]) -> bool:
    """Whether any part did not run or any run failed (n/a configurations are not failures)."""
    for result in modes.values():
        parts = [result, result.get("mesh", {}), result.get("filters", {})]
        if any("error" in part for part in parts):
            return True
        summary = result.get("summary", {"throughput": [], "latency": []})
        blocks = summary["throughput"] + summary["latency"]
        if any(s["failures"] for block in blocks for s in block["systems"]):
            return True
    return "error" in memory or "error" in churn


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command_line = shlex.join(["python", "-m", "bench", "suite", *argv])
    harness.handle_signals()
    try:
        mitmdump, mitmproxy_note = prepare(args)
    except (peers.PeerError, subprocess.CalledProcessError, OSError) as exc:
        print(exc, file=sys.stderr)
        return 2
    meshpy = peers.meshpy_info()
    if meshpy is None:
        print(harness.MESHPY_MISSING, file=sys.stderr)
        return 2
    machine = report.machine_info()
    revision = report.git_revision(harness.REPO)
    tools = tool_versions(mitmdump)
    started = time.strftime("%Y%m%d-%H%M%S")
    print("\n".join(header(args, command_line, machine, meshpy, revision, tools)))
    if mitmproxy_note:
        print(f"warning: {mitmproxy_note}")
    print(flush=True)

    try:
        modes, memory, churn = run_parts(args, mitmdump)
    except Interrupted:
        return 130
    checks = checklist(modes, memory, churn)
    print("\nPerformance targets (measured on this machine in this run):")
    print("\n".join(checklist_lines(checks)))
    print(f"loadavg at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    charts = write_charts(args.charts_dir, modes)
    document = {
        "scenario": "suite",
        "command": command_line,
        "started": started,
        "machine": machine,
        "loadavg_at_end": list(os.getloadavg()),
        "tools": tools,
        "meshpy": meshpy,
        "meshpy_changed_during_run": harness.meshpy_changed(meshpy),
        "revision": revision,
        "settings": harness.settings_json(args),
        "modes": modes,
        "memory": memory,
        "churn": churn,
        "targets": checks,
        "charts": charts,
        "median_note": f"medians over {args.rounds} round(s); spreads are min-max",
    }
    harness.write_results(args.out_dir, "suite", started, document)
    return 1 if failed(modes, memory, churn) else 0
