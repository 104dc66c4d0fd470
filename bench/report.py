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
    # Runs measured again because too much CPU time was stolen: {"round", "steal_pct", "rps"}.
    retaken: list[dict[str, Any]] = field(default_factory=list)

    def _values(self, key: str) -> list[float]:
        return [run.latency_us[key] for run in self.runs]

    def median(self, attribute: str) -> float | None:
        """Median over rounds of a ``LoadResult`` attribute (None if no round has it)."""
        values = [v for run in self.runs if (v := getattr(run, attribute)) is not None]
        return statistics.median(values) if values else None

    def _cpu_summary(self, nginx_cpu_us: float | None) -> dict[str, Any]:
        """CPU time per request; for ``direct``, which has no proxy, the upstream's."""
        cpu = self.median("cpu_us_per_req")
        proxied = self.name != "direct"
        ratio = None
        if proxied and cpu is not None and nginx_cpu_us:
            ratio = round(cpu / nginx_cpu_us, 3)
        return {
            "cpu_of": "proxy" if proxied else "upstream",
            "cpu_us_per_req_median": None if cpu is None else round(cpu, 2),
            "cpu_vs_nginx": ratio,
        }

    def summary(self, baseline_rps: float | None, nginx_cpu_us: float | None) -> dict[str, Any]:
        if not self.runs:
            return {
                "system": self.name,
                "rounds_ok": 0,
                "retaken": self.retaken,
                "failures": self.failures,
            }
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
            "steal_pct_max": max(run.steal_pct() for run in self.runs),
            "retaken": self.retaken,
            "failures": self.failures,
        }
        if self.runs[0].tool == "wrk":
            summary.update(self._cpu_summary(nginx_cpu_us))
        if "slower_than_gap" in self.runs[0].extra:  # fixed-rate runs, from either load
            summary["slower_than_gap"] = sum(run.extra["slower_than_gap"] for run in self.runs)
            summary["p99_us_by_run"] = [run.latency_us["p99"] for run in self.runs]
        return summary


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.3f}"


def _signed_ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:+.3f}"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _cpu(summary: dict[str, Any]) -> str:
    """CPU µs per request, starred when it is the upstream's rather than a proxy's."""
    us = summary["cpu_us_per_req_median"]
    if us is None:
        return "-"
    return f"{us:.1f}" + ("*" if summary["cpu_of"] == "upstream" else "")


def retaken_rounds(retaken: list[dict[str, Any]]) -> str:
    """Runs set aside for steal ({"round", "steal_pct", ...}), by round: ``round 1 (31.5%,
    12% stolen), round 3 (22% stolen)``."""
    by_round: dict[int, list[str]] = {}
    for run in retaken:
        by_round.setdefault(run["round"], []).append(f"{run['steal_pct']:g}%")
    return ", ".join(f"round {n} ({', '.join(steals)} stolen)" for n, steals in by_round.items())


def retaken_lines(summaries: list[dict[str, Any]]) -> list[str]:
    """A footnote naming the runs that were measured again because of steal, if any."""
    systems = [
        f"{s['system']} {retaken_rounds(s['retaken'])}" for s in summaries if s.get("retaken")
    ]
    return ["measured again for steal: " + "; ".join(systems)] if systems else []


def saturation_table(summaries: list[dict[str, Any]]) -> str:
    header = (
        f"{'system':<9} {'req/s median':>12} {'spread (min-max)':>19} {'vs direct':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'cpu µs/req':>10} {'cpu vs nginx':>12}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        if not s["rounds_ok"]:
            lines.append(f"{s['system']:<9} failed: {'; '.join(s['failures'])[:80]}")
            continue
        spread = f"{_rate(s['rps_min'])}-{_rate(s['rps_max'])}"
        lat = s["latency_us_median"]
        lines.append(
            f"{s['system']:<9} {_rate(s['rps_median']):>12} {spread:>19} "
            f"{_ratio(s['ratio_to_direct']):>9} {_ms(lat['p50']):>8} {_ms(lat['p99']):>8} "
            f"{s['errors']:>7} {_cpu(s):>10} {_ratio(s['cpu_vs_nginx']):>12}"
        )
    if any(s.get("cpu_of") == "upstream" for s in summaries):
        lines.append("* direct has no proxy: its cpu µs/req is the upstream nginx's")
    return "\n".join(lines + retaken_lines(summaries))


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
    return "\n".join(lines + retaken_lines(summaries))


def latency_over(runs: list[SystemRuns], base_name: str, key: str) -> list[dict[str, Any]]:
    """Fixed-rate summaries with each latency percentile's difference to ``base_name``'s,
    under ``key``."""
    summaries = {r.name: r.summary(None, None) for r in runs}
    base = summaries.get(base_name, {}).get("latency_us_median")
    for s in summaries.values():
        s.pop("ratio_to_direct", None)
        lat = s.get("latency_us_median")
        s[key] = (
            {p: round(lat[p] - base[p], 1) for p in ("p50", "p90", "p99", "p99.9")}
            if lat and base
            else None
        )
    return [summaries[r.name] for r in runs]


def latency_over_table(summaries: list[dict[str, Any]], width: int, key: str) -> str:
    """The fixed-rate table with +p50/+p99 columns from ``key`` (see ``latency_over``)."""
    header = (
        f"{'system':<{width}} {'req/s done':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'p99.9 ms':>9} {'max ms':>8} {'>gap':>6} {'errors':>7} {'+p50 ms':>8} {'+p99 ms':>8}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        if not s["rounds_ok"]:
            lines.append(f"{s['system']:<{width}} failed: {'; '.join(s['failures'])[:80]}")
            continue
        lat, added = s["latency_us_median"], s[key] or {}
        lines.append(
            f"{s['system']:<{width}} {_rate(s['rps_median']):>10} {_ms(lat['p50']):>8} "
            f"{_ms(lat['p90']):>8} {_ms(lat['p99']):>8} {_ms(lat['p99.9']):>9} "
            f"{_ms(lat['max']):>8} {s['slower_than_gap']:>6} {s['errors']:>7} "
            f"{_signed_ms(added.get('p50')):>8} {_signed_ms(added.get('p99')):>8}"
        )
    return "\n".join(lines + retaken_lines(summaries))


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
