"""Two runs of a study compared: per condition and metric, the ratio and whether it is noise.

    report = compare_runs("experiments/baselines/fig14-cold-start-quick.parquet", "out/")
    print(render(report))

A run is a run folder (its ``trials.parquet``) or a table file (Parquet or CSV). Trials with
status ``ok`` are grouped by their conditions (workload, system, network, disk, cache state,
test, queue depth, format); for each group present in both runs and each metric measured in
both, the report gives the medians, the ratio B / A, and a 95% bootstrap interval of that
ratio (each side resampled with replacement, `BOOTSTRAP_ROUNDS` times, ratio of medians).

Verdict: ``slower`` / ``faster`` when the interval lies wholly above / below 1 (for IOPS and
MB/s, where higher is better, the words swap accordingly), ``same`` when it contains 1,
``too few`` when either side has fewer than `MIN_SAMPLES` trials (a bootstrap of one or two
values says nothing), unless both sides are constant (sizes, counts): then within 1% is
``same``, and beyond it the direction of the change.

Caveats:
- the interval assumes trials are exchangeable; runs on a loaded shared machine differ by
  more than their own spread, which a per-run bootstrap cannot see;
- several metrics and groups are tested at once without correction: expect about one
  ``slower`` or ``faster`` in twenty by chance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd

from workbench.errors import ExperimentError
from workbench.experiments.runner import CONDITIONS

__all__ = ["BOOTSTRAP_ROUNDS", "MIN_SAMPLES", "compare_runs", "load_results", "render"]

BOOTSTRAP_ROUNDS: Final = 2000
MIN_SAMPLES: Final = 3
CONSTANT_TOLERANCE: Final = 0.01
"""Constant metrics (sizes, counts) within 1% of each other are the same."""
METRICS: Final = {
    "pull_s": False,
    "launch_s": False,
    "ready_s": False,
    "iops": True,
    "mb_s": True,
    "seconds": False,
    "bytes": False,
    "registry_requests": False,
    "registry_bytes": False,
}
"""Metrics compared, and whether higher is better."""


@dataclass(frozen=True)
class Comparison:
    """One condition group and metric of two runs."""

    group: dict[str, object]
    metric: str
    n_a: int
    n_b: int
    median_a: float
    median_b: float
    low: float
    high: float
    verdict: str

    @property
    def ratio(self) -> float:
        return self.median_b / self.median_a if self.median_a else float("nan")


def load_results(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The ok trials of a run folder, a Parquet file or a CSV file."""
    source = Path(path)
    if source.is_dir():
        source = source / "trials.parquet"
    if not source.exists():
        raise ExperimentError(
            f"{source}: no result table; give a run folder (with trials.parquet) or a "
            ".parquet/.csv table"
        )
    table = pd.read_csv(source) if source.suffix == ".csv" else pd.read_parquet(source)
    if "status" in table:
        table = table[table["status"] == "ok"]
    return table


def _ok(table: pd.DataFrame) -> pd.DataFrame:
    """The ok trials, conditions as text (a CSV reads empty text as NaN, Parquet keeps it)."""
    table = table[table["status"] == "ok"] if "status" in table else table
    table = table.copy()
    for column in CONDITIONS:
        if column in table:
            text = table[column].astype(object).where(table[column].notna(), "")
            table[column] = text.astype(str)
    return table


def compare_runs(
    run_a: str | os.PathLike[str] | pd.DataFrame,
    run_b: str | os.PathLike[str] | pd.DataFrame,
    *,
    seed: int = 0,
) -> pd.DataFrame:
    """The comparison of two runs, one row per group and metric (see the module docstring)."""
    a = _ok(run_a if isinstance(run_a, pd.DataFrame) else load_results(run_a))
    b = _ok(run_b if isinstance(run_b, pd.DataFrame) else load_results(run_b))
    conditions = [c for c in CONDITIONS if c in a and c in b]
    if not conditions:
        raise ExperimentError("the two tables share no condition columns; are they results?")
    rng = np.random.default_rng(seed)

    rows = []
    groups_b = dict(iter(b.groupby(conditions, dropna=False)))
    for key, part_a in a.groupby(conditions, dropna=False):
        part_b = groups_b.get(key)
        if part_b is None:
            continue
        group = dict(zip(conditions, key if isinstance(key, tuple) else (key,), strict=True))
        for metric, higher_is_better in METRICS.items():
            if metric not in part_a or metric not in part_b:
                continue
            values_a = part_a[metric].dropna().to_numpy(float)
            values_b = part_b[metric].dropna().to_numpy(float)
            if len(values_a) == 0 or len(values_b) == 0:
                continue
            rows.append(_compare(group, metric, values_a, values_b, higher_is_better, rng))
    if not rows:
        raise ExperimentError(
            "the two runs have no condition group and metric in common; compare runs of the "
            "same study"
        )
    return pd.DataFrame(
        [
            {
                **row.group,
                "metric": row.metric,
                "n_a": row.n_a,
                "n_b": row.n_b,
                "median_a": row.median_a,
                "median_b": row.median_b,
                "ratio": row.ratio,
                "low": row.low,
                "high": row.high,
                "verdict": row.verdict,
            }
            for row in rows
        ]
    )


def _compare(
    group: dict[str, object],
    metric: str,
    a: np.ndarray,
    b: np.ndarray,
    higher_is_better: bool,
    rng: np.random.Generator,
) -> Comparison:
    median_a, median_b = float(np.median(a)), float(np.median(b))
    worse, better = ("slower", "faster") if not higher_is_better else ("faster", "slower")
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        # Constant on both sides (sizes, counts): no noise to bootstrap.
        ratio = median_b / median_a if median_a else float("nan")
        if abs(median_b - median_a) <= CONSTANT_TOLERANCE * max(abs(median_a), abs(median_b)):
            verdict = "same"
        else:
            verdict = worse if median_b > median_a else better
        return Comparison(group, metric, len(a), len(b), median_a, median_b, ratio, ratio, verdict)
    if len(a) < MIN_SAMPLES or len(b) < MIN_SAMPLES:
        nan = float("nan")
        return Comparison(group, metric, len(a), len(b), median_a, median_b, nan, nan, "too few")

    low, high = bootstrap_ratio(a, b, rng)
    if low > 1:
        verdict = worse
    elif high < 1:
        verdict = better
    else:
        verdict = "same"
    return Comparison(group, metric, len(a), len(b), median_a, median_b, low, high, verdict)


def bootstrap_ratio(
    a: np.ndarray, b: np.ndarray, rng: np.random.Generator, rounds: int = BOOTSTRAP_ROUNDS
) -> tuple[float, float]:
    """95% interval of median(b) / median(a), each side resampled with replacement."""
    resampled_a = np.median(rng.choice(a, size=(rounds, len(a))), axis=1)
    resampled_b = np.median(rng.choice(b, size=(rounds, len(b))), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = resampled_b / resampled_a
    ratios = ratios[np.isfinite(ratios)]
    if len(ratios) == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(ratios, [0.025, 0.975])
    return float(low), float(high)


def render(report: pd.DataFrame) -> str:
    """The comparison as a text table: the conditions that vary, then the figures."""
    from workbench.bench.formats import Table

    varying = [c for c in CONDITIONS if c in report and report[c].nunique(dropna=False) > 1]
    columns = [*varying, "metric", "n", "A", "B", "B/A", "95% interval", "verdict"]
    rows = []
    for record in report.to_dict("records"):
        interval = "-" if np.isnan(record["low"]) else f"{record['low']:.2f}-{record['high']:.2f}"
        rows.append(
            [
                *(str(record[c]) for c in varying),
                record["metric"],
                f"{record['n_a']}/{record['n_b']}",
                float(record["median_a"]),
                float(record["median_b"]),
                f"{record['ratio']:.2f}",
                interval,
                record["verdict"],
            ]
        )
    table = Table("comparison: run B against run A (medians)", columns, rows)
    table.notes.append(
        f"interval: 95% bootstrap of the ratio of medians ({BOOTSTRAP_ROUNDS} rounds); "
        f"'too few' below {MIN_SAMPLES} trials a side"
    )
    return table.render()
