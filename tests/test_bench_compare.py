"""``python -m bench compare``: two result files in, what changed out, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def system(name: str, rps: tuple[float, float, float], cpu: float, p99_added: float = 0.0):
    low, median, high = rps
    return {
        "system": name,
        "rounds_ok": 3,
        "rps_median": median,
        "rps_min": low,
        "rps_max": high,
        "cpu_us_per_req_median": cpu,
        "latency_us_added": {"p99": p99_added},
    }


def suite_result(
    revision: str, meshpy: tuple[float, float, float], nginx: tuple[float, float, float], **settings
) -> dict[str, Any]:
    throughput = {
        "label": "HTTP/1.1 100 B",
        "systems": [system("meshpy", meshpy, 12.0), system("nginx", nginx, 13.0)],
    }
    latency = {
        "label": "50% (40,000 req/s)",
        "systems": [system("meshpy", meshpy, 0, 900.0), system("nginx", nginx, 0, 950.0)],
    }
    return {
        "command": "python -m bench suite",
        "started": "20261127-120000",
        "machine": {"cpu_model": "x", "nproc": 2, "kernel": "k"},
        "meshpy": {"build_revision": revision},
        "settings": {"rounds": 3, "duration": 10.0, "threads": 1, **settings},
        "modes": {
            "isolated": {"summary": {"throughput": [throughput], "latency": [latency]}},
            "shared": {"error": "not run"},
        },
    }


def run_compare(tmp_path: Path, before: Any, after: Any) -> subprocess.CompletedProcess[str]:
    paths = []
    for name, document in (("before", before), ("after", after)):
        path = tmp_path / f"{name}.json"
        path.write_text(document if isinstance(document, str) else json.dumps(document))
        paths.append(str(path))
    return subprocess.run(
        [sys.executable, "-m", "bench", "compare", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def row(output: str, *words: str) -> list[str]:
    """The fields of the one output line starting with ``words``."""
    (line,) = [line for line in output.splitlines() if line.split()[: len(words)] == list(words)]
    return line.split()


def test_changes_beyond_both_spreads_are_told_from_noise(tmp_path: Path) -> None:
    before = suite_result("aaa1111", (80000, 82000, 84000), (79000, 80000, 81000))
    after = suite_result("bbb2222", (88000, 90000, 91000), (78000, 81000, 82000))
    done = run_compare(tmp_path, before, after)
    assert done.returncode == 0, done.stderr
    assert "aaa1111" in done.stdout and "bbb2222" in done.stdout
    meshpy = row(done.stdout, "isolated", "HTTP/1.1", "100", "B", "meshpy")
    assert meshpy[5:9] == ["82,000", "90,000", "+9.8%", "faster"]
    assert meshpy[-3:] == ["12.0", "->", "12.0"]
    nginx = row(done.stdout, "isolated", "HTTP/1.1", "100", "B", "nginx")
    assert nginx[5:8] == ["80,000", "81,000", "+1.2%"] and "within spread" in " ".join(nginx)
    latency = row(done.stdout, "isolated", "50%", "(40,000", "req/s)", "meshpy")
    assert latency[-2:] == ["+0.900", "+0.900"]
    assert "differ between the runs" not in done.stdout
    slower = run_compare(tmp_path, after, before)
    assert "slower" in row(slower.stdout, "isolated", "HTTP/1.1", "100", "B", "meshpy")


def test_settings_that_differ_are_named_before_the_numbers(tmp_path: Path) -> None:
    before = suite_result("a", (1, 2, 3), (1, 2, 3))
    after = suite_result("b", (1, 2, 3), (1, 2, 3), rounds=5)
    done = run_compare(tmp_path, before, after)
    assert done.returncode == 0, done.stderr
    assert "settings.rounds: 3 -> 5" in done.stdout
    assert done.stdout.index("settings.rounds") < done.stdout.index("Throughput")


def test_unreadable_or_mismatched_files_exit_2_with_the_reason(tmp_path: Path) -> None:
    suite = suite_result("a", (1, 2, 3), (1, 2, 3))
    broken = run_compare(tmp_path, suite, "{not json")
    assert broken.returncode == 2 and "after.json" in broken.stderr
    plain = {"settings": {"path": "/"}, "saturation": {"summary": [system("meshpy", (1, 2, 3), 9)]}}
    mixed = run_compare(tmp_path, plain, suite)
    assert mixed.returncode == 2 and "`bench` result" in mixed.stderr
    other = run_compare(tmp_path, suite, {"scenario": "memory"})
    assert other.returncode == 2 and "not a result" in other.stderr


def test_plain_bench_results_compare_too(tmp_path: Path) -> None:
    def plain(rps: tuple[float, float, float]) -> dict[str, Any]:
        return {"settings": {"path": "/"}, "saturation": {"summary": [system("meshpy", rps, 9)]}}

    done = run_compare(tmp_path, plain((10, 20, 30)), plain((5, 10, 12)))
    assert done.returncode == 0, done.stderr
    assert row(done.stdout, "-", "HTTP/1.1", "/", "meshpy")[4:7] == ["20", "10", "-50.0%"]
