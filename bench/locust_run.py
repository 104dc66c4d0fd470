"""``python -m bench.locust_run``: a locust run of the shop, seen by locust and by the mesh.

Locust reports what its simulated shoppers saw at the edge. The sidecars' /metrics say what
happened inside: which identities called whom, how each hop answered and how long it took.
Scraping every sidecar before and after the run and subtracting gives the mesh's view of
exactly that run, printed beside locust's, so a slow or failing endpoint can be traced to
the hop responsible.

    python -m bench.locust_run --demo [--users 200 --spawn-rate 50 --time 60s] [--port 8080]
    python -m bench.locust_run --host http://127.0.0.1:8080 --admin 127.0.0.1:9901 ...

With ``--demo`` it starts ``meshpy demo`` and stops it (SIGINT) afterwards; with ``--admin``
it scrapes the given sidecars' admin listeners around a run against ``--host``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
DEMO_READY_LINE = "Press Ctrl-C to stop."
DEMO_READY_TIMEOUT = 90.0  # ten Python processes start on what may be a small, busy machine
DEMO_STOP_TIMEOUT = 20.0  # the demo gives each group of children 5 s after SIGTERM
# A banner row of `meshpy demo`: "  frontend   app ... admin 127.0.0.1:43025".
_DEMO_SIDECAR_ROW = re.compile(r"^\s+(?P<name>\S+)\s+app \S+\s+sidecar .* admin (?P<admin>\S+)$")
_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(?P<key>\w+)="(?P<value>(?:[^"\\]|\\.)*)"')
_SPIFFE_ID = re.compile(r"/ns/(?P<namespace>[^/]+)/sa/(?P<account>[^/]+)$")

Labels = tuple[tuple[str, str], ...]
Metrics = dict[tuple[str, Labels], float]


# --- Prometheus text: parse, subtract, aggregate -------------------------------------------


def parse_metrics(text: str) -> Metrics:
    """Every sample of a /metrics answer, keyed by name and sorted labels."""
    metrics: Metrics = {}
    for line in text.splitlines():
        if line.startswith("#") or not (match := _SAMPLE.match(line)):
            continue
        labels = tuple(sorted(_LABEL.findall(match["labels"] or "")))
        metrics[(match["name"], labels)] = float(match["value"])
    return metrics


def metrics_delta(before: Metrics, after: Metrics) -> Metrics:
    """What the counters gained between two scrapes (series born during the run start at 0)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def sum_by(metrics: Metrics, name: str, label: str, **match: str) -> dict[str, float]:
    """The samples of `name` whose labels include `match`, summed per value of `label`."""
    sums: dict[str, float] = defaultdict(float)
    for (sample_name, labels), value in metrics.items():
        found = dict(labels)
        if sample_name == name and match.items() <= found.items():
            sums[found.get(label, "")] += value
    return dict(sums)


def histogram_quantile(quantile: float, buckets: Mapping[str, float]) -> float | None:
    """The `quantile` of a histogram given as cumulative counts per `le` bound, interpolated
    linearly inside its bucket as Prometheus' histogram_quantile() does; None when empty."""
    bounds = sorted((float(le), count) for le, count in buckets.items())
    if not bounds or bounds[-1][1] <= 0:
        return None
    rank = quantile * bounds[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in bounds:
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the last finite bound: that bound is all we know
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def status_classes(codes: Mapping[str, float]) -> dict[str, int]:
    """Response counts per status code folded into 2xx, 4xx, ... classes."""
    classes: dict[str, int] = defaultdict(int)
    for code, count in codes.items():
        if count:
            classes[f"{code[:1]}xx"] += int(count)
    return dict(sorted(classes.items()))


def short_identity(client_id: str) -> str:
    """`spiffe://mesh.local/ns/shop/sa/frontend` as `shop/frontend`, the policies' spelling."""
    match = _SPIFFE_ID.search(client_id)
    return f"{match['namespace']}/{match['account']}" if match else client_id or "(plaintext)"


# --- The mesh's view -----------------------------------------------------------------------


@dataclass
class Traffic:
    """Requests one listener or cluster of a sidecar handled during the run."""

    requests: int
    statuses: dict[str, int]
    p50_ms: float | None
    p99_ms: float | None


@dataclass
class SidecarView:
    inbound: Traffic
    callers: dict[str, int]  # inbound requests per calling identity, refused ones included
    denied: int  # inbound requests the authorization policy refused (403, never routed)
    outbound: dict[str, Traffic]  # per destination cluster


def _traffic(delta: Metrics, **match: str) -> Traffic:
    latency = sum_by(delta, "response_latency_ms_bucket", "le", **match)
    return Traffic(
        requests=int(sum(sum_by(delta, "request_total", "listener", **match).values())),
        statuses=status_classes(sum_by(delta, "response_total", "status_code", **match)),
        p50_ms=histogram_quantile(0.50, latency),
        p99_ms=histogram_quantile(0.99, latency),
    )


def sidecar_view(before: Metrics, after: Metrics) -> SidecarView:
    """One sidecar's part in the run, from two scrapes of its /metrics."""
    delta = metrics_delta(before, after)
    callers = sum_by(delta, "inbound_requests_total", "client_id", listener="inbound")
    clusters = sum_by(delta, "request_total", "cluster", listener="outbound")
    return SidecarView(
        inbound=_traffic(delta, listener="inbound"),
        callers={short_identity(caller): int(n) for caller, n in sorted(callers.items()) if n},
        denied=int(sum(sum_by(delta, "authz_deny_total", "rule", listener="inbound").values())),
        outbound={
            cluster: _traffic(delta, listener="outbound", cluster=cluster)
            for cluster, count in sorted(clusters.items())
            if count
        },
    )


def scrape(client: httpx.Client, admins: Mapping[str, str]) -> dict[str, Metrics]:
    """Every sidecar's /metrics now; a sidecar that does not answer ends the run."""
    metrics: dict[str, Metrics] = {}
    for name, url in admins.items():
        try:
            response = client.get(f"{url}/metrics")
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise SystemExit(f"cannot scrape {name} at {url}/metrics: {exc}") from None
        metrics[name] = parse_metrics(response.text)
    return metrics


# --- Locust's view -------------------------------------------------------------------------


@dataclass
class Endpoint:
    """One request name of the run (or all of them: "Aggregated"), as locust timed it."""

    method: str
    name: str
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


@dataclass
class LocustResult:
    endpoints: list[Endpoint]
    error_report: list[str]  # locust's own table of failures, when there were any


def locust_percentile(response_times: Mapping[int, int], quantile: float) -> float:
    """Locust's own percentile of its rounded response times (ms -> count), so the numbers
    match its web UI and summary."""
    total = sum(response_times.values())
    wanted, seen = int(total * quantile), 0
    for milliseconds in sorted(response_times, reverse=True):
        seen += response_times[milliseconds]
        if total - seen <= wanted:
            return float(milliseconds)
    return math.nan


def _endpoint(method: str, name: str, entries: list[dict], seconds: float) -> Endpoint:
    times: Counter[int] = Counter()
    for entry in entries:
        times.update({int(ms): count for ms, count in entry["response_times"].items()})
    requests = sum(entry["num_requests"] for entry in entries)
    return Endpoint(
        method=method,
        name=name,
        requests=requests,
        failures=sum(entry["num_failures"] for entry in entries),
        rps=requests / seconds if seconds > 0 else math.nan,
        p50_ms=locust_percentile(times, 0.50),
        p95_ms=locust_percentile(times, 0.95),
        p99_ms=locust_percentile(times, 0.99),
    )


def read_locust_stats(path: Path) -> list[Endpoint]:
    """Per request name, then "Aggregated", from locust's --json-file (written at exit; its
    --csv files are rewritten once a second and may miss the run's last second). Rates are
    over the whole run, from its first request to its last."""
    entries = sorted(json.loads(path.read_text()), key=lambda entry: entry["name"])
    if not entries:
        return []
    start = min(entry["start_time"] for entry in entries)
    seconds = max(entry["last_request_timestamp"] or start for entry in entries) - start
    endpoints = [_endpoint(entry["method"], entry["name"], [entry], seconds) for entry in entries]
    return [*endpoints, _endpoint("", "Aggregated", entries, seconds)]


def error_report(output: str) -> list[str]:
    """The "Error report" table locust prints at exit, if any request failed."""
    lines = output.splitlines()
    if "Error report" not in lines:
        return []
    report = lines[lines.index("Error report") :]
    return report[: report.index("")] if "" in report else report


def run_locust(
    host: str, users: int, spawn_rate: float, duration: str, workdir: Path
) -> LocustResult:
    """Run the locustfile headless, as a separate process (gevent patches what it imports)."""
    stats = workdir / "locust-stats"
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "-u", str(users), "-r", str(spawn_rate), "-t", duration, "--host", host,
            "--json-file", str(stats), "--only-summary"]  # fmt: skip
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    output = done.stdout + done.stderr
    # Exit status 1 only says that some requests failed, which the stats show.
    if done.returncode not in (0, 1) or not stats.with_suffix(".json").exists():
        tail = "\n".join(output.splitlines()[-20:])
        raise SystemExit(f"locust failed (status {done.returncode}):\n{tail}")
    return LocustResult(read_locust_stats(stats.with_suffix(".json")), error_report(output))


# --- The demo ------------------------------------------------------------------------------


@contextlib.contextmanager
def running_demo(port: int, data_dir: Path) -> Iterator[dict[str, str]]:
    """`meshpy demo` on `port` until the block ends; the admin URL of each app's sidecar."""
    log = data_dir / "demo.err"
    argv = [sys.executable, "-m", "meshpy", "demo", "--port", str(port),
            "--data-dir", str(data_dir / "demo")]  # fmt: skip
    with open(log, "wb") as stderr:
        # Its own process group: Ctrl-C reaches only this script, which stops the demo.
        demo = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            process_group=0,
        )
    try:
        yield _wait_for_banner(demo, log)
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(DEMO_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()


def _wait_for_banner(demo: subprocess.Popen[str], log: Path) -> dict[str, str]:
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert demo.stdout is not None
        for line in demo.stdout:  # to the end, so the pipe never fills
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, name="demo-stdout", daemon=True).start()
    admins: dict[str, str] = {}
    deadline = time.monotonic() + DEMO_READY_TIMEOUT
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            raise SystemExit(f"meshpy demo not ready after {DEMO_READY_TIMEOUT:g}s") from None
        if line is None:
            raise SystemExit(f"meshpy demo exited:\n{log.read_text(errors='replace')}")
        if match := _DEMO_SIDECAR_ROW.match(line):
            admins[match["name"]] = f"http://{match['admin']}"
        if line.strip() == DEMO_READY_LINE:
            return admins


# --- Report --------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.0f}"


def format_report(locust: LocustResult, mesh: dict[str, SidecarView]) -> str:
    """Locust's table, then the mesh's: a row per sidecar's inbound traffic and per cluster
    it called."""
    rows = [
        "locust's view (the shoppers, at the edge):",
        f"  {'endpoint':<46} {'requests':>8} {'failures':>8} {'req/s':>7}"
        f" {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}",
    ]
    for e in locust.endpoints:
        name = f"{e.method} {e.name}".strip()
        rows.append(
            f"  {name:<46} {e.requests:>8} {e.failures:>8} {e.rps:>7.1f}"
            f" {_ms(e.p50_ms):>7} {_ms(e.p95_ms):>7} {_ms(e.p99_ms):>7}"
        )
    rows += [f"  {line}" for line in locust.error_report]
    if not mesh:
        return "\n".join(rows)
    width = max(10, *map(len, mesh))
    rows += [
        "",
        "the mesh's view (sidecar /metrics, after minus before):",
        f"  {'sidecar':<{width}} {'traffic':<46} {'requests':>8} {'2xx':>7} {'4xx':>6} {'5xx':>6}"
        f" {'p50 ms':>7} {'p99 ms':>7}",
    ]
    for name, view in mesh.items():
        callers = ", ".join(f"{caller} {count}" for caller, count in view.callers.items())
        denied = f"; {view.denied} denied" if view.denied else ""
        traffic = [(f"in from {callers or 'nobody'}{denied}", view.inbound)]
        traffic += [(f"out to {cluster}", t) for cluster, t in view.outbound.items()]
        for label, t in traffic:
            s = t.statuses
            rows.append(
                f"  {name:<{width}} {label:<46} {t.requests:>8} {s.get('2xx', 0):>7}"
                f" {s.get('4xx', 0):>6} {s.get('5xx', 0):>6} {_ms(t.p50_ms):>7} {_ms(t.p99_ms):>7}"
            )
    rows.append(
        "  (sidecar p50/p99: interpolated within the latency histogram's buckets,"
        " 1, 2, 3, 4, 5, 10, 20, ..., 50, 100, 200 ms, ...)"
    )
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.locust_run",
        description="Run bench/locustfile.py headless and print locust's results beside the "
        "mesh's: what each sidecar's /metrics counted during the run.",
    )
    parser.add_argument("--users", "-u", type=int, default=200, help="simulated shoppers")
    parser.add_argument("--spawn-rate", "-r", type=float, default=50, help="users started/s")
    parser.add_argument("--time", "-t", default="60s", help="run time, as locust takes it")
    parser.add_argument("--port", type=int, default=8080, help="the demo's entry port")
    parser.add_argument("--host", help="where locust sends (default: http://127.0.0.1:PORT)")
    mesh = parser.add_mutually_exclusive_group()
    mesh.add_argument("--demo", action="store_true", help="start `meshpy demo` for the run")
    mesh.add_argument(
        "--admin", nargs="+", default=[], metavar="URL", help="sidecar admin listeners to scrape"
    )
    parser.add_argument("--json", type=Path, help="also write both views to this file")
    return parser.parse_args(argv)


def _admin_url(address: str) -> str:
    return address if "://" in address else f"http://{address}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host = args.host or f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory(prefix="meshpy-locust-") as tmp:
        workdir = Path(tmp)
        demo = running_demo(args.port, workdir) if args.demo else contextlib.nullcontext({})
        with demo as demo_admins:
            admins = demo_admins or {address: _admin_url(address) for address in args.admin}
            with httpx.Client(trust_env=False, timeout=10.0) as client:
                before = scrape(client, admins)
                locust = run_locust(host, args.users, args.spawn_rate, args.time, workdir)
                after = scrape(client, admins)
    mesh = {name: sidecar_view(before[name], after[name]) for name in admins}
    print(format_report(locust, mesh), flush=True)
    if args.json:
        report = {
            "locust": asdict(locust),
            "mesh": {name: asdict(view) for name, view in mesh.items()},
        }
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
