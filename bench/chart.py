"""PNG charts of a suite run, with matplotlib imported only when a chart is drawn.

matplotlib is not a dependency of meshpy: without it the suite prints ``INSTALL_HINT`` and
skips the charts. The Agg backend draws to files, so no display is needed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install matplotlib"
PERCENTILES = ("p50", "p90", "p99", "p99.9")
SYSTEM_ORDER = ("direct", "meshpy", "nginx", "haproxy")
# One colour per system in every chart, so meshpy is the same colour in both.
COLOURS = {"direct": "tab:gray", "meshpy": "tab:blue", "nginx": "tab:green", "haproxy": "tab:red"}


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ordered(names: Sequence[str], order: Sequence[str]) -> list[str]:
    """Distinct ``names``, known ones in ``order`` first, the rest as first seen."""
    distinct = list(dict.fromkeys(names))
    return [n for n in order if n in distinct] + [n for n in distinct if n not in order]


def _grouped_bars(
    axes: Any,
    groups: list[str],
    series: list[str],
    value: Any,
    error: Any = None,
) -> None:
    """Bars for every series within every group; ``value(group, series)`` may be None
    (no bar), ``error(group, series)`` gives (below, above) for an error bar."""
    width = 0.8 / max(len(series), 1)
    for index, name in enumerate(series):
        xs, heights, below, above = [], [], [], []
        for position, group in enumerate(groups):
            height = value(group, name)
            if height is None:
                continue
            xs.append(position - 0.4 + width * (index + 0.5))
            heights.append(height)
            low, high = error(group, name) if error else (0.0, 0.0)
            below.append(low)
            above.append(high)
        if xs:
            yerr = [below, above] if error else None
            colour = COLOURS.get(name)
            axes.bar(xs, heights, width, label=name, yerr=yerr, capsize=3, color=colour)
    axes.set_xticks(range(len(groups)))
    axes.set_xticklabels(groups)
    axes.grid(axis="y", alpha=0.3)


def throughput_chart(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Grouped bars of median req/s per system and configuration, one panel per mode,
    with the min-max spread over rounds as error bars.

    ``rows``: dicts with mode, config, system, median, min, max.
    """
    plt = _pyplot()
    modes = _ordered([r["mode"] for r in rows], ())
    configs = _ordered([r["config"] for r in rows], ())
    systems = _ordered([r["system"] for r in rows], SYSTEM_ORDER)
    index = {(r["mode"], r["config"], r["system"]): r for r in rows}
    figure, panels = plt.subplots(
        len(modes), 1, figsize=(max(8, 2.2 * len(configs)), 4 * len(modes)), squeeze=False
    )
    for axes, mode in zip(panels[:, 0], modes, strict=True):

        def value(config: str, system: str, mode: str = mode) -> float | None:
            row = index.get((mode, config, system))
            return None if row is None else row["median"]

        def spread(config: str, system: str, mode: str = mode) -> tuple[float, float]:
            row = index[(mode, config, system)]
            return row["median"] - row["min"], row["max"] - row["median"]

        _grouped_bars(axes, configs, systems, value, spread)
        axes.set_title(f"Throughput at saturation ({mode}); bars: median, whiskers: min-max")
        axes.set_ylabel("requests/s")
        axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def latency_chart(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Latency added over direct (ms) at p50, p90, p99 and p99.9 per system, one panel per
    mode and rate.

    ``rows``: dicts with mode, rate (the column), title (of the panel), system, added_ms
    ({percentile: ms}).
    """
    plt = _pyplot()
    modes = _ordered([r["mode"] for r in rows], ())
    rates = _ordered([r["rate"] for r in rows], ())
    systems = _ordered([r["system"] for r in rows], SYSTEM_ORDER)
    index = {(r["mode"], r["rate"], r["system"]): r["added_ms"] for r in rows}
    titles = {(r["mode"], r["rate"]): r.get("title", r["rate"]) for r in rows}
    figure, panels = plt.subplots(
        len(modes),
        len(rates),
        figsize=(4.5 * len(rates), 3.8 * len(modes)),
        squeeze=False,
    )
    for row_index, mode in enumerate(modes):
        for column, rate in enumerate(rates):
            axes = panels[row_index, column]

            def value(pct: str, system: str, mode: str = mode, rate: str = rate) -> float | None:
                added = index.get((mode, rate, system))
                return None if added is None else added.get(pct)

            _grouped_bars(axes, list(PERCENTILES), systems, value)
            axes.axhline(0, color="black", linewidth=0.8)
            title = titles.get((mode, rate))
            axes.set_title(f"{mode}: {title or rate + ' (not measured)'}", fontsize=9)
            axes.set_ylabel("added latency over direct, ms")
            if title:
                axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
