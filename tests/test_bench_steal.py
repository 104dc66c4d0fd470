"""``python -m bench steal``: fixed-rate p99s against their group's median, by steal band."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's bench/

from bench import steal


def fixed_rate_run(steal_pct: float, p99_us: float) -> dict[str, Any]:
    return {"cpu": {"steal_pct": steal_pct}, "latency_us": {"p99": p99_us}}


def suite_document() -> dict[str, Any]:
    """One mode, one rate: meshpy's three kept runs and one set aside for steal; a system
    with a single run has no median to compare with and is left out."""
    kept = [fixed_rate_run(0.1, 1000.0), fixed_rate_run(0.7, 1100.0), fixed_rate_run(3.0, 2000.0)]
    set_aside = {"round": 1, "steal_pct": 6.0, "rps": 1000.0, "p99_us": 5500.0}
    return {
        "scenario": "suite",
        "modes": {
            "isolated": {
                "runs": {
                    "latency": [
                        {
                            "rate": 1000.0,
                            "runs": {"meshpy": kept, "nginx": [fixed_rate_run(9.0, 9000.0)]},
                        }
                    ]
                },
                "summary": {
                    "latency": [
                        {
                            "rate": 1000.0,
                            "systems": [
                                {"system": "meshpy", "retaken": [set_aside]},
                                {"system": "nginx", "retaken": []},
                            ],
                        }
                    ]
                },
            }
        },
    }


def test_each_run_is_compared_with_the_median_of_its_kept_group() -> None:
    ratios = sorted(steal.p99_ratios(suite_document()))
    assert ratios == [(0.1, 1000 / 1100), (0.7, 1.0), (3.0, 2000 / 1100), (6.0, 5.0)]


def test_the_table_groups_the_ratios_by_steal_band(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = tmp_path / "suite.json"
    result.write_text(json.dumps(suite_document()))
    assert steal.main([str(result)]) == 0
    rows = {line[:12].strip(): line[12:].split() for line in capsys.readouterr().out.splitlines()}
    assert rows["under 0.5%"] == ["1", "0.91", "0%"]
    assert rows["0.5-1%"] == ["1", "1.00", "0%"]
    assert rows["1-2%"] == ["0", "-", "-"]
    assert rows["2-5%"] == ["1", "1.82", "100%"]
    assert rows["5% or more"] == ["1", "5.00", "100%"]


def test_a_file_that_is_not_a_suite_result_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "results.json"
    other.write_text(json.dumps({"scenario": "proxies"}))
    assert steal.main([str(other)]) == 2
    assert f"{other}: not a `python -m bench suite` result" in capsys.readouterr().err
