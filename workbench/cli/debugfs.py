"""`workbench debugfs MOUNTPOINT`: the debug view of every running image (`workbench.debugfs`)."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["debugfs"]


@click.command("debugfs")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where mount state is kept (default: $WORKBENCH_RUN_DIR or /run/workbench).",
)
def debugfs(mountpoint: Path, run_dir: Path | None) -> None:
    """Mount a read-only view of the internals of every mounted image at MOUNTPOINT.

    Runs in the foreground until `fusermount3 -u MOUNTPOINT` or Ctrl-C. Each image gets a
    folder: its layers' headers and indexes, the merged index, the block cache's presence
    maps and statistics, requests in flight, metrics, and a live `trace` for `tail -f`.
    MOUNTPOINT/README says what each file is.
    """
    from workbench.debugfs import serve

    def ready() -> None:
        click.echo(f"debug view at {mountpoint} (README there); fusermount3 -u to stop", err=True)
        click.echo("ready", nl=True)

    serve(mountpoint, run_dir, ready)
