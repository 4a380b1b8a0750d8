"""Analysis helpers on the committed sample tables: loading, ratios, paper numbers, plots."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from workbench.analysis import load_run, paper_numbers, plots, summary
from workbench.analysis.paper import PAPER, paper_value
from workbench.analysis.report import draw, paper_table
from workbench.analysis.results import gap_removed, speedup
from workbench.errors import ExperimentError

SAMPLES = Path(__file__).parents[2] / "experiments" / "samples"


def test_every_paper_number_has_a_tag_and_a_source() -> None:
    assert {reference.tag for reference in PAPER} <= {"[R]", "[S]", "[E]"}
    assert all(reference.source for reference in PAPER)
    fig14 = paper_numbers("Fig 14")
    assert paper_value("Fig 14", ".tgz + overlay2") == 11.1
    assert set(fig14.loc[fig14.ours.notna(), "ours"]) == {"tgz-overlayfs", "lazy"}
    with pytest.raises(KeyError):
        paper_value("Fig 14", "no such system")


def test_the_papers_gap_removed_is_95_percent() -> None:
    cold, warm, prefetch = (
        paper_value("Fig 16", name) for name in ("DADI cold", "DADI warm", "DADI cold + prefetch")
    )
    assert gap_removed(cold, warm, prefetch) == pytest.approx(0.95, abs=0.01)
    assert gap_removed(1.0, 1.0, 0.5) != gap_removed(1.0, 1.0, 0.5)  # NaN: no gap


def test_load_run_and_summary_of_a_sample() -> None:
    run = load_run(SAMPLES / "fig14-cold-start")
    assert run.meta["study"] == "fig14-cold-start" and run.repetitions >= 1
    table = summary(run.table)
    assert {"pull_s", "launch_s", "ready_s", "trials"} <= set(table.columns)
    assert set(table.index.get_level_values("system")) == {"lazy", "tgz-overlayfs"}
    ratio = speedup(run.table, "tgz-overlayfs", "lazy")
    by_hand = (
        run.table.loc[run.table.system == "tgz-overlayfs", "ready_s"].median()
        / run.table.loc[run.table.system == "lazy", "ready_s"].median()
    )
    assert ratio == pytest.approx(by_hand)
    assert speedup(run.table, "tgz-overlayfs", "missing") != speedup(run.table, "a", "b")
    with pytest.raises(ExperimentError, match="no result table"):
        load_run(SAMPLES / "no-such-study")


def test_paper_table_puts_the_papers_number_beside_ours(tmp_path: Path) -> None:
    run = load_run(SAMPLES / "fig15-warm-start")
    table = paper_table(run.table, "Fig 15")
    lazy_cloud = table[(table.system == "lazy") & (table.disk == "cloud-disk")].iloc[0]
    assert lazy_cloud.paper_system == "DADI" and lazy_cloud.paper_ready_s == 0.75
    assert lazy_cloud.paper_speedup == pytest.approx(2.12 / 0.75)
    assert draw(run.table, "Fig 15", tmp_path, "fig15").stat().st_size > 1000


def test_plots_write_pngs(tmp_path: Path) -> None:
    device = load_run(SAMPLES / "fig22-24-device").table
    plots.device_figure(device, "device", path=tmp_path / "device.png")
    sizes = load_run(SAMPLES / "image-sizes").table
    plots.size_figure(sizes, paper_numbers("sizes"), "sizes", path=tmp_path / "sizes.png")
    startup = pd.concat([load_run(SAMPLES / "fig16-prefetch").table])
    plots.startup_figure(startup, paper_numbers("Fig 16"), "f16", path=tmp_path / "f16.png")
    assert sorted(path.name for path in tmp_path.glob("*.png")) == [
        "device.png",
        "f16.png",
        "sizes.png",
    ]
