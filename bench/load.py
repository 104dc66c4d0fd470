"""Load generation: wrk for throughput at saturation, h2load for latency at a fixed rate."""

from __future__ import annotations

import json
import math
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# wrk calls done() once at the end; without request()/response() hooks wrk keeps its fast path.
# Latencies are printed in microseconds, unrounded, instead of wrk's formatted text.
WRK_SCRIPT = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH-JSON {\"requests\": %d, \"duration_us\": %d, \"bytes\": %d, " ..
    "\"errors\": {\"connect\": %d, \"read\": %d, \"write\": %d, \"status\": %d, " ..
    "\"timeout\": %d}, \"latency_us\": {\"mean\": %.1f, \"stdev\": %.1f, \"p50\": %.1f, " ..
    "\"p90\": %.1f, \"p99\": %.1f, \"p99.9\": %.1f, \"max\": %.1f}}\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""

MARKER = "BENCH-JSON "


class LoadError(RuntimeError):
    """A load generator failed or printed something unexpected."""


def _split_ticks(fields: list[int]) -> tuple[int, int, int]:
    """(busy, idle, steal) of one /proc/stat cpu line's counters."""
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
    fields = fields + [0] * (8 - len(fields))
    idle = fields[3] + fields[4]
    steal = fields[7]
    return sum(fields[:8]) - idle - steal, idle, steal


@dataclass
class CpuSample:
    """CPU time counters from /proc/stat, in clock ticks: all CPUs, and each by number."""

    busy: int
    idle: int
    steal: int
    by_cpu: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @classmethod
    def now(cls) -> CpuSample:
        by_cpu = {}
        with open("/proc/stat") as stat:
            total = _split_ticks([int(x) for x in stat.readline().split()[1:]])
            for line in stat:
                name, *counters = line.split()
                if not name.startswith("cpu"):
                    break
                by_cpu[name.removeprefix("cpu")] = _split_ticks([int(x) for x in counters])
        return cls(*total, by_cpu)

    def usage_since(self, start: CpuSample) -> dict[str, Any]:
        """Percent of all CPU time between ``start`` and now that was busy, idle or stolen,
        and how busy each CPU was (``busy_pct_by_cpu``, by CPU number)."""
        busy, idle, steal = self.busy - start.busy, self.idle - start.idle, self.steal - start.steal
        total = max(busy + idle + steal, 1)
        by_cpu = {}
        for cpu, ticks in self.by_cpu.items():
            was = start.by_cpu.get(cpu)
            if was is not None:
                spent = [now - then for now, then in zip(ticks, was, strict=True)]
                by_cpu[cpu] = round(100 * spent[0] / max(sum(spent), 1), 1)
        return {
            "busy_pct": round(100 * busy / total, 1),
            "idle_pct": round(100 * idle / total, 1),
            "steal_pct": round(100 * steal / total, 1),
            "busy_pct_by_cpu": by_cpu,
        }


@dataclass
class LoadResult:
    """One measurement of one system."""

    tool: str
    command: list[str]
    requests: int
    duration_s: float
    rps: float
    errors: int
    latency_us: dict[str, float]
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_us_per_req: float | None = None  # CPU time of the watched processes (wrk runs only)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def steal_pct(self) -> float:
        """The share of the machine's CPU time stolen during the run (0 if not recorded)."""
        return float(self.cpu.get("steal_pct", 0.0))


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"{argv[0]} did not finish within {timeout:.0f}s") from exc
    if done.returncode != 0:
        raise LoadError(f"{' '.join(argv)} exited {done.returncode}\n{done.stdout}{done.stderr}")
    return done


# --------------------------------------------------------------------------- wrk


def write_wrk_script(directory: Path) -> Path:
    path = directory / "report.lua"
    path.write_text(WRK_SCRIPT)
    return path


def header_args(headers: Sequence[str]) -> list[str]:
    """``-H "name: value"`` for each header (wrk, h2load and meshpy-openload take it)."""
    return [arg for header in headers for arg in ("-H", header)]


def wrk_command(
    url: str,
    threads: int,
    connections: int,
    duration: float,
    script: Path,
    pin: list[str],
    headers: Sequence[str] = (),
) -> list[str]:
    return [
        *pin,
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        # wrk takes whole seconds only: a fractional duration (a short warm-up) is rounded up.
        f"-d{math.ceil(duration)}s",
        "--latency",
        *header_args(headers),
        "-s",
        str(script),
        url,
    ]


def parse_wrk(output: str) -> dict[str, Any]:
    """The JSON object that ``WRK_SCRIPT`` prints at the end of a wrk run."""
    for line in output.splitlines():
        if line.startswith(MARKER):
            return dict(json.loads(line[len(MARKER) :]))
    raise LoadError(f"no {MARKER.strip()} line in wrk output:\n{output}")


def run_wrk(argv: list[str], duration: float, cpu_seconds: Callable[[], float]) -> LoadResult:
    """One wrk run; ``cpu_seconds`` reads the CPU time of the processes charged for it."""
    start, cpu_start = CpuSample.now(), cpu_seconds()
    done = _run(argv, timeout=duration + 60)
    cpu_used = cpu_seconds() - cpu_start
    cpu = CpuSample.now().usage_since(start)
    data = parse_wrk(done.stdout)
    requests = int(data["requests"])
    seconds = data["duration_us"] / 1e6
    errors = dict(data["errors"])
    return LoadResult(
        tool="wrk",
        command=argv,
        requests=requests,
        duration_s=round(seconds, 3),
        rps=round(requests / seconds, 1) if seconds else 0.0,
        errors=sum(errors.values()),
        latency_us=dict(data["latency_us"]),
        cpu=cpu,
        cpu_us_per_req=round(cpu_used * 1e6 / requests, 2) if requests else None,
        extra={"errors_by_kind": errors, "bytes": data["bytes"]},
    )


# --------------------------------------------------------------------------- h2load


@dataclass(frozen=True)
class FixedRate:
    """A fixed-rate run: ``rate`` requests/s in total over ``connections`` to ``url``, the
    first ``warmup`` seconds unmeasured, each request's latency in ``log_file``."""

    url: str
    connections: int
    duration: float
    warmup: float
    rate: float
    log_file: Path
    pin: list[str]
    headers: Sequence[str] = ()

    @property
    def gap_us(self) -> float:
        """The time between two scheduled requests on one connection."""
        return 1e6 * self.connections / self.rate


def h2load_command(schedule: FixedRate, threads: int) -> list[str]:
    """h2load over HTTP/1.1, each connection sending its share of the rate."""
    return [
        *schedule.pin,
        "h2load",
        "--h1",
        "-t",
        str(min(threads, schedule.connections)),
        "-c",
        str(schedule.connections),
        "-D",
        f"{schedule.duration:g}",
        "--warm-up-time",
        f"{schedule.warmup:g}",
        "--rps",
        f"{schedule.rate / schedule.connections:g}",
        "--log-file",
        str(schedule.log_file),
        *header_args(schedule.headers),
        schedule.url,
    ]


def openload_command(binary: Path, schedule: FixedRate) -> list[str]:
    """meshpy-openload over HTTP/1.1: requests ``1/rate`` apart."""
    return [
        *schedule.pin,
        str(binary),
        "--url",
        schedule.url,
        "--rate",
        f"{schedule.rate:g}",
        "--connections",
        str(schedule.connections),
        "--duration",
        f"{schedule.duration:g}",
        "--warmup",
        f"{schedule.warmup:g}",
        "--log-file",
        str(schedule.log_file),
        *header_args(schedule.headers),
    ]


_REQUESTS_RE = re.compile(
    r"requests: (?P<total>\d+) total, (?P<started>\d+) started, (?P<done>\d+) done, "
    r"(?P<succeeded>\d+) succeeded, (?P<failed>\d+) failed, (?P<errored>\d+) errored, "
    r"(?P<timeout>\d+) timeout"
)


def parse_h2load_summary(output: str) -> dict[str, int]:
    match = _REQUESTS_RE.search(output)
    if match is None:
        raise LoadError(f"no request summary in h2load output:\n{output}")
    return {key: int(value) for key, value in match.groupdict().items()}


def parse_h2load_log(text: str) -> tuple[list[float], int]:
    """Per-request latencies (µs) and the count of non-2xx responses from ``--log-file``.

    Each line is ``<start µs since epoch>\\t<status>\\t<µs until the response ended>``;
    status -1 marks a request that failed without a response.
    """
    latencies: list[float] = []
    bad_status = 0
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        status, latency = int(parts[1]), float(parts[2])
        if not 200 <= status < 300:
            bad_status += 1
            continue
        latencies.append(latency)
    return latencies, bad_status


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 if empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_percentiles(latencies: list[float]) -> dict[str, float]:
    """mean, p50, p90, p99, p99.9 and max (µs) of an ascending list."""
    n = len(latencies)
    return {
        "mean": round(sum(latencies) / n, 1) if n else 0.0,
        **{p: percentile(latencies, float(p[1:])) for p in ("p50", "p90", "p99", "p99.9")},
        "max": latencies[-1] if n else 0.0,
    }


def run_openload(argv: list[str], schedule: FixedRate) -> LoadResult:
    """Runs meshpy-openload, whose latencies run from when each request fell due."""

    def outcome(stdout: str, latencies: list[float]) -> tuple[int, int, dict[str, Any]]:
        try:
            summary = json.loads(stdout)
        except json.JSONDecodeError as exc:
            raise LoadError(f"meshpy-openload printed no summary: {stdout[:200]!r}") from exc
        # Nothing waits uncounted here; what >gap counts instead is the requests that went
        # out more than one connection's gap after they fell due, a wait their latency
        # includes. The log holds the failed requests (status -1); the unanswered never
        # started one.
        return summary["unanswered"], summary["late_starts"], {"openload": summary}

    return _run_fixed_rate("openload", argv, schedule, outcome)


def run_h2load(argv: list[str], schedule: FixedRate) -> LoadResult:
    def outcome(stdout: str, latencies: list[float]) -> tuple[int, int, dict[str, Any]]:
        summary = parse_h2load_summary(stdout)
        # h2load times a request from when it is written, and a connection carries one
        # request at a time. A response slower than the gap between scheduled requests on its
        # connection delays the next one, and that wait is not counted (coordinated
        # omission). Count such responses: when there are none, the percentiles are free of it.
        late = sum(1 for value in latencies if value > schedule.gap_us)
        errors = summary["failed"] + summary["errored"] + summary["timeout"]
        return errors, late, {"h2load_requests": summary}

    return _run_fixed_rate("h2load", argv, schedule, outcome)


def _run_fixed_rate(
    tool: str,
    argv: list[str],
    schedule: FixedRate,
    outcome: Callable[[str, list[float]], tuple[int, int, dict[str, Any]]],
) -> LoadResult:
    """Runs a fixed-rate load whose per-request log has h2load's format. ``outcome`` reads the
    tool's output: its errors beyond the log's non-2xx lines, its >gap count and its extras."""
    start = CpuSample.now()
    done = _run(argv, timeout=schedule.duration + schedule.warmup + 60)
    cpu = CpuSample.now().usage_since(start)
    latencies, bad_status = parse_h2load_log(schedule.log_file.read_text())
    schedule.log_file.unlink()
    latencies.sort()
    errors, late, extra = outcome(done.stdout, latencies)
    n = len(latencies)
    return LoadResult(
        tool=tool,
        command=argv,
        requests=n,
        duration_s=schedule.duration,
        rps=round(n / schedule.duration, 1),
        errors=errors + bad_status,
        latency_us=latency_percentiles(latencies),
        cpu=cpu,
        extra={
            "target_rps": schedule.rate,
            "gap_us": round(schedule.gap_us, 1),
            "slower_than_gap": late,
            **extra,
        },
    )
