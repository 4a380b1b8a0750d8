"""`workbench zfile`: compress, decompress and verify ZFiles (OverlayBD's block compression).

Outputs are written to ``OUT.tmp`` and renamed into place only when complete, so a failure
never leaves a half-written file behind; an existing OUT is kept unless ``-f`` is given.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import click

from workbench.errors import WorkbenchError
from workbench.formats import zfile as zfile_format
from workbench.formats.detect import open_blob

__all__ = ["zfile"]

log = logging.getLogger(__name__)


@click.group()
def zfile() -> None:
    """Compress, decompress and verify ZFiles.

    A ZFile is a file compressed in fixed-size blocks (lz4 or zstd, each with a CRC) plus an
    index of the blocks, so any byte range can be read without decompressing the rest; it is
    how OverlayBD stores image layers.
    """


def _write_atomically(out: Path, force: bool, produce: Callable[[Path], object]) -> None:
    """Run `produce(tmp)` and rename tmp to `out`; refuse an existing `out` without force."""
    if out.exists() and not force:
        raise click.ClickException(f"{out} exists; pass -f/--force to overwrite it")
    tmp = out.with_name(out.name + ".tmp")
    try:
        produce(tmp)
        os.replace(tmp, out)
    except WorkbenchError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if tmp.exists():
            tmp.unlink()


@zfile.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--algorithm",
    type=click.Choice(sorted(zfile_format.ALGORITHMS)),
    default="lz4",
    show_default=True,
    help="Compression of each block.",
)
@click.option(
    "--block-size",
    type=click.Choice([str(size) for size in zfile_format.BLOCK_SIZES]),
    default="4096",
    show_default=True,
    help="Bytes of input per block; smaller blocks read faster at random, larger compress better.",
)
@click.option("--no-verify", is_flag=True, help="Do not store a CRC32C after each block.")
@click.option(
    "--overwrite-header",
    is_flag=True,
    help="Rewrite the header with the index position at the end (as overlaybd-commit -z does), "
    "so readers need not fetch the trailer first.",
)
@click.option("-t", "--tar", is_flag=True, help="Wrap the ZFile in a tar, as pushed to a registry.")
@click.option("-f", "--force", is_flag=True, help="Overwrite OUT if it exists.")
def compress(
    src: Path,
    out: Path,
    algorithm: str,
    block_size: str,
    no_verify: bool,
    overwrite_header: bool,
    tar: bool,
    force: bool,
) -> None:
    """Compress SRC into the ZFile OUT."""
    started = time.perf_counter()
    results: list[zfile_format.ZFileHeader] = []

    def produce(tmp: Path) -> None:
        trailer = zfile_format.compress(
            src,
            tmp,
            algorithm=algorithm,
            block_size=int(block_size),
            verify=not no_verify,
            overwrite_header=overwrite_header,
            tar=tar,
        )
        results.append(trailer)

    _write_atomically(out, force, produce)
    trailer = results[0]
    size = out.stat().st_size
    ratio = size / trailer.original_file_size if trailer.original_file_size else 0.0
    click.echo(
        f"{out}: {trailer.original_file_size} -> {size} bytes ({ratio:.1%}), "
        f"{trailer.index_size} blocks of {trailer.block_size} B, {algorithm}"
        f"{', tar' if tar else ''}, {time.perf_counter() - started:.2f} s"
    )


@zfile.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-f", "--force", is_flag=True, help="Overwrite OUT if it exists.")
def decompress(src: Path, out: Path, force: bool) -> None:
    """Decompress the ZFile SRC (tar-wrapped or not) into OUT, checking every block."""
    _write_atomically(out, force, lambda tmp: zfile_format.decompress(src, tmp))
    click.echo(f"{out}: {out.stat().st_size} bytes")


@zfile.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def verify(src: Path) -> None:
    """Read every block of the ZFile SRC and check every CRC; exit code 1 on damage."""
    try:
        with open_blob(src) as blob:
            reader = blob.zfile
            if reader is None:
                raise click.ClickException(
                    f"{src}: not a ZFile (wrappers: {blob.layers or 'none'})"
                )
            step = max(zfile_format.CHUNK_SIZE // reader.block_size, 1) * reader.block_size
            for offset in range(0, reader.size, step):
                reader.pread(offset, step)
    except WorkbenchError as exc:
        click.echo(f"{src}: FAILED: {exc}", err=True)
        raise SystemExit(1) from None

    crc_note = "CRCs checked" if reader.verify else "no CRCs stored, decompression checked"
    click.echo(
        f"{src}: ok: {'+'.join(blob.layers)}, {reader.algorithm}, {reader.block_count} blocks of "
        f"{reader.block_size} B, {reader.size} bytes, {crc_note}"
    )
