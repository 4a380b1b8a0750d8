"""The text a run ends with: our medians beside the paper's numbers, and the figure's PNG.

`paper_table(table, figure)` gives, per system and condition of a start-up study, our median
pull, launch and ready seconds next to the paper's number for the same system (by
`paper.SYSTEM_NAMES`, with its tag; ``lazy`` under a warm cache counts as the paper's warm
DADI), and the speed-up of each system over
``tgz-overlayfs`` next to the paper's. `draw(table, figure, out_dir)` saves the study's
figure (ours beside the paper's) as PNG and returns its path.

Caveats:
- the paper's Fig 15 numbers differ by disk, so the paper column is matched on the disk
  preset there; other figures match on the system alone.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from workbench.analysis import plots
from workbench.analysis.paper import paper_numbers

__all__ = ["draw", "paper_table"]

_CONDITIONS = ("network", "disk", "cache_state")


def paper_table(table: pd.DataFrame, figure: str) -> pd.DataFrame:
    """Our medians per system and condition, the paper's number, speed-ups of both."""
    ok = table[table["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame()
    by = [c for c in _CONDITIONS if ok[c].nunique() > 1]
    medians = ok.groupby([*by, "system"])[["pull_s", "launch_s", "ready_s"]].median()
    medians["trials"] = ok.groupby([*by, "system"]).size()
    paper = paper_numbers(figure)
    paper = paper[paper["metric"] == "ready_s"]

    rows = []
    for key, row in medians.iterrows():
        values = key if isinstance(key, tuple) else (key,)
        conditions = dict(zip([*by, "system"], values, strict=True))
        system = conditions["system"]
        if system == "lazy" and ok.loc[ok["system"] == system, "cache_state"].eq("warm").all():
            system = "lazy-warm"  # lazy with a warm cache is the paper's warm DADI
        reference = _paper_row(paper, system, conditions.get("disk"))
        baseline = _baseline(medians, by, conditions)
        paper_base = _paper_row(paper, "tgz-overlayfs", conditions.get("disk"))
        rows.append(
            {
                **conditions,
                "pull_s": row["pull_s"],
                "launch_s": row["launch_s"],
                "ready_s": row["ready_s"],
                "trials": int(row["trials"]),
                "speedup": baseline / row["ready_s"] if baseline else float("nan"),
                "paper_system": reference["system"] if reference is not None else "-",
                "paper_ready_s": reference["value"] if reference is not None else float("nan"),
                "paper_speedup": (
                    paper_base["value"] / reference["value"]
                    if reference is not None and paper_base is not None
                    else float("nan")
                ),
                "tag": reference["tag"] if reference is not None else "",
            }
        )
    return pd.DataFrame(rows)


def _paper_row(paper: pd.DataFrame, ours: str, disk: str | None) -> pd.Series | None:
    """The paper's number for our system `ours` (on `disk` where the figure varies it)."""
    rows = paper[paper["ours"] == ours]
    if disk is not None and rows["condition"].isin([disk]).any():
        rows = rows[rows["condition"] == disk]
    return rows.iloc[0] if len(rows) else None


def _baseline(medians: pd.DataFrame, by: list[str], conditions: dict) -> float | None:
    key = (*(conditions[c] for c in by), "tgz-overlayfs")
    key = key if len(key) > 1 else key[0]
    try:
        return float(medians.loc[key, "ready_s"])
    except KeyError:
        return None


def draw(table: pd.DataFrame, figure: str, out_dir: Path, name: str) -> Path:
    """The study's figure, ours beside the paper's, as ``out_dir/NAME.png``."""
    ok = table[table["status"] == "ok"]
    path = out_dir / f"{name}.png"
    by = ["system", *(c for c in _CONDITIONS if ok[c].nunique() > 1)]
    drawn = plots.startup_figure(
        ok, paper_numbers(figure), f"{figure}: {name}", by=tuple(by), path=path
    )
    plots.plt.close(drawn)
    return path
