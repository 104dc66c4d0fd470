"""``python -m bench suite``: options, HTTP/2 set-up, aggregation, targets, charts, a tiny run.

Everything but the last test works on synthetic data; the last runs two systems for one
second each, so the whole file stays well under 20 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's bench/

from bench import chart, churn, harness, load, mesh, peers, report, suite
from bench.report import SystemRuns

TOOLS = ("nginx", "haproxy", "wrk", "h2load")


def wrk_result(rps: float, cpu: float, p99_us: float = 2000.0) -> load.LoadResult:
    latency = {"mean": 1.0, "stdev": 1.0, "p50": 1000.0, "p90": 1500.0, "p99": p99_us}
    latency |= {"p99.9": p99_us * 2, "max": p99_us * 3}
    return load.LoadResult("wrk", [], int(rps), 1.0, rps, 0, latency, {}, cpu)


def rate_result(rps: float, p99_us: float) -> load.LoadResult:
    latency = {"mean": 1.0, "p50": 200.0, "p90": 300.0, "p99": p99_us, "p99.9": p99_us, "max": 1e4}
    extra = {"slower_than_gap": 0}
    return load.LoadResult("h2load", [], int(rps), 1.0, rps, 0, latency, {}, None, extra)


def runs_of(name: str, results: list[load.LoadResult]) -> SystemRuns:
    return SystemRuns(name, list(results))


# --------------------------------------------------------------------------- options


def test_quick_sets_short_defaults_that_explicit_options_override() -> None:
    quick = suite.parse_args(["--quick"])
    assert (quick.rounds, quick.duration, quick.warmup) == (1, 2.0, 0.0)
    assert quick.parts == list(suite.PARTS) and quick.mode_names == ["shared", "isolated"]
    explicit = suite.parse_args(["--quick", "--rounds", "2", "--only", "latency,throughput"])
    assert explicit.rounds == 2
    assert explicit.parts == ["throughput", "latency"]  # in the suite's order
    full = suite.parse_args([])
    assert (full.rounds, full.duration, full.rate_connections) == (3, 10.0, 50)


@pytest.mark.parametrize(
    "argv",
    [["--only", "throughput,nonsense"], ["--modes", "pinned"], ["--duration", "1.5"]],
)
def test_bad_options_are_rejected(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        suite.parse_args(argv)


def test_isolated_mode_pins_proxy_to_core_1_and_the_rest_to_core_0() -> None:
    assert suite.pin_argv("shared") == []
    assert suite.pin_argv("isolated") == [
        "--pin-upstream",
        "0",
        "--pin-proxy",
        "1",
        "--pin-load",
        "0",
    ]


# --------------------------------------------------------------------------- HTTP/2 set-up


def test_h2_saturation_counts_2xx_over_h2loads_run_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "h2.log"
    log.write_text("".join(f"1\t200\t{100 * (i + 1)}\n" for i in range(100)) + "1\t503\t5\n")
    stdout = (
        "finished in 2.00s, 50.50 req/s, 10KB/s\n"
        "requests: 101 total, 101 started, 101 done, 100 succeeded, 1 failed, 0 errored, "
        "0 timeout\n"
    )
    done = subprocess.CompletedProcess([], 0, stdout, "")
    monkeypatch.setattr(load, "_run", lambda argv, timeout: done)
    cpu = iter([1.0, 1.001])
    result = suite.run_h2_saturation(["h2load"], 2.0, log, lambda: next(cpu))
    assert result.rps == 50.0  # 100 2xx in 2 s
    assert result.errors == 2  # one failed, one non-2xx in the log
    assert result.latency_us["p50"] == 5000.0 and result.latency_us["p99.9"] == 10000.0
    assert result.cpu_us_per_req == 10.0
    assert not log.exists()


def test_the_suite_hands_its_steal_policy_to_the_mesh_and_filter_parts() -> None:
    argv = ["--steal-limit", "5", "--latency-steal-limit", "0.5", "--retakes", "1"]
    args = suite.parse_args(argv)
    part = mesh.parse_args(suite.scenario_argv(args, "isolated"))
    assert (part.steal_limit, part.latency_steal_limit, part.retakes) == (5.0, 0.5, 1)
    header = "\n".join(
        suite.header(args, "python -m bench suite", report.machine_info(), None, None, {})
    )
    assert "more than 5% of the machine's CPU time was stolen (0.5% for a fixed-rate run)" in header


def test_the_suite_hands_its_steal_policy_to_the_churn_part(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handed: list[Any] = []
    monkeypatch.setattr(churn, "measure", lambda args, command: handed.append(args) or {})
    suite.run_optional(suite.parse_args(["--steal-limit", "5", "--retakes", "1"]), "churn")
    assert (handed[0].steal_limit, handed[0].retakes) == (5.0, 1)


# --------------------------------------------------------------------------- steal


def stolen(run: load.LoadResult, steal_pct: float) -> load.LoadResult:
    run.cpu = {"busy_pct": 90.0, "steal_pct": steal_pct}
    return run


def stolen_run(steal_pct: float, rps: float) -> load.LoadResult:
    return stolen(wrk_result(rps, 10.0), steal_pct)


@pytest.mark.parametrize(
    ("retakes", "steals", "kept", "retaken"),
    [
        (2, [31.0, 12.0, 4.0], 2, [31.0, 12.0]),  # the first run under the limit is kept
        (1, [31.0, 14.0, 4.0], 1, [31.0]),  # retakes spent: the least stolen is kept
        (2, [14.0, 31.0, 25.0], 0, [31.0, 25.0]),
        (0, [31.0], 0, []),  # --retakes 0 keeps every run
        (2, [9.9], 0, []),
    ],
)
def test_a_run_that_lost_cpu_time_to_steal_is_measured_again(
    retakes: int, steals: list[float], kept: int, retaken: list[float]
) -> None:
    made = [stolen_run(steal, 1000.0 + i) for i, steal in enumerate(steals)]
    measured: list[load.LoadResult] = []

    def measure_once() -> load.LoadResult:
        measured.append(made[len(measured)])
        return measured[-1]

    args = suite.parse_args(["--retakes", str(retakes)])
    runs = SystemRuns("meshpy")
    result = harness.retaken_for_steal(args, measure_once, runs, 1, "label", args.steal_limit)
    assert result is made[kept]
    assert [r["steal_pct"] for r in runs.retaken] == retaken
    assert all(r["p99_us"] == 2000.0 for r in runs.retaken)  # what was set aside, on record
    assert len(measured) == len(retaken) + 1  # each run measured is kept or listed
    assert all(r["round"] == 2 for r in runs.retaken)


def test_fixed_rate_runs_are_held_to_the_lower_steal_limit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """1.5% stolen: under --steal-limit, so a saturation run stands, but over
    --latency-steal-limit, so a fixed-rate run is measured again."""
    steals = iter([1.5, 0.4])
    monkeypatch.setattr(load, "run_h2load", lambda *_: stolen(rate_result(1e3, 2e3), next(steals)))
    monkeypatch.setattr(load, "run_wrk", lambda *_: stolen_run(1.5, 50000.0))
    args = suite.parse_args(["--retakes", "2"])
    upstream = peers.Service("upstream", 1, [], tmp_path)
    system = peers.System("meshpy", 1, upstream)
    fixed_rate, saturation = SystemRuns("meshpy"), SystemRuns("meshpy")
    harness.measure_fixed_rate(
        args, system, "http://x/", 0, 1000.0, [], tmp_path, fixed_rate, (), "label"
    )
    assert [run.steal_pct() for run in fixed_rate.runs] == [0.4]
    assert fixed_rate.retaken == [{"round": 1, "steal_pct": 1.5, "rps": 1000.0, "p99_us": 2000.0}]
    harness.measure_saturation(
        args, system, "http://x/", 0, tmp_path / "report.lua", [], saturation, (), "label"
    )
    assert [run.steal_pct() for run in saturation.runs] == [1.5] and saturation.retaken == []


def test_http2_saturation_runs_are_measured_again_for_steal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    steals = iter([12.0, 3.0])
    monkeypatch.setattr(suite, "run_h2_saturation", lambda *_: stolen_run(next(steals), 4e4))
    args = suite.parse_args(["--warmup", "0"])
    system = peers.System("meshpy", 1, peers.Service("upstream", 1, [], tmp_path))
    runs = SystemRuns("meshpy")
    suite.measure_h2_saturation(args, system, "http://x/", 1, [], tmp_path, runs, "label")
    assert [run.steal_pct() for run in runs.runs] == [3.0]
    assert [r["steal_pct"] for r in runs.retaken] == [12.0]


def test_handshake_counts_are_measured_again_for_steal(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = iter([(25.0, 1900.0), (2.0, 3100.0)])

    def count(*_: Any) -> dict[str, Any]:
        steal_pct, rate = next(counts)
        return {"cpu": {"steal_pct": steal_pct}, "handshakes_per_s": rate}

    monkeypatch.setattr(mesh, "count_handshakes", count)
    kept = mesh.measure_handshakes(mesh.parse_args([]), None, [], "label", 0)
    assert kept is not None and kept["handshakes_per_s"] == 3100.0
    assert kept["retaken"] == [{"round": 1, "steal_pct": 25.0, "handshakes_per_s": 1900.0}]


def test_tables_name_the_runs_that_were_measured_again() -> None:
    runs = SystemRuns("meshpy", [wrk_result(50000.0, 15.0)])
    runs.retaken.append({"round": 1, "steal_pct": 31.5, "rps": 20000.0})
    runs.retaken.append({"round": 1, "steal_pct": 12.0, "rps": 30000.0})
    runs.retaken.append({"round": 3, "steal_pct": 22.0, "rps": 25000.0})
    nginx = runs_of("nginx", [wrk_result(40000.0, 19.0)])
    summaries = suite.summarize_throughput([runs, nginx], {})
    assert summaries[0]["retaken"] == runs.retaken and summaries[1]["retaken"] == []
    footnote = "measured again for steal: meshpy round 1 (31.5%, 12% stolen), round 3 (22% stolen)"
    table = suite.throughput_table([{"label": "HTTP/1.1 100 B", "systems": summaries}])
    assert table.splitlines()[-1] == f"HTTP/1.1 100 B: {footnote}"
    assert report.saturation_table([runs.summary(None, None)]).splitlines()[-1] == footnote
    assert "measured again" not in report.saturation_table([nginx.summary(None, None)])


def test_handshake_counts_measured_again_are_summed_up_and_named() -> None:
    counts = [
        {"handshakes_per_s": 3000.0, "b_cpu_us_per_handshake": 160.0, "retaken": []},
        {
            "handshakes_per_s": 3100.0,
            "b_cpu_us_per_handshake": 150.0,
            "retaken": [{"round": 2, "steal_pct": 24.5, "handshakes_per_s": 1900.0}],
        },
    ]
    summary = mesh.summarize_handshakes(counts, [])
    assert summary["retaken"] == [{"round": 2, "steal_pct": 24.5, "handshakes_per_s": 1900.0}]
    args = mesh.parse_args([])
    lines = mesh.handshake_lines(summary, args)
    assert lines[-1] == "  measured again for steal: round 2 (24.5% stolen)"
    summary["retaken"] = []
    assert "measured again" not in "\n".join(mesh.handshake_lines(summary, args))


# --------------------------------------------------------------------------- aggregation


def test_throughput_summary_has_median_spread_ratio_cpu_and_na() -> None:
    runs = [
        runs_of("direct", [wrk_result(r, 5.0) for r in (100, 120, 110)]),
        runs_of("meshpy", [wrk_result(r, c) for r, c in ((60, 20), (50, 30), (55, 25))]),
        SystemRuns("nginx"),
    ]
    summaries = suite.summarize_throughput(runs, {"nginx": "no HTTP/2: why"})
    direct, meshpy, nginx = summaries
    assert (direct["rps_median"], direct["cpu_of"]) == (110, "upstream")
    assert (meshpy["rps_median"], meshpy["rps_min"], meshpy["rps_max"]) == (55, 50, 60)
    assert meshpy["ratio_to_direct"] == 0.5 and meshpy["cpu_us_per_req_median"] == 25
    # The share of a core each round kept busy (req/s x µs/req), median over rounds: the
    # rounds' 0.9, 0.8 and 0.95, not the product of the medians (50,000 x 16 µs: 0.8).
    busy = [wrk_result(r, c) for r, c in ((60000, 15), (50000, 16), (40000, 23.75))]
    (summary,) = suite.summarize_throughput([runs_of("meshpy", busy)], {})
    assert summary["cores_busy_median"] == 0.9
    assert nginx["n/a"] == "no HTTP/2: why"
    table = suite.throughput_table([{"label": "HTTP/2 100 B", "systems": summaries}])
    assert "n/a: no HTTP/2: why" in table and "50-60" in table


def test_isolated_throughput_check_says_how_busy_each_proxy_core_was() -> None:
    systems = [
        {"system": name, "rounds_ok": 1, "rps_median": rps, "cores_busy_median": busy}
        for name, rps, busy in (("meshpy", 54000.0, 0.81), ("nginx", 50000.0, 0.99))
    ]
    systems.append({"system": "haproxy", "rounds_ok": 1, "rps_median": 45000.0})
    summary = {"throughput": [{"config": suite.BASE_CONFIG.key, "systems": systems}]}
    assert suite.throughput_checks("isolated", summary)[0]["note"] == ""  # haproxy unknown
    systems[2]["cores_busy_median"] = 0.99
    check = suite.throughput_checks("isolated", summary)[0]
    assert check["note"] == "proxy core busy: meshpy 0.81, nginx 0.99, haproxy 0.99"
    for system, load_busy in zip(systems, (1.0, 0.97, 0.8), strict=True):
        system["load_cores_busy_median"] = load_busy
    check = suite.throughput_checks("isolated", summary)[0]
    assert check["note"].endswith("; load core busy: meshpy 1.00, nginx 0.97, haproxy 0.80")
    assert suite.throughput_checks("shared", summary)[0]["note"] == ""


def with_cpus(result: load.LoadResult, **busy_pct: float) -> load.LoadResult:
    by_cpu = {cpu.removeprefix("cpu"): pct for cpu, pct in busy_pct.items()}
    result.cpu = {"busy_pct_by_cpu": by_cpu}
    return result


def test_the_load_cores_busy_share_is_the_median_over_rounds_of_their_mean() -> None:
    rounds = [
        with_cpus(wrk_result(50000, 10), cpu0=99.0, cpu1=60.0, cpu2=97.0),
        with_cpus(wrk_result(50000, 10), cpu0=90.0, cpu1=70.0, cpu2=80.0),
        with_cpus(wrk_result(50000, 10), cpu0=100.0, cpu1=50.0, cpu2=100.0),
    ]
    (pinned,) = suite.summarize_throughput([runs_of("meshpy", rounds)], {}, ["0", "2"])
    assert pinned["load_cores_busy_median"] == 0.98  # rounds 0.98, 0.85, 1.00
    idle = [with_cpus(wrk_result(50000, 10), cpu0=0.0, cpu1=0.0) for _ in range(3)]
    (idle_load,) = suite.summarize_throughput([runs_of("meshpy", idle)], {}, ["0"])
    assert idle_load["load_cores_busy_median"] == 0.0  # an idle core is a share, not "unknown"
    (unpinned,) = suite.summarize_throughput([runs_of("meshpy", rounds)], {})
    assert unpinned["load_cores_busy_median"] is None
    table = suite.throughput_table([{"label": "HTTP/1.1 100 B", "systems": [pinned]}])
    assert table.splitlines()[2].split()[-2:] == ["0.50", "0.98"]  # cores, load
    assert suite.cpu_list("0-2,5") == ["0", "1", "2", "5"] and suite.cpu_list(None) == []


def test_each_cpus_busy_share_is_read_from_proc_stat() -> None:
    """A process spinning on CPU 0 for half a second shows as CPU 0 nearly all busy."""
    start = load.CpuSample.now()
    spin = "import time\nend = time.monotonic() + 0.5\nwhile time.monotonic() < end: pass"
    subprocess.run(["taskset", "-c", "0", sys.executable, "-c", spin], check=True)
    usage = load.CpuSample.now().usage_since(start)
    assert set(usage["busy_pct_by_cpu"]) == {str(n) for n in range(os.cpu_count() or 1)}
    assert usage["busy_pct_by_cpu"]["0"] >= 80


def test_latency_rates_come_from_the_slowest_peer() -> None:
    summaries = [
        {"system": "direct", "rounds_ok": 1, "rps_median": 90000.0},
        {"system": "meshpy", "rounds_ok": 1, "rps_median": 10000.0},
        {"system": "nginx", "rounds_ok": 1, "rps_median": 40000.0},
        {"system": "haproxy", "rounds_ok": 1, "rps_median": 48000.0},
    ]
    specs = suite.parse_args([]).rate_specs
    rates = suite.latency_rates(summaries, specs)
    assert [r["rate"] for r in rates] == [1000.0, 10000.0, 20000.0, 30000.0]
    assert rates[2]["share"] == 0.5 and rates[2]["of"] == "nginx"
    assert rates[2]["label"] == "50% of nginx (20,000 req/s)"
    assert suite.latency_rates(summaries[:1], specs) == rates[:1]  # no proxy: only 1,000 req/s


def test_latency_rates_can_be_chosen(capsys: pytest.CaptureFixture[str]) -> None:
    summaries = [
        {"system": "nginx", "rounds_ok": 1, "rps_median": 40000.0},
        {"system": "haproxy", "rounds_ok": 1, "rps_median": 48000.0},
    ]
    args = suite.parse_args(["--latency-rates", "12.5%, 2500"])
    rates = suite.latency_rates(summaries, args.rate_specs)
    assert [(r["rate"], r["share"]) for r in rates] == [(5000.0, 0.125), (2500.0, None)]
    assert [suite.rate_key(r) for r in rates] == ["12.5% of slowest peer", "2,500 req/s"]
    header = "\n".join(suite.header(args, "suite", report.machine_info(), None, None, {}))
    assert "fixed rates 12.5%, 2500 over 50 connections" in header
    only_half = suite.parse_args(["--latency-rates", "50%"]).rate_specs
    assert [r["rate"] for r in suite.latency_rates(summaries, only_half)] == [20000.0]
    for bad in ("0%", "101%", "fast", "2000000", "50%,50%", ""):
        with pytest.raises(SystemExit) as exit_info:
            suite.parse_args(["--latency-rates", bad])
        assert exit_info.value.code == 2
        assert "--latency-rates: expected distinct req/s" in capsys.readouterr().err


def test_latency_is_added_over_direct_at_every_percentile() -> None:
    runs = [
        runs_of("direct", [rate_result(1000, 1000.0)]),
        runs_of("meshpy", [rate_result(1000, 1500.0)]),
    ]
    meshpy = suite.summarize_latency(runs)[1]
    assert meshpy["latency_us_added"] == {"p50": 0.0, "p90": 0.0, "p99": 500.0, "p99.9": 500.0}
    assert "+0.500" in suite.latency_table(suite.summarize_latency(runs))


# --------------------------------------------------------------------------- targets


def mode_result(meshpy_rps: float, meshpy_p99_added: float) -> dict[str, Any]:
    def block(name: str, rps: float, cpu: float) -> dict[str, Any]:
        """Only what the checks read."""
        return {"system": name, "rounds_ok": 1, "rps_median": rps, "cpu_us_per_req_median": cpu}

    throughput = [
        block("meshpy", meshpy_rps, 12.0),
        block("nginx", 40000.0, 10.0),
        block("haproxy", 45000.0, 11.0),
    ]
    added = {"meshpy": meshpy_p99_added, "nginx": 600.0, "haproxy": 700.0, "direct": 0.0}
    latency = [
        {"system": n, "rounds_ok": 1, "latency_us_added": {"p99": v}} for n, v in added.items()
    ]
    return {
        "summary": {
            "throughput": [{"config": suite.BASE_CONFIG.key, "systems": throughput}],
            "latency": [{"share": 0.5, "label": "50%", "systems": latency}],
        },
        "mesh": {"ratios": [{"value": 0.9, "target": 0.8, "met": True}]},
        "filters": {"error": "a process did not start (see above)"},
    }


def test_checklist_passes_fails_and_says_not_measured() -> None:
    memory = {
        "targets": [
            {"target": "idle RSS <= 40 MB", "value": "30.0 MB", "met": True},
            {"target": "<= 50 KB per connection", "value": "60.0 KB", "met": False},
            {"target": "flat over the soak", "value": None, "met": None},
        ]
    }
    churn = {"skipped": "skipped: module not available (bench.churn: no module)"}
    checks = suite.checklist({"shared": mode_result(50000.0, 500.0)}, memory, churn)
    by_target = {c["target"]: c for c in checks}
    throughput = next(c for c in checks if "keep-alive req/s" in c["target"])
    assert throughput["value"] == "1.11x" and throughput["met"] is True
    p99 = next(c for c in checks if "added p99" in c["target"])
    assert p99["met"] is True  # 0.5 ms <= nginx's 0.6 and haproxy's 0.7
    assert next(c for c in checks if "mTLS" in c["target"])["met"] is True
    assert all(c["met"] is None for c in checks if "Python filter" in c["target"])
    assert next(c for c in checks if "CPU per plaintext" in c["target"])["met"] is True
    assert by_target["<= 50 KB per connection"]["met"] is False
    handshakes = next(c for c in checks if "handshakes" in c["target"])
    assert handshakes["met"] is None and "module not available" in handshakes["note"]
    lines = "\n".join(suite.checklist_lines(checks))
    assert "[PASS]" in lines and "[FAIL]" in lines and "not measured" in lines

    slower = suite.checklist({"shared": mode_result(30000.0, 800.0)}, memory, churn)
    assert next(c for c in slower if "keep-alive req/s" in c["target"])["met"] is False
    assert next(c for c in slower if "added p99" in c["target"])["met"] is False


def test_the_latency_check_counts_the_rounds_meshpy_was_at_or_below_each_peer() -> None:
    def latency_entry(runs: list[SystemRuns]) -> dict[str, Any]:
        systems = suite.summarize_latency(runs)
        return {"summary": {"latency": [{"share": 0.5, "systems": systems}]}}

    p99s = {"direct": [900, 900, 900], "meshpy": [1500, 2100, 1600]}
    p99s |= {"nginx": [1700, 1800, 1600], "haproxy": [1400, 2000, 1900]}
    runs = [runs_of(n, [rate_result(20000, v) for v in values]) for n, values in p99s.items()]
    check = suite.latency_check("isolated", latency_entry(runs)["summary"])
    assert check["met"] is True  # medians: meshpy +0.7 ms, nginx +0.8, haproxy +1.0
    assert check["value"].endswith(
        "(meshpy's p99 at or below nginx's in 2/3, haproxy's in 1/3 rounds)"
    )
    runs[1].failures.append("round 3: process had exited with code 1")
    runs[1].runs.pop()  # rounds no longer line up: no count rather than a wrong one
    check = suite.latency_check("isolated", latency_entry(runs)["summary"])
    assert check["value"].endswith("haproxy +1.000 ms")


def test_churn_handshake_target_becomes_a_check() -> None:
    target = {"target": ">= 3,000/s", "measured_per_s": 3500.0, "met_measured": True}
    (check,) = suite.module_checks("churn", {"handshake_target": target}, ("unused",))
    assert check["value"] == "3,500/s" and check["met"] is True
    target |= {"measured_per_s": 600.0, "met_measured": False, "capacity_per_s": 1800}
    (check,) = suite.module_checks("churn", {"handshake_target": target}, ("unused",))
    assert check["value"].startswith("600/s (one-core capacity") and check["met"] is False
    target |= {"mtls_capacity_per_s": 1200}  # mutual TLS: shown beside it, not judged
    (check,) = suite.module_checks("churn", {"handshake_target": target}, ("unused",))
    assert check["value"].endswith("one-core capacity 1,200/s") and check["met"] is False


def test_a_missing_module_is_skipped_with_a_note() -> None:
    module, note = suite.optional_module("no_such_part")
    assert module is None and "module not available" in note


# --------------------------------------------------------------------------- charts


def chart_modes() -> dict[str, dict[str, Any]]:
    def throughput(name: str, rps: float) -> dict[str, Any]:
        return {"system": name, "rounds_ok": 3, "rps_median": rps}

    blocks = [
        {
            "label": label,
            "systems": [
                {**throughput("direct", 90000.0), "rps_min": 88000.0, "rps_max": 91000.0},
                {**throughput("meshpy", 50000.0), "rps_min": 45000.0, "rps_max": 52000.0},
                {"system": "nginx", "rounds_ok": 0, "n/a": "no HTTP/2"},
            ],
        }
        for label in ("HTTP/1.1 100 B", "HTTP/2 100 B")
    ]
    added = {"p50": 100.0, "p90": 200.0, "p99": 300.0, "p99.9": -50.0}
    latency = [
        {
            "label": label,
            "systems": [
                {"system": "direct", "rounds_ok": 1, "latency_us_added": dict.fromkeys(added, 0)},
                {"system": "meshpy", "rounds_ok": 1, "latency_us_added": added},
            ],
        }
        for label in ("1,000 req/s", "50% of nginx")
    ]
    summary = {"throughput": blocks, "latency": latency}
    return {"shared": {"summary": summary}, "isolated": {"summary": summary}}


def test_chart_rows_leave_out_na_and_direct_latency() -> None:
    modes = chart_modes()
    rows = suite.throughput_rows(modes)
    assert len(rows) == 2 * 2 * 2  # modes x configs x (direct, meshpy); nginx is n/a
    latency = suite.latency_rows(modes)
    assert {r["system"] for r in latency} == {"meshpy"}
    assert latency[0]["added_ms"]["p99"] == 0.3


def test_charts_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    written = suite.write_charts(tmp_path, chart_modes())
    assert [Path(p).name for p in written] == ["suite-throughput.png", "suite-latency.png"]
    for path in written:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_charts_are_skipped_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(chart, "available", lambda: False)
    assert suite.write_charts(tmp_path, chart_modes()) == []
    assert "pip install matplotlib" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- a tiny real run


@pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in TOOLS), reason="nginx/haproxy/wrk/h2load missing"
)
def test_tiny_real_run_of_one_short_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """direct and HAProxy, HTTP/1.1 and HTTP/2, 1 s each; HAProxy's HTTP/2 check is made to
    fail, so that configuration is n/a with the reason, and the run still succeeds."""
    if peers.meshpy_info() is None:
        pytest.skip("meshpy is not importable")
    checked: list[int] = []
    real_check_h2 = suite.check_h2

    def check_h2_failing_for_the_second(port: int, path: str) -> None:
        checked.append(port)
        if len(checked) == 2:
            raise peers.PeerError("no h2c here (test)")
        real_check_h2(port, path)

    monkeypatch.setattr(suite, "check_h2", check_h2_failing_for_the_second)
    argv = [
        "--only",
        "throughput",
        "--modes",
        "shared",
        "--systems",
        "direct,haproxy",
        "--configs",
        "h1-100B,h2-100B",
        "--rounds",
        "1",
        "--duration",
        "1",
        "--warmup",
        "0",
        "--no-install",
        "--out-dir",
        str(tmp_path),
        "--charts-dir",
        str(tmp_path),
    ]
    assert suite.main(argv) == 0
    (out,) = tmp_path.glob("suite-*.json")
    document = json.loads(out.read_text())
    blocks = document["modes"]["shared"]["summary"]["throughput"]
    assert [b["config"] for b in blocks] == ["h1-100B", "h2-100B"]
    h2_haproxy = blocks[1]["systems"][1]
    assert h2_haproxy["system"] == "haproxy" and "no h2c here" in h2_haproxy["n/a"]
    for s in blocks[0]["systems"] + blocks[1]["systems"][:1]:
        assert s["rounds_ok"] == 1 and s["rps_median"] > 0, s
        assert s["cpu_us_per_req_median"] is not None
    assert document["command"].startswith("python -m bench suite --only throughput")
    assert any("mTLS" in t["target"] and t["met"] is None for t in document["targets"])
