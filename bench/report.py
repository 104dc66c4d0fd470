"""Machine description, per-system summaries across rounds, the terminal table, the JSON file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.load import CpuSample, LoadResult


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision(repo: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return done.stdout.strip() + ("-dirty" if dirty else "")


def machine_info(sample_seconds: float = 1.0) -> dict[str, Any]:
    """What the machine is, and how busy it was (before any benchmark process started)."""
    before = CpuSample.now()
    time.sleep(sample_seconds)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
        "cpu_before_start": CpuSample.now().usage_since(before),
    }


@dataclass
class SystemRuns:
    """The measurements of one system in one phase (one per round) and why any round failed."""

    name: str
    runs: list[LoadResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def _values(self, key: str) -> list[float]:
        return [run.latency_us[key] for run in self.runs]

    def summary(self, baseline_rps: float | None) -> dict[str, Any]:
        if not self.runs:
            return {"system": self.name, "rounds_ok": 0, "failures": self.failures}
        rps = [run.rps for run in self.runs]
        median_rps = statistics.median(rps)
        latency = {
            key: statistics.median(self._values(key))
            for key in self.runs[0].latency_us
            if key != "stdev"
        }
        summary: dict[str, Any] = {
            "system": self.name,
            "rounds_ok": len(self.runs),
            "rps_median": round(median_rps, 1),
            "rps_min": min(rps),
            "rps_max": max(rps),
            "ratio_to_direct": round(median_rps / baseline_rps, 3) if baseline_rps else None,
            "latency_us_median": latency,
            "errors": sum(run.errors for run in self.runs),
            "steal_pct_max": max(run.cpu.get("steal_pct", 0.0) for run in self.runs),
            "failures": self.failures,
        }
        cpu = [
            r.extra["proxy_cpu_us_per_request"]
            for r in self.runs
            if "proxy_cpu_us_per_request" in r.extra
        ]
        summary["proxy_cpu_us_per_request_median"] = statistics.median(cpu) if cpu else None
        if self.runs[0].tool == "h2load":
            summary["slower_than_gap"] = sum(run.extra["slower_than_gap"] for run in self.runs)
        return summary


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.3f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _cpu(us: float | None) -> str:
    return "-" if us is None else f"{us:.1f}"


def saturation_table(summaries: list[dict[str, Any]]) -> str:
    header = (
        f"{'system':<9} {'req/s median':>12} {'spread (min-max)':>19} {'vs direct':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'cpu us/req':>10}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        if not s["rounds_ok"]:
            lines.append(f"{s['system']:<9} failed: {'; '.join(s['failures'])[:80]}")
            continue
        spread = f"{_rate(s['rps_min'])}-{_rate(s['rps_max'])}"
        ratio = "-" if s["ratio_to_direct"] is None else f"{s['ratio_to_direct']:.2f}"
        lat = s["latency_us_median"]
        lines.append(
            f"{s['system']:<9} {_rate(s['rps_median']):>12} {spread:>19} {ratio:>9} "
            f"{_ms(lat['p50']):>8} {_ms(lat['p99']):>8} {s['errors']:>7} "
            f"{_cpu(s['proxy_cpu_us_per_request_median']):>10}"
        )
    return "\n".join(lines)


def fixed_rate_table(summaries: list[dict[str, Any]]) -> str:
    header = (
        f"{'system':<9} {'req/s done':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'p99.9 ms':>9} {'max ms':>8} {'>gap':>6} {'errors':>7}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        if not s["rounds_ok"]:
            lines.append(f"{s['system']:<9} failed: {'; '.join(s['failures'])[:80]}")
            continue
        lat = s["latency_us_median"]
        lines.append(
            f"{s['system']:<9} {_rate(s['rps_median']):>10} {_ms(lat['p50']):>8} "
            f"{_ms(lat['p90']):>8} {_ms(lat['p99']):>8} {_ms(lat['p99.9']):>9} "
            f"{_ms(lat['max']):>8} {s['slower_than_gap']:>6} {s['errors']:>7}"
        )
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
