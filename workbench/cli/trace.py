"""`workbench trace FILE`: what a recorded trace says, as text (`workbench.tracing.report`)."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["trace"]


@click.command("trace")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--request", "request_id", type=int, default=None, help="Show this request only.")
@click.option("--slowest", type=int, default=3, show_default=True, help="Request trees to show.")
@click.option("--kind", default=None, help="Only requests of this kind (e.g. fuse-read).")
@click.option(
    "--perfetto",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the trace as Chrome trace-event JSON (opens in ui.perfetto.dev).",
)
def trace(
    path: Path, request_id: int | None, slowest: int, kind: str | None, perfetto: Path | None
) -> None:
    """Summarize the trace in PATH (a Parquet file of `mount --trace` or a recording).

    Prints events per layer and operation, requests by kind, and the slowest requests as
    trees: each kernel request, the LSMT segments and ZFile blocks it read, and the cache
    hits and registry fetches below them.
    """
    from workbench.tracing.report import load, render_report

    frame = load(path)
    if perfetto is not None:
        from workbench.tracing.perfetto import write_perfetto

        slices = write_perfetto(frame, perfetto)
        click.echo(f"wrote {slices} slices to {perfetto} (open it in https://ui.perfetto.dev)")
        return
    try:
        click.echo(render_report(frame, request_id, slowest, kind))
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from exc
