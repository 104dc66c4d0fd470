"""``python -m bench filters``: what a Python filter costs on a meshpy route, and mitmproxy.

One meshpy process (``--workers N``) serves three routes to the same upstream: one without
filters, one whose filter has a plain ``on_request`` header check, one with the same check
as ``async def``. mitmproxy, installed from PyPI into its own virtualenv, runs as a reverse
proxy with an addon doing the same check. Every request carries the header, so all of them
reach the upstream. The four are measured in interleaved rounds, like ``python -m bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import harness, load, peers, report
from bench.harness import (
    describe_meshpy,
    measure_fixed_rate,
    measure_saturation,
    start_service,
    still_running,
)
from bench.report import SystemRuns, _ms, _num, _rate, _ratio

NO_FILTER, SYNC, ASYNC, MITMPROXY = "meshpy-none", "meshpy-sync", "meshpy-async", "mitmproxy"
SYSTEMS = (NO_FILTER, SYNC, ASYNC, MITMPROXY)
# The path each system is loaded on: the meshpy routes match on it; mitmproxy takes any.
PATHS = {NO_FILTER: "/", SYNC: "/sync", ASYNC: "/async", MITMPROXY: "/"}
TENANT_HEADER = "x-tenant: bench"
# 200 req/s is about half of what mitmproxy serves at saturation on the 2-core machine the
# results come from; 1000 is a moderate rate for meshpy that mitmproxy cannot sustain there.
DEFAULT_RATES = (200.0, 1000.0)

# meshpy imports this from the config's directory.
FILTER_MODULE = """\
import meshpy


class HeaderCheck(meshpy.Filter):
    def on_request(self, req):
        if "x-tenant" not in req.headers:
            return meshpy.Response(403, b"missing tenant\\n")


class AsyncHeaderCheck(meshpy.Filter):
    async def on_request(self, req):
        if "x-tenant" not in req.headers:
            return meshpy.Response(403, b"missing tenant\\n")
"""

# The same check as a mitmproxy addon.
MITMPROXY_ADDON = """\
from mitmproxy import http


class HeaderCheck:
    def request(self, flow: http.HTTPFlow) -> None:
        if "x-tenant" not in flow.request.headers:
            flow.response = http.Response.make(403, b"missing tenant\\n")


addons = [HeaderCheck()]
"""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meshpy-bench"


MITMPROXY_VENV = cache_dir() / "mitmproxy-venv"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench filters",
        description="Throughput (wrk, saturation) and latency at a fixed rate (h2load) of a "
        "meshpy route without filters, with a plain on_request header check, with the same "
        "check as `async def`, and of mitmproxy in reverse-proxy mode running the same check "
        "as an addon, all forwarding to one nginx upstream.",
    )
    parser.add_argument(
        "--systems",
        help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="meshpy worker threads (default 1; see README)"
    )
    harness.add_load_arguments(parser, duration=10.0)
    parser.add_argument(
        "--rate",
        default=",".join(f"{r:g}" for r in DEFAULT_RATES),
        help="comma-separated fixed total req/s for the latency runs with h2load, one run per "
        f"rate (default {','.join(f'{r:g}' for r in DEFAULT_RATES)}; 0 skips them)",
    )
    harness.add_rate_connections_argument(parser)
    harness.add_latency_steal_limit_argument(parser)
    harness.add_latency_load_argument(parser)
    harness.add_pin_arguments(parser, "meshpy and mitmproxy")
    parser.add_argument(
        "--mitmproxy-python",
        default=sys.executable,
        metavar="PYTHON",
        help="interpreter for mitmproxy's virtualenv (default: this one). pip installs the "
        "newest mitmproxy that supports it: mitmproxy 12 needs Python 3.12 or later, so with "
        "3.11 it is 11.0",
    )
    parser.add_argument(
        "--mitmproxy-spec",
        default="mitmproxy",
        metavar="REQUIREMENT",
        help="what pip installs into that virtualenv (default: mitmproxy, the newest)",
    )
    harness.add_output_arguments(
        parser,
        "filters-<timestamp>.json",
        "only say what to install if a tool or mitmproxy is missing",
    )
    args = parser.parse_args(argv)
    harness.require_positive_counts(
        parser, args, ("threads", "rounds", "connections", "load_threads", "rate_connections")
    )
    try:
        args.rates = [float(r) for r in args.rate.split(",") if r.strip() and float(r) != 0]
    except ValueError:
        parser.error(f"--rate: expected comma-separated numbers, got {args.rate!r}")
    if args.duration <= 0 or args.warmup < 0 or any(r < 0 for r in args.rates):
        parser.error("--duration must be positive; --warmup and --rate not negative")
    args.names = harness.select_systems(parser, args.systems, SYSTEMS)
    return args


# --------------------------------------------------------------------------- mitmproxy


def ensure_mitmproxy(python: str, spec: str, install: bool) -> Path:
    """``mitmdump`` from its own virtualenv, creating it and installing ``spec`` if needed.

    mitmproxy pins its dependencies, so it never goes into the environment meshpy runs in.
    The virtualenv is rebuilt when the interpreter or the requirement changes.
    """
    venv = MITMPROXY_VENV
    mitmdump = venv / "bin" / "mitmdump"
    stamp = venv / "meshpy-bench.json"
    wanted = {"python": os.path.realpath(shutil.which(python) or python), "spec": spec}
    with contextlib.suppress(OSError, ValueError):
        if mitmdump.is_file() and json.loads(stamp.read_text()) == wanted:
            return mitmdump
    commands = [
        [python, "-m", "venv", "--clear", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", spec],
    ]
    if not install:
        shown = "\n".join(f"  {shlex.join(c)}" for c in commands)
        raise peers.PeerError(f"mitmproxy is not installed; install it with:\n{shown}")
    print(f"installing {spec} into {venv} ...", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    for command in commands:
        subprocess.run(command, check=True)
    if not mitmdump.is_file():
        raise peers.PeerError(f"{mitmdump} missing after installing {spec}")
    stamp.write_text(json.dumps(wanted) + "\n")
    return mitmdump


def mitmproxy_version(mitmdump: Path) -> dict[str, str]:
    """``mitmdump --version``'s lines as a dict (Mitmproxy, Python, OpenSSL, Platform)."""
    done = subprocess.run([str(mitmdump), "--version"], capture_output=True, text=True)
    info = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(":")
        if value:
            info[key.strip().lower()] = value.strip()
    return info


def mitmproxy_proxy(
    workdir: Path, upstream_port: int, mitmdump: Path, cpus: str | None
) -> peers.Service:
    """mitmdump as a plain-HTTP reverse proxy with the header-check addon, printing nothing
    per flow (``flow_detail=0``, ``-q``); its CA and config live in ``workdir``."""
    workdir.mkdir(parents=True)
    port = peers.free_port()
    addon = workdir / "addon.py"
    addon.write_text(MITMPROXY_ADDON)
    argv = [
        *peers.pin_prefix(cpus),
        str(mitmdump),
        "--mode",
        f"reverse:http://{peers.HOST}:{upstream_port}",
        "--listen-host",
        peers.HOST,
        "--listen-port",
        str(port),
        "-s",
        str(addon),
        "-q",
        "--set",
        "flow_detail=0",
        "--set",
        f"confdir={workdir / 'confdir'}",
    ]
    return peers.Service(MITMPROXY, port, argv, workdir)


# --------------------------------------------------------------------------- meshpy


def meshpy_filters_proxy(
    workdir: Path, upstream_port: int, threads: int, cpus: str | None
) -> tuple[peers.Service, int]:
    """One meshpy process with the three routes; returns it and its admin port."""
    workdir.mkdir(parents=True)
    port, admin = peers.free_port(), peers.free_port()
    (workdir / "benchfilters.py").write_text(FILTER_MODULE)
    conf = (
        f"admin: {{listen: {peers.HOST}:{admin}}}\n"
        "listeners:\n"
        "  - name: bench\n"
        f"    listen: {peers.HOST}:{port}\n"
        "    protocol: http\n"
        "    routes:\n"
        "      - name: sync\n"
        f"        match: {{path_prefix: {PATHS[SYNC]}}}\n"
        "        cluster: upstream\n"
        "        filters:\n"
        "          - benchfilters:HeaderCheck: {}\n"
        "      - name: async\n"
        f"        match: {{path_prefix: {PATHS[ASYNC]}}}\n"
        "        cluster: upstream\n"
        "        filters:\n"
        "          - benchfilters:AsyncHeaderCheck: {}\n"
        "      - name: none\n"
        "        cluster: upstream\n"
        "clusters:\n"
        "  - name: upstream\n"
        f"    endpoints: [{peers.HOST}:{upstream_port}]\n"
        "    lb: round_robin\n"
    )
    config = workdir / "sidecar.yaml"
    config.write_text(conf)
    argv = [
        *peers.pin_prefix(cpus),
        *peers.meshpy_command(),
        "proxy",
        "-c",
        str(config),
        "--workers",
        str(threads),
    ]
    return peers.Service("meshpy", port, argv, workdir, ready_text="meshpy proxy ready:"), admin


def filter_metrics(admin_port: int) -> list[str]:
    """meshpy's ``filter_calls_total`` and ``filter_errors_total`` lines from /metrics."""
    conn = http.client.HTTPConnection(peers.HOST, admin_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode(errors="replace")
    except OSError as exc:
        return [f"metrics unavailable: {exc}"]
    finally:
        conn.close()
    wanted = ("filter_calls_total{", "filter_errors_total{")
    return [line for line in text.splitlines() if line.startswith(wanted)]


# --------------------------------------------------------------------------- checks


def get(port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(peers.HOST, port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    except OSError as exc:
        raise peers.PeerError(f"GET {path} on port {port} failed: {exc}") from exc
    finally:
        conn.close()


def check_system(name: str, port: int) -> None:
    """With the header a request passes (200, the upstream's 100 bytes); without it a
    filtered system answers 403 itself, which shows its filter really runs."""
    name_, _, value = TENANT_HEADER.partition(":")
    status, body = get(port, PATHS[name], {name_: value.strip()})
    if status != 200 or body != peers.SMALL_BODY:
        raise peers.PeerError(f"{name}: GET {PATHS[name]} with the header: {status}, {body[:60]!r}")
    status, body = get(port, PATHS[name], {})
    expected = 200 if name == NO_FILTER else 403
    if status != expected:
        raise peers.PeerError(
            f"{name}: GET {PATHS[name]} without the header: {status} (expected {expected}), "
            f"{body[:60]!r}"
        )


# --------------------------------------------------------------------------- the run


def run_benchmark(args: argparse.Namespace, mitmdump: Path | None, root: Path) -> dict[str, Any]:
    load_pin = peers.pin_prefix(args.pin_load)
    script = load.write_wrk_script(root)
    saturation = {name: SystemRuns(name) for name in args.names}
    fixed_rate = {rate: {name: SystemRuns(name) for name in args.names} for rate in args.rates}
    logs: dict[str, str] = {}
    metrics: list[str] = []
    services: list[peers.Service] = []

    def failed(names: list[str], service: peers.Service, exc: peers.PeerError) -> None:
        print(f"{service.name}: did not start: {exc}", file=sys.stderr)
        for name in names:
            for runs in [saturation, *fixed_rate.values()]:
                runs[name].failures.append(str(exc).splitlines()[0])
        logs[service.name] = service.log_tail()

    with contextlib.ExitStack() as stack:
        upstream = peers.upstream_nginx(root / "upstream", args.pin_upstream)
        start_service(stack, upstream, "/", len(peers.SMALL_BODY))
        print(f"upstream nginx on port {upstream.port}", flush=True)

        systems: list[peers.System] = []
        meshpy_names = [name for name in args.names if name != MITMPROXY]
        admin = None
        if meshpy_names:
            meshpy, admin = meshpy_filters_proxy(
                root / "meshpy", upstream.port, args.threads, args.pin_proxy
            )
            try:
                stack.callback(meshpy.stop)
                meshpy.start()
                for name in meshpy_names:
                    check_system(name, meshpy.port)
            except peers.PeerError as exc:
                failed(meshpy_names, meshpy, exc)
            else:
                print(f"meshpy on port {meshpy.port} (admin {admin})", flush=True)
                services.append(meshpy)
                systems += [
                    peers.System(name, meshpy.port, meshpy, meshpy) for name in meshpy_names
                ]
        if MITMPROXY in args.names and mitmdump is not None:
            mitm = mitmproxy_proxy(root / "mitmproxy", upstream.port, mitmdump, args.pin_proxy)
            try:
                stack.callback(mitm.stop)
                mitm.start()
                check_system(MITMPROXY, mitm.port)
            except peers.PeerError as exc:
                failed([MITMPROXY], mitm, exc)
            else:
                print(f"mitmproxy on port {mitm.port}", flush=True)
                services.append(mitm)
                systems.append(peers.System(MITMPROXY, mitm.port, mitm, mitm))

        width = max(len(name) for name in SYSTEMS)
        headers = [TENANT_HEADER]
        for round_index in range(args.rounds):
            for system in harness.rotated(systems, round_index):
                label = f"round {round_index + 1}/{args.rounds} {system.name:<{width}}"
                phases = [saturation[system.name], *(f[system.name] for f in fixed_rate.values())]
                if not still_running(system, round_index, label, phases):
                    continue
                url = system.url(PATHS[system.name])
                measure_saturation(
                    args,
                    system,
                    url,
                    round_index,
                    script,
                    load_pin,
                    saturation[system.name],
                    headers,
                    label,
                )
                for rate, runs in fixed_rate.items():
                    measure_fixed_rate(
                        args,
                        system,
                        url,
                        round_index,
                        rate,
                        load_pin,
                        root,
                        runs[system.name],
                        headers,
                        label,
                    )
        if admin is not None and any(s.name != MITMPROXY for s in systems):
            metrics = filter_metrics(admin)
        for service in services:
            logs[service.name] = service.log_tail()

    return {
        "saturation": [saturation[name] for name in args.names],
        "fixed_rate": {
            rate: [runs[name] for name in args.names] for rate, runs in fixed_rate.items()
        },
        "metrics": metrics,
        "logs": logs,
    }


# --------------------------------------------------------------------------- summaries


def _median_rps(summaries: dict[str, dict[str, Any]], name: str) -> float | None:
    summary = summaries.get(name)
    return summary.get("rps_median") if summary else None


def summarize_saturation(runs: list[SystemRuns]) -> list[dict[str, Any]]:
    """Summaries with req/s relative to the no-filter route and to mitmproxy."""
    summaries = {r.name: r.summary(None, None) for r in runs}
    base, mitm = _median_rps(summaries, NO_FILTER), _median_rps(summaries, MITMPROXY)
    base_cpu = summaries.get(NO_FILTER, {}).get("cpu_us_per_req_median")
    for s in summaries.values():
        s.pop("ratio_to_direct", None)
        s.pop("cpu_vs_nginx", None)
        rps = s.get("rps_median")
        s["ratio_to_no_filter"] = round(rps / base, 3) if rps and base else None
        s["ratio_to_mitmproxy"] = round(rps / mitm, 2) if rps and mitm else None
        cpu = s.get("cpu_us_per_req_median")
        s["cpu_us_added"] = (
            round(cpu - base_cpu, 2) if cpu is not None and base_cpu is not None else None
        )
    return [summaries[r.name] for r in runs]


def summarize_fixed_rate(runs: list[SystemRuns]) -> list[dict[str, Any]]:
    """Summaries with each latency percentile's difference to the no-filter route."""
    return report.latency_over(runs, NO_FILTER, "latency_us_added")


def targets(saturation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The two throughput targets of the plain (sync) filter, met or not."""
    by_name = {s["system"]: s for s in saturation}
    sync = by_name.get(SYNC, {})
    checks = [
        ("sync filter keeps >= 0.5x the no-filter throughput", "ratio_to_no_filter", 0.5),
        ("sync filter serves >= 20x mitmproxy's req/s", "ratio_to_mitmproxy", 20.0),
    ]
    return [
        {
            "target": text,
            "value": sync.get(key),
            "threshold": threshold,
            "met": None if sync.get(key) is None else sync[key] >= threshold,
        }
        for text, key, threshold in checks
    ]


# --------------------------------------------------------------------------- tables


def saturation_table(summaries: list[dict[str, Any]]) -> str:
    header = (
        f"{'system':<12} {'req/s median':>12} {'spread (min-max)':>19} {'vs none':>7} "
        f"{'vs mitm':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'cpu µs/req':>10} "
        f"{'cpu +µs':>7}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        if not s["rounds_ok"]:
            lines.append(f"{s['system']:<12} failed: {'; '.join(s['failures'])[:80]}")
            continue
        spread = f"{_rate(s['rps_min'])}-{_rate(s['rps_max'])}"
        lat = s["latency_us_median"]
        lines.append(
            f"{s['system']:<12} {_rate(s['rps_median']):>12} {spread:>19} "
            f"{_ratio(s['ratio_to_no_filter']):>7} {_num(s['ratio_to_mitmproxy'], '.1f'):>7} "
            f"{_ms(lat['p50']):>8} {_ms(lat['p99']):>8} {s['errors']:>7} "
            f"{_num(s['cpu_us_per_req_median'], '.1f'):>10} {_num(s['cpu_us_added'], '+.1f'):>7}"
        )
    return "\n".join(lines + report.retaken_lines(summaries))


def fixed_rate_table(summaries: list[dict[str, Any]]) -> str:
    return report.latency_over_table(summaries, 12, "latency_us_added")


def unsustained(rate: float, summaries: list[dict[str, Any]]) -> list[str]:
    """A note for each system that completed less than 98% of the requested rate."""
    return [
        f"not sustained: {s['system']} completed {_rate(s['rps_median'])} of {rate:g} req/s; "
        "its latencies are at its own top pace, not at this rate"
        for s in summaries
        if s["rounds_ok"] and s["rps_median"] < 0.98 * rate
    ]


def ratio_lines(saturation: list[dict[str, Any]]) -> list[str]:
    """Median req/s of each filtered route over the no-filter route's and over mitmproxy's."""
    by_name = {s["system"]: s for s in saturation}
    lines = []
    for key, bottom in (("ratio_to_no_filter", NO_FILTER), ("ratio_to_mitmproxy", MITMPROXY)):
        for top in (SYNC, ASYNC):
            value = by_name.get(top, {}).get(key)
            if value is not None:
                lines.append(f"{top} / {bottom}: {value:g}x")
    return lines


def target_lines(checks: list[dict[str, Any]]) -> list[str]:
    lines = []
    for check in checks:
        if check["met"] is None:
            verdict = "not measured"
        else:
            verdict = f"{'met' if check['met'] else 'NOT met'} ({check['value']:g}x)"
        lines.append(f"target: {check['target']}: {verdict}")
    return lines


# --------------------------------------------------------------------------- main


def header(
    args: argparse.Namespace,
    command_line: str,
    machine: dict[str, Any],
    meshpy: dict[str, object] | None,
    mitmproxy: dict[str, str] | None,
    revision: str | None,
) -> list[str]:
    mitm = (
        f"{mitmproxy.get('mitmproxy', '?')} on Python {mitmproxy.get('python', '?')}"
        if mitmproxy
        else "not used"
    )
    lines = [
        *harness.header_start(command_line, machine),
        f"meshpy: {describe_meshpy(meshpy)}; checkout {revision or 'unknown'}; "
        f"Python {machine['python']}",
        f"meshpy extension: {meshpy['path'] if meshpy else '-'}",
        f"mitmproxy: {mitm}",
        f"load: wrk -t{args.load_threads} -c{args.connections} -d{args.duration:g}s "
        f"(+{args.warmup:g}s warm-up); h2load at "
        f"{', '.join(f'{r:g}' for r in args.rates) or 'no'} req/s over "
        f"{args.rate_connections} connections; header '{TENANT_HEADER}' on every request; "
        f"meshpy workers {args.threads}; rounds {args.rounds}; CPU pinning "
        f"upstream={args.pin_upstream or 'none'} proxy={args.pin_proxy or 'none'} "
        f"load={args.pin_load or 'none'}",
        harness.steal_line(args),
    ]
    return lines + harness.header_warnings(machine, meshpy)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command_line = shlex.join(["python", "-m", "bench", "filters", *argv])
    harness.handle_signals()

    try:
        peers.ensure_tools(install=not args.no_install)
        harness.build_latency_load(args)
        mitmdump = None
        if MITMPROXY in args.names:
            mitmdump = ensure_mitmproxy(
                args.mitmproxy_python, args.mitmproxy_spec, install=not args.no_install
            )
    except (peers.PeerError, subprocess.CalledProcessError, OSError) as exc:
        print(exc, file=sys.stderr)
        return 2
    meshpy = peers.meshpy_info()
    if meshpy is None and any(name != MITMPROXY for name in args.names):
        print(harness.MESHPY_MISSING, file=sys.stderr)
        return 2
    mitmproxy = mitmproxy_version(mitmdump) if mitmdump else None

    machine = report.machine_info()
    revision = report.git_revision(harness.REPO)
    started = time.strftime("%Y%m%d-%H%M%S")
    print("\n".join(header(args, command_line, machine, meshpy, mitmproxy, revision)))
    print(flush=True)

    results, code = harness.run_in_workspace(
        args.keep_tmp, lambda root: run_benchmark(args, mitmdump, root)
    )
    if code is not None:
        return code

    meshpy_changed = harness.meshpy_changed(meshpy)
    saturation = summarize_saturation(results["saturation"])
    fixed_rate = {rate: summarize_fixed_rate(runs) for rate, runs in results["fixed_rate"].items()}
    checks = targets(saturation)
    print()
    print(
        f"Throughput at saturation (medians over {args.rounds} round(s); vs none/vs mitm: "
        f"req/s over {NO_FILTER}'s / mitmproxy's; cpu +µs: over {NO_FILTER}'s):"
    )
    print(saturation_table(saturation))
    load_name, gap_note = harness.fixed_rate_load(args)
    for rate, summaries in fixed_rate.items():
        print()
        print(
            f"Latency at a fixed {rate:g} req/s ({load_name}, {args.rate_connections} "
            f"connections, medians over {args.rounds} round(s); +p50/+p99: over {NO_FILTER}'s; "
            f"{gap_note}):"
        )
        print(fixed_rate_table(summaries))
        for line in unsustained(rate, summaries):
            print(line)
    print()
    print("\n".join(ratio_lines(saturation) + target_lines(checks)))
    if results["metrics"]:
        print("meshpy filter counters at the end:")
        print("\n".join(f"  {line}" for line in results["metrics"]))

    document = {
        "scenario": "filters",
        "command": command_line,
        "started": started,
        "machine": machine,
        "tools": peers.tool_versions(),
        "meshpy": meshpy,
        "meshpy_changed_during_run": meshpy_changed,
        "mitmproxy": mitmproxy,
        "revision": revision,
        "settings": harness.settings_json(args),
        "paths": PATHS,
        "header": TENANT_HEADER,
        "filter_module": FILTER_MODULE,
        "mitmproxy_addon": MITMPROXY_ADDON,
        "saturation": {
            "summary": saturation,
            "runs": harness.runs_json(results["saturation"]),
        },
        "fixed_rate": [
            {
                "rate": rate,
                "summary": fixed_rate[rate],
                "runs": harness.runs_json(runs),
            }
            for rate, runs in results["fixed_rate"].items()
        ],
        "targets": checks,
        "meshpy_filter_metrics": results["metrics"],
        "proxy_logs": results["logs"],
    }
    harness.write_results(args.out_dir, "filters", started, document)
    every = saturation + [s for summaries in fixed_rate.values() for s in summaries]
    failed = any(s["failures"] or s.get("errors") for s in every)
    return 1 if failed else 0
