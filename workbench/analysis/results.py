"""Result tables of experiment runs: load them, summarise them, compute the ratios that matter.

    run = load_run("experiments/samples/fig14-cold-start")   # a run folder
    run.table                                                # ok trials, one row per trial
    run.meta["unavailable"]                                  # systems with no results, why
    summary(run.table)                                       # medians per condition

A run folder holds ``trials.parquet`` (`workbench.experiments.runner.COLUMNS`) and
``run.json`` (environment, definition, unavailable systems). A bare table (Parquet or CSV)
loads too, with empty metadata.

Caveats:
- medians over few repetitions (quick runs have one) are single measurements, not estimates;
  the notebooks say how many trials each figure rests on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from workbench.errors import ExperimentError
from workbench.experiments.runner import CONDITIONS

__all__ = ["Run", "gap_removed", "load_run", "medians", "speedup", "summary"]

GROUPS = CONDITIONS
FIGURES = ("pull_s", "launch_s", "ready_s", "iops", "mb_s", "seconds", "bytes", "registry_bytes")


@dataclass
class Run:
    """One run: its ok trials, all trials (failed ones too) and its run.json."""

    table: pd.DataFrame
    all_trials: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def unavailable(self) -> dict[str, str]:
        return dict(self.meta.get("unavailable", {}))

    @property
    def repetitions(self) -> int:
        return int(self.table["repetition"].max()) + 1 if len(self.table) else 0


def load_run(path: str | os.PathLike[str]) -> Run:
    """The run at `path`: a run folder, or a trials table file (.parquet, .csv)."""
    source = Path(path)
    meta: dict[str, Any] = {}
    table_path = source
    if source.is_dir():
        table_path = source / "trials.parquet"
        if (source / "run.json").exists():
            meta = json.loads((source / "run.json").read_text())
    if not table_path.exists():
        raise ExperimentError(
            f"{table_path}: no result table; run `workbench experiment run DEF --output "
            f"{source}` first, or point at experiments/samples/"
        )
    trials = pd.read_csv(table_path) if table_path.suffix == ".csv" else pd.read_parquet(table_path)
    ok = trials[trials["status"] == "ok"].reset_index(drop=True)
    return Run(ok, trials, meta, source)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Median of each measured figure per condition group (conditions that vary only)."""
    ok = table[table["status"] == "ok"] if "status" in table else table
    if ok.empty:
        return pd.DataFrame()
    groups = [g for g in GROUPS if g in ok and ok[g].nunique(dropna=False) > 1] or ["system"]
    figures = [f for f in FIGURES if f in ok and ok[f].notna().any()]
    medians_ = ok.groupby(groups, dropna=False)[figures].median()
    medians_["trials"] = ok.groupby(groups, dropna=False).size()
    return medians_


def medians(table: pd.DataFrame, by: list[str], metric: str) -> pd.Series:
    """Median of `metric` per `by` group."""
    return table.groupby(by, dropna=False)[metric].median()


def speedup(table: pd.DataFrame, base: str, other: str, metric: str = "ready_s") -> float:
    """median(metric of `base`) / median(metric of `other`): how many times faster `other` is."""
    base_rows = table.loc[table["system"] == base, metric]
    other_rows = table.loc[table["system"] == other, metric]
    if base_rows.empty or other_rows.empty:
        return float("nan")
    return float(base_rows.median() / other_rows.median())


def gap_removed(cold: float, warm: float, improved: float) -> float:
    """Share of the cold-warm gap an improvement removes: (cold - improved) / (cold - warm)."""
    if cold == warm:
        return float("nan")
    return (cold - improved) / (cold - warm)
