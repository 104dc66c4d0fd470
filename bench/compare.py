"""``python -m bench compare BEFORE.json AFTER.json``: what changed between two runs.

Both files are results of ``python -m bench`` or of ``python -m bench suite`` (the same
kind). For every system and configuration measured in both: the median req/s before and
after, the change, and whether it is beyond both runs' spreads (the after run's slowest
round faster than the before run's fastest, or the other way round); the CPU µs per request
before and after; and for the suite's fixed-rate runs, the p99 added over direct. Settings
that differ between the runs (rounds, durations, threads, the machine) are listed first,
since they change what the numbers mean.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Settings whose difference makes the two runs measure different things.
COMPARED_SETTINGS = (
    "threads",
    "rounds",
    "duration",
    "warmup",
    "connections",
    "load_threads",
    "h2_connections",
    "h2_streams",
    "rate_connections",
    "path",
    "steal_limit",
    "latency_steal_limit",
    "latency_load",
    "retakes",
)
COMPARED_MACHINE = ("cpu_model", "nproc", "kernel")


class CompareError(RuntimeError):
    """A file that is not a bench result, or two results of different kinds."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench compare",
        description="Compare two result files of `python -m bench` or `python -m bench suite`: "
        "median req/s and its change (beyond both spreads or not), CPU µs per request, and "
        "the suite's added p99 at fixed rates, per system and configuration.",
    )
    parser.add_argument("before", type=Path, help="the earlier results JSON")
    parser.add_argument("after", type=Path, help="the later results JSON")
    return parser.parse_args(argv)


def load_result(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CompareError(f"{path}: {exc}") from None
    if not isinstance(document, dict) or not ("modes" in document or "saturation" in document):
        raise CompareError(f"{path}: not a result of `python -m bench` or `python -m bench suite`")
    return document


def kind(document: dict[str, Any]) -> str:
    return "suite" if "modes" in document else "bench"


def throughput_blocks(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(mode, configuration label, system summary) for every throughput measurement."""
    if kind(document) == "bench":
        settings = document.get("settings", {})
        label = f"HTTP/1.1 {settings.get('path', '/')}"
        for summary in document["saturation"]["summary"]:
            yield "-", label, summary
        return
    for mode, result in document["modes"].items():
        for block in result.get("summary", {}).get("throughput", []):
            for summary in block["systems"]:
                yield mode, block["label"], summary


def latency_entries(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(mode, rate label, system summary) for every fixed-rate measurement of the suite."""
    if kind(document) == "bench":
        return
    for mode, result in document["modes"].items():
        for entry in result.get("summary", {}).get("latency", []):
            for summary in entry["systems"]:
                yield mode, entry["label"], summary


def measured(summary: dict[str, Any]) -> bool:
    return bool(summary.get("rounds_ok")) and summary.get("rps_median") is not None


def verdict(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Whether the after run's spread of req/s lies wholly above or below the before run's."""
    if after["rps_min"] > before["rps_max"]:
        return "faster"
    if after["rps_max"] < before["rps_min"]:
        return "slower"
    return "within spread"


def _change(before: float, after: float) -> str:
    return f"{(after / before - 1) * 100:+.1f}%" if before else "-"


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Lines naming each setting and machine property that differs between the runs."""
    lines = []
    for section, keys in (("settings", COMPARED_SETTINGS), ("machine", COMPARED_MACHINE)):
        was, now = before.get(section, {}), after.get(section, {})
        for key in keys:
            if key in was and key in now and was[key] != now[key]:
                lines.append(f"  {section}.{key}: {was[key]!r} -> {now[key]!r}")
    return lines


def describe(name: str, path: Path, document: dict[str, Any]) -> str:
    revision = (document.get("meshpy") or {}).get("build_revision") or document.get("revision")
    return (
        f"{name}: {path} (meshpy built from {revision or 'unknown'}, started "
        f"{document.get('started', '?')})\n  {document.get('command', '')}"
    )


def throughput_table(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    earlier = {(m, c, s["system"]): s for m, c, s in throughput_blocks(before) if measured(s)}
    header = (
        f"{'mode':<9} {'configuration':<15} {'system':<8} {'before req/s':>12} "
        f"{'after req/s':>12} {'change':>7} {'verdict':<14} {'cpu µs/req':>14}"
    )
    lines = [header, "-" * len(header)]
    for mode, config, now in throughput_blocks(after):
        was = earlier.get((mode, config, now["system"]))
        if was is None or not measured(now):
            continue
        cpu = (
            f"{_cpu(was.get('cpu_us_per_req_median'))} -> {_cpu(now.get('cpu_us_per_req_median'))}"
        )
        lines.append(
            f"{mode:<9} {config:<15} {now['system']:<8} {was['rps_median']:>12,.0f} "
            f"{now['rps_median']:>12,.0f} {_change(was['rps_median'], now['rps_median']):>7} "
            f"{verdict(was, now):<14} {cpu:>14}"
        )
    return lines if len(lines) > 2 else []


def latency_table(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    def added_p99(summary: dict[str, Any]) -> float | None:
        return (summary.get("latency_us_added") or {}).get("p99")

    earlier = {(m, r, s["system"]): added_p99(s) for m, r, s in latency_entries(before)}
    header = f"{'mode':<9} {'rate':<22} {'system':<8} {'before ms':>10} {'after ms':>10}"
    lines = [header, "-" * len(header)]
    for mode, rate, summary in latency_entries(after):
        was, now = earlier.get((mode, rate, summary["system"])), added_p99(summary)
        if was is None or now is None:
            continue
        lines.append(
            f"{mode:<9} {rate:<22} {summary['system']:<8} {was / 1000:>+10.3f} {now / 1000:>+10.3f}"
        )
    return lines if len(lines) > 2 else []


def compare(before_path: Path, after_path: Path) -> str:
    before, after = load_result(before_path), load_result(after_path)
    if kind(before) != kind(after):
        raise CompareError(
            f"{before_path} is a `{kind(before)}` result and {after_path} a `{kind(after)}` one"
        )
    out = [describe("before", before_path, before), describe("after", after_path, after)]
    changed = differences(before, after)
    if changed:
        out += ["", "These differ between the runs, so their numbers measure different things:"]
        out += changed
    throughput = throughput_table(before, after)
    latency = latency_table(before, after)
    if throughput:
        out += ["", "Throughput at saturation (medians; verdict: beyond both runs' spreads?):"]
        out += throughput
    if latency:
        out += ["", "p99 added over direct at fixed rates (medians):"]
        out += latency
    if not throughput and not latency:
        out += ["", "No system and configuration was measured in both runs."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        print(compare(args.before, args.after))
    except CompareError as exc:
        print(f"python -m bench compare: {exc}", file=sys.stderr)
        return 2
    return 0
