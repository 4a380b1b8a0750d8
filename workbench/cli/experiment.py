"""`workbench experiment run|compare`: run a study's definition; compare two runs.

``run DEF [--quick] [--output DIR]`` runs the trials of an experiments/*.toml definition that
the output folder does not hold yet (an interrupted run resumes), then prints a summary:
median seconds per system and condition. ``compare RUN_A RUN_B`` prints, per condition and
metric, the ratio B / A and whether it is beyond noise (`workbench.experiments.compare`).
"""

from __future__ import annotations

import signal
from pathlib import Path

import click

from workbench.experiments.compare import compare_runs, render
from workbench.experiments.definition import load_definition
from workbench.experiments.runner import run_experiment, scratch_root


@click.group("experiment")
def experiment() -> None:
    """The paper's studies: run a definition (experiments/*.toml), compare two runs."""


@experiment.command("run")
@click.argument("definition", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--quick", is_flag=True, help="Apply the definition's [quick] table (a smoke run).")
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run folder (default: /var/tmp/workbench-experiments/runs/NAME[-quick]).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def run(definition: Path, quick: bool, output: Path | None, no_progress: bool) -> None:
    """Run the trials of DEFINITION not yet in the output folder; print a summary."""
    from workbench.analysis.results import summary

    # SIGTERM (and SIGINT even where a shell started us with it ignored) stops the run the
    # way Ctrl-C does: the trial in progress is dropped, mounts and cgroups are undone, the
    # trials written so far stay, and the next run resumes after them.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    parsed = load_definition(definition, quick=quick)
    if output is None:
        output = scratch_root() / "runs" / (parsed.name + ("-quick" if quick else ""))
    result = run_experiment(parsed, output, progress=not no_progress)
    click.echo(f"{parsed.name}: {result.ran} trials run, {result.skipped} already done")
    for system, why in result.unavailable.items():
        click.echo(f"unavailable: {system}: {why}")
    failed = result.table[result.table["status"] != "ok"]
    for row in failed.itertuples():
        click.echo(f"failed: {row.key}: {row.error}")
    click.echo(summary(result.table).to_string())
    if parsed.kind == "startup" and (result.table["status"] == "ok").any():
        _paper_comparison(result.table, parsed.figure, output, parsed.name)
    click.echo(f"results: {result.table_path}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _paper_comparison(table: object, figure: str, output: Path, name: str) -> None:
    """Our medians beside the paper's numbers, and the figure as PNG in the run folder."""
    import pandas as pd

    from workbench.analysis.report import draw, paper_table

    assert isinstance(table, pd.DataFrame)
    comparison = paper_table(table, figure)
    click.echo(f"\nours beside the paper ({figure}; speedup = tgz-overlayfs ready / system ready):")
    click.echo(comparison.to_string(index=False, float_format=lambda value: f"{value:.2f}"))
    click.echo(f"figure: {draw(table, figure, output, name)}")


@experiment.command("compare")
@click.argument("run_a", type=click.Path(exists=True, path_type=Path))
@click.argument("run_b", type=click.Path(exists=True, path_type=Path))
@click.option("--fail-on-slower", is_flag=True, help="Exit with status 1 if any metric got worse.")
def compare(run_a: Path, run_b: Path, fail_on_slower: bool) -> None:
    """Per metric, the ratio RUN_B / RUN_A and whether it is beyond noise (bootstrap)."""
    from workbench.experiments.compare import load_results

    a, b = load_results(run_a), load_results(run_b)
    report = compare_runs(a, b)
    click.echo(render(report))
    if "loadavg" in a and "loadavg" in b and len(a) and len(b):
        click.echo(
            f"  load average when each run started: A {a['loadavg'].median():g}, "
            f"B {b['loadavg'].median():g} (on {a['cpus'].max():g} / {b['cpus'].max():g} CPUs); "
            "a busier machine takes longer whatever the code"
        )
    worse = report[report["verdict"] == "slower"]
    if fail_on_slower and len(worse):
        raise SystemExit(1)
