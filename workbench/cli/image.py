"""`workbench export`: write the merged image of a config as a raw disk image.

The output is the virtual disk byte for byte, `size` bytes long. Sparse output (the default)
writes only the ranges that hold data and seeks over unmapped and trimmed ones, so they stay
holes in the file; `--no-sparse` writes every byte. The image is written to ``OUT.tmp`` and
renamed to ``OUT`` when complete, so a failed export never leaves a half-written ``OUT``.

Export never modifies its input: the config's writable layer is opened read-only
(``upper="readonly"``), so its files keep their bytes and mtimes, and a torn tail left by a
crash is skipped in memory, not repaired on disk.

Caveats:
- whether holes stay holes depends on the file system of OUT (most Linux ones keep them);
- a range a layer wrote zeros to is data, not a hole: it is written out.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import click
from tqdm import tqdm

from workbench.image.open import open_image
from workbench.image.stack import LayerStack

__all__ = ["export", "export_image"]

log = logging.getLogger(__name__)

CHUNK: int = 4 << 20
"""Bytes per read and write: OverlayBD's largest I/O."""


def export_image(stack: LayerStack, out: Path, sparse: bool = True, progress: bool = True) -> int:
    """Write the disk of `stack` to `out` (via ``out.tmp``); returns the bytes of data written."""
    tmp = out.with_name(out.name + ".tmp")
    ranges = list(stack.data_ranges()) if sparse else [(0, stack.size)]
    total = sum(length for _, length in ranges)

    written = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            # The full size first: ranges not written below are then holes.
            os.ftruncate(fd, stack.size)
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                file=sys.stderr,
                disable=not progress,
                desc=out.name,
            ) as bar:
                for offset, length in _chunks(ranges):
                    data = stack.pread(offset, length)
                    os.pwrite(fd, data, offset)
                    written += len(data)
                    bar.update(len(data))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

    log.info("exported %s: %d bytes of data in a %d-byte image", out, written, stack.size)
    return written


def _chunks(ranges: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    for offset, length in ranges:
        for start in range(offset, offset + length, CHUNK):
            yield start, min(CHUNK, offset + length - start)


@click.command("export")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-f", "--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option(
    "--sparse/--no-sparse",
    default=True,
    show_default=True,
    help="Leave unmapped and trimmed ranges as holes in OUT.",
)
def export(config: Path, out: Path, force: bool, sparse: bool) -> None:
    """Write the merged image of CONFIG (a config.v1.json) to OUT as a raw disk image."""
    if out.exists() and not force:
        raise click.ClickException(f"{out} exists; pass -f to overwrite it")
    # Workbench errors reach the `workbench` group, which prints them as one line.
    # Read-only: an export must not repair (or otherwise touch) the layers it reads.
    with open_image(config, upper="readonly") as stack:
        written = export_image(stack, out, sparse=sparse)
        size = stack.size
    click.echo(f"{out}: {size} bytes ({written} bytes of data)", err=True)
