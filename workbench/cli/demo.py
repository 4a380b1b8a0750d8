"""`workbench demo`: the main job until the experiments exist; see `workbench.demo`."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import click


@click.command("demo")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    help="Where to build the image (default: a temporary folder, removed afterwards).",
)
@click.option("--keep", is_flag=True, help="Keep the files of the image afterwards.")
def demo(workdir: str | None, keep: bool) -> None:
    """Build a layered image from a few writes, commit and compress it, read it back.

    Three layers (tar+ZFile lz4, ZFile zstd, writable), a config.v1.json over them, every
    byte of the merged disk checked against a model, one read traced through the layers,
    and `inspect` of each file. Exit code 1 if anything read back wrong.
    """
    from workbench.demo import run_demo

    if workdir is not None and Path(workdir).exists() and any(Path(workdir).iterdir()):
        raise click.UsageError(f"{workdir} is not empty; give an empty or new folder")

    folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="workbench-demo-"))
    try:
        ok = run_demo(folder, say=click.echo)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            click.echo(f"files kept in {folder}")
    sys.exit(0 if ok else 1)
