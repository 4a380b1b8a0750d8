"""Plots for the study notebooks: our figure beside the paper's, saved as PNG.

Every function draws on a new figure of two panels (ours on the left, the paper's on the
right, each with its own y axis: absolute numbers differ, shapes should not), writes it to
`path` when given, and returns the matplotlib figure. The Agg backend is used, so this works
without a display (CI).

Caveats:
- paper bars come from `workbench.analysis.paper`; a paper system with no counterpart here is
  drawn grey, with its tag in the label.
"""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd

__all__ = ["device_figure", "save", "size_figure", "startup_figure"]

PULL_COLOUR = "#4c72b0"
LAUNCH_COLOUR = "#dd8452"
GREY = "#b0b0b0"


def save(figure: Any, path: str | os.PathLike[str] | None) -> None:
    if path is not None:
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        figure.savefig(path, dpi=110, bbox_inches="tight")


def startup_figure(
    ours: pd.DataFrame,
    paper: pd.DataFrame,
    title: str,
    *,
    by: tuple[str, ...] = ("system",),
    path: str | os.PathLike[str] | None = None,
) -> Any:
    """Stacked pull + launch bars: our medians per `by` group, the paper's per system."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    grouped = ours.groupby(list(by), dropna=False)[["pull_s", "launch_s"]].median()
    labels = [
        " / ".join(map(str, key if isinstance(key, tuple) else (key,))) for key in grouped.index
    ]
    positions = range(len(grouped))
    left.bar(positions, grouped["pull_s"], color=PULL_COLOUR, label="pull")
    left.bar(
        positions,
        grouped["launch_s"],
        bottom=grouped["pull_s"],
        color=LAUNCH_COLOUR,
        label="launch",
    )
    left.set_xticks(list(positions), labels, rotation=20, ha="right", fontsize=8)
    left.set_ylabel("seconds (median)")
    left.set_title(f"ours: {title}")
    left.legend()

    _paper_bars(right, paper)
    figure.suptitle(title)
    figure.tight_layout()
    save(figure, path)
    return figure


def _paper_bars(axis: Any, paper: pd.DataFrame) -> None:
    totals = paper[paper["metric"] == "ready_s"].reset_index(drop=True)
    for position, row in totals.iterrows():
        split = paper[(paper["system"] == row["system"]) & (paper["condition"] == row["condition"])]
        pulls = split.loc[split["metric"] == "pull_s", "value"]
        colour = PULL_COLOUR if isinstance(row["ours"], str) else GREY
        if len(pulls):
            pull = float(pulls.iloc[0])
            axis.bar(position, pull, color=colour)
            axis.bar(position, row["value"] - pull, bottom=pull, color=LAUNCH_COLOUR)
        else:
            axis.bar(position, row["value"], color=colour, hatch="//" if colour != GREY else "")
        axis.text(position, row["value"], f"{row['value']:g}", ha="center", va="bottom", fontsize=8)
        axis.set_xticks(list(range(len(totals))))
    axis.set_xticklabels(
        [f"{r['system']} ({r['condition']}) {r['tag']}" for _, r in totals.iterrows()],
        rotation=20,
        ha="right",
        fontsize=8,
    )
    axis.set_ylabel("seconds")
    axis.set_title("paper (hatched: total only, grey: no counterpart here)")


def device_figure(
    ours: pd.DataFrame, title: str, *, path: str | os.PathLike[str] | None = None
) -> Any:
    """Random-read IOPS against queue depth per system (left), tree walks (right)."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    reads = ours[ours["test"].str.startswith("randread")]
    for system, part in reads.groupby("system"):
        curve = part.groupby("queue_depth")["iops"].median()
        left.plot(curve.index, curve.values, marker="o", label=system)
    left.set_xscale("log", base=2)
    left.set_xlabel("queue depth")
    left.set_ylabel("IOPS (median)")
    left.set_title("random reads (fio, direct, page cache dropped)")
    left.legend()

    walks = ours[ours["test"].isin(["du", "tar"])]
    if len(walks):
        table = walks.groupby(["test", "system"])["seconds"].median().unstack("system")
        table.plot.bar(ax=right, rot=0)
    right.set_ylabel("seconds (median)")
    right.set_title("du -s and tar cf - | cat over the mounted tree")
    figure.suptitle(title)
    figure.tight_layout()
    save(figure, path)
    return figure


def size_figure(
    ours: pd.DataFrame,
    paper: pd.DataFrame,
    title: str,
    *,
    path: str | os.PathLike[str] | None = None,
) -> Any:
    """Image size per form (MiB) for each workload, and the paper's WordPress sizes."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    table = ours.pivot_table(index="workload", columns="format", values="bytes", aggfunc="median")
    (table / 2**20).plot.bar(ax=left, rot=0)
    left.set_ylabel("MiB")
    left.set_title("ours")
    sizes = paper[paper["metric"] == "bytes"]
    right.bar(sizes["condition"], sizes["value"] / 2**20, color=PULL_COLOUR)
    right.set_ylabel("MiB")
    right.set_title("paper: WordPress [S]")
    figure.suptitle(title)
    figure.tight_layout()
    save(figure, path)
    return figure
