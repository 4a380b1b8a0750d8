"""Comparing two runs: ratios, bootstrap intervals and verdicts on synthetic tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from workbench.cli import cli
from workbench.errors import ExperimentError
from workbench.experiments.compare import compare_runs, render

BASELINES = Path(__file__).parents[2] / "experiments" / "baselines"


def table(ready: dict[str, list[float]], seed: int = 0, status: str = "ok") -> pd.DataFrame:
    rows = []
    for system, values in ready.items():
        for repetition, value in enumerate(values):
            rows.append(
                {
                    "workload": "w",
                    "system": system,
                    "network": "cloud-vm",
                    "status": status,
                    "repetition": repetition,
                    "ready_s": value,
                    "bytes": 100.0,
                }
            )
    return pd.DataFrame(rows)


def noisy(centre: float, n: int, seed: int) -> list[float]:
    return list(centre * (1 + 0.05 * np.random.default_rng(seed).standard_normal(n)))


def verdicts(report: pd.DataFrame, metric: str = "ready_s") -> dict[str, str]:
    rows = report[report["metric"] == metric]
    return dict(zip(rows["system"], rows["verdict"], strict=True))


def test_a_doubling_is_slower_and_noise_is_the_same() -> None:
    a = table({"lazy": noisy(1.0, 8, 1), "tgz": noisy(2.0, 8, 2)})
    b = table({"lazy": noisy(2.0, 8, 3), "tgz": noisy(2.0, 8, 4)})
    report = compare_runs(a, b)
    assert verdicts(report) == {"lazy": "slower", "tgz": "same"}
    lazy = report[(report.system == "lazy") & (report.metric == "ready_s")].iloc[0]
    assert 1.7 < lazy["ratio"] < 2.3
    assert lazy["low"] > 1 and lazy["low"] <= lazy["ratio"] <= lazy["high"]


def test_faster_and_too_few() -> None:
    report = compare_runs(table({"lazy": noisy(2.0, 6, 5)}), table({"lazy": noisy(1.0, 6, 6)}))
    assert verdicts(report) == {"lazy": "faster"}
    report = compare_runs(table({"lazy": [1.0, 1.1]}), table({"lazy": [2.0, 2.1]}))
    assert verdicts(report) == {"lazy": "too few"}
    assert "too few" in render(report)


def test_constant_metrics_need_no_samples() -> None:
    a = table({"lazy": [1.0]})
    b = table({"lazy": [1.0]}).assign(bytes=150.0)
    assert verdicts(compare_runs(a, a), "bytes") == {"lazy": "same"}
    assert verdicts(compare_runs(a, b), "bytes") == {"lazy": "slower"}


def test_failed_trials_and_disjoint_runs() -> None:
    a = table({"lazy": noisy(1.0, 4, 7)})
    failed = table({"lazy": noisy(1.0, 4, 8)}, status="failed")
    with pytest.raises(ExperimentError, match="no condition group and metric in common"):
        compare_runs(a, failed)
    with pytest.raises(ExperimentError, match="no condition group and metric in common"):
        compare_runs(a, table({"other": [1.0]}))
    with pytest.raises(ExperimentError, match="no result table"):
        compare_runs(Path("/nonexistent/run"), a)


def test_cli_compares_the_committed_baseline_with_itself(tmp_path: Path) -> None:
    baselines = sorted(BASELINES.glob("*.csv"))
    assert baselines, "experiments/baselines/ holds the committed baseline"
    runner = CliRunner()
    result = runner.invoke(cli, ["experiment", "compare", str(baselines[0]), str(baselines[0])])
    assert result.exit_code == 0, result.output
    assert "comparison: run B against run A" in result.output
    assert "slower" not in result.output.split("verdict", 1)[1]

    csv = tmp_path / "b.csv"
    slower = pd.read_csv(baselines[0])
    slower["ready_s"] *= 3
    slower["pull_s"] *= 3
    slower.to_csv(csv, index=False)
    result = runner.invoke(
        cli, ["experiment", "compare", str(baselines[0]), str(csv), "--fail-on-slower"]
    )
    assert result.exit_code == 1, result.output
    assert "slower" in result.output


def test_cli_run_refuses_a_bad_definition(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nsystems = ["docker"]\n')
    result = CliRunner().invoke(cli, ["experiment", "run", str(bad)])
    assert result.exit_code == 1
    assert "unknown system" in result.output and "docker" in result.output
