"""``python -m bench steal SUITE.json...``: how the p99 of fixed-rate runs moves with steal.

Every fixed-rate run of the given ``python -m bench suite`` results, kept or set aside for
steal, is compared with the median p99 of the runs kept for the same mode, rate and system
in the same file, and the ratios are grouped by the share of the machine's CPU time that was
stolen during the run. This is the evidence behind ``--latency-steal-limit``: rerun it on
your own results to see where steal starts to decide the tail on your host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Upper bounds (exclusive) of the steal bands, in per cent of the machine's CPU time.
BANDS = (0.5, 1.0, 2.0, 5.0, float("inf"))
INFLATED = 1.2  # a p99 this many times its group's median counts as inflated


class StealError(RuntimeError):
    """A file that is not a suite result."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench steal",
        description="The p99 of every fixed-rate run of suite results, as a ratio to the "
        "median p99 of its mode, rate and system, grouped by the CPU time stolen during it.",
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="SUITE.json")
    return parser.parse_args(argv)


def p99_ratios(document: dict[str, Any]) -> Iterator[tuple[float, float]]:
    """(steal %, p99 / median p99 of the kept runs of its group) for every fixed-rate run."""
    if document.get("scenario") != "suite":
        raise StealError("not a `python -m bench suite` result")
    for mode in document.get("modes", {}).values():
        retaken = {
            (entry["rate"], s["system"]): s.get("retaken", [])
            for entry in mode.get("summary", {}).get("latency", [])
            for s in entry["systems"]
        }
        for entry in mode.get("runs", {}).get("latency", []):
            for system, runs in entry["runs"].items():
                kept = [(r["cpu"]["steal_pct"], r["latency_us"]["p99"]) for r in runs]
                if len(kept) < 2:
                    continue
                median = statistics.median(p99 for _, p99 in kept)
                set_aside = [
                    (r["steal_pct"], r["p99_us"])
                    for r in retaken.get((entry["rate"], system), [])
                    if r.get("p99_us") is not None
                ]
                for steal, p99 in kept + set_aside:
                    yield steal, p99 / median


def band_label(lower: float, upper: float) -> str:
    if lower == 0:
        return f"under {upper:g}%"
    if upper == float("inf"):
        return f"{lower:g}% or more"
    return f"{lower:g}-{upper:g}%"


def table(ratios: list[tuple[float, float]]) -> str:
    over_heading = f"over {INFLATED:g}x"
    lines = [f"{'stolen':<12} {'runs':>5} {'median p99 ratio':>17} {over_heading:>9}", "-" * 46]
    for lower, upper in zip((0.0, *BANDS), BANDS, strict=False):
        band = [ratio for steal, ratio in ratios if lower <= steal < upper]
        label = f"{band_label(lower, upper):<12} {len(band):>5}"
        if not band:
            lines.append(f"{label} {'-':>17} {'-':>9}")
            continue
        over = sum(ratio > INFLATED for ratio in band) / len(band)
        lines.append(f"{label} {statistics.median(band):>17.2f} {over:>9.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    ratios: list[tuple[float, float]] = []
    for path in args.files:
        try:
            ratios += p99_ratios(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, StealError) as exc:
            print(f"python -m bench steal: {path}: {exc}", file=sys.stderr)
            return 2
    print(f"fixed-rate runs of {len(args.files)} suite result(s), p99 against its group's median:")
    print(table(ratios))
    return 0
