"""`workbench lsmt`: create, commit, import and seal LSMT layers, as OverlayBD's tools do.

Commands (each mirrors an OverlayBD tool and writes byte-compatible files):

    create DATA INDEX --size SIZE     overlaybd-create: a new, empty writable layer
    commit DATA INDEX OUT             overlaybd-commit: writable layer -> read-only layer
    import RAW OUT                    a raw disk image -> read-only layer (zero blocks skipped)
    seal DATA INDEX                   overlaybd-commit --seal: make the data file read-only

Caveats:
- sizes take binary suffixes (K, M, G, T = powers of 1024), unlike overlaybd-create, which
  takes whole GiB only;
- the commands work on local files only (no --upload to a registry).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from workbench.cli.units import parse_size
from workbench.errors import WorkbenchError
from workbench.image.commit import commit_writable, import_raw
from workbench.image.writable import WritableLayer

__all__ = ["lsmt"]

log = logging.getLogger(__name__)


class SizeType(click.ParamType):
    """A size on the command line: 64G, 512M, 4K or a byte count (see `units.parse_size`)."""

    name = "size"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except click.BadParameter as exc:
            self.fail(exc.message, param, ctx)


SIZE = SizeType()


def _fail_on_workbench_errors(action):
    """Turn the workbench's errors into a clean `Error: ...` line instead of a traceback."""
    try:
        return action()
    except (WorkbenchError, FileExistsError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise click.ClickException(f"{out} exists; pass -f to overwrite it")


def _compression(compress: bool, algorithm: str | None) -> str | None:
    if algorithm is not None:
        return algorithm
    return "lz4" if compress else None


def output_options(function):
    """The options shared by `commit` and `import`: compression, tar, identity, message."""
    options = [
        click.option(
            "-z",
            "--compress",
            is_flag=True,
            help="Compress the layer with ZFile (lz4 unless --algorithm says otherwise).",
        ),
        click.option(
            "--algorithm",
            type=click.Choice(["lz4", "zstd"]),
            default=None,
            help="ZFile compression algorithm; implies -z.",
        ),
        click.option(
            "--block-size",
            type=SIZE,
            default="4K",
            show_default=True,
            help="ZFile block size: a power of two from 4K to 64K.",
        ),
        click.option(
            "-t",
            "--tar",
            is_flag=True,
            help="Wrap the result in a tar, as OverlayBD pushes layers to a registry.",
        ),
        click.option("--uuid", default=None, help="UUID of the new layer (default: all zeros)."),
        click.option("--parent-uuid", default=None, help="UUID of the layer below this one."),
        click.option(
            "-m", "--message", default="", help="Commit message stored in the layer header."
        ),
        click.option("-f", "--force", is_flag=True, help="Overwrite OUT if it exists."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.group()
def lsmt() -> None:
    """Make and convert LSMT layers, OverlayBD's block-level image layers.

    A writable layer is two files: DATA holds the written blocks, INDEX says where each
    block of the virtual disk lives in DATA. Committing turns them into one read-only layer
    file, optionally compressed (ZFile) and tar-wrapped, ready to push as an image layer.
    """


@lsmt.command()
@click.argument("data", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("index", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--size",
    type=SIZE,
    required=True,
    help="Size of the virtual disk: 64G, 512M or bytes; a multiple of 512.",
)
@click.option(
    "--sparse",
    is_flag=True,
    help="Store each block at its own offset in a sparse DATA file (no index entries).",
)
@click.option("--parent-uuid", default=None, help="UUID of the read-only layer below.")
@click.option("--uuid", default=None, help="UUID of the new layer (default: random).")
def create(
    data: Path, index: Path, size: int, sparse: bool, parent_uuid: str | None, uuid: str | None
) -> None:
    """Create an empty writable layer in DATA and INDEX (as overlaybd-create)."""
    if size <= 0 or size % 512:
        raise click.BadParameter(
            f"{size} bytes is not a positive multiple of 512", param_hint="--size"
        )

    def action():
        return WritableLayer.create(data, index, size, parent_uuid, uuid, sparse)

    layer = _fail_on_workbench_errors(action)
    with layer:
        click.echo(f"created {data} (uuid {layer.uuid}, virtual size {size} bytes)")


@lsmt.command()
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("index", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@output_options
def commit(
    data: Path,
    index: Path,
    out: Path,
    compress: bool,
    algorithm: str | None,
    block_size: int,
    tar: bool,
    uuid: str | None,
    parent_uuid: str | None,
    message: str,
    force: bool,
) -> None:
    """Commit the writable layer DATA + INDEX into a read-only layer file OUT.

    The result is what overlaybd-commit writes: the same bytes without -z. The parent UUID
    defaults to the writable layer's; the UUID to all zeros (as overlaybd-commit).
    """
    _check_output(out, force)

    # Committing only reads the layer: open it read-only so that nothing (not even the
    # repair of a torn index tail) changes the input.
    def action():
        with WritableLayer.open(data, index if index.exists() else None, readonly=True) as layer:
            return commit_writable(
                layer,
                out,
                uuid=uuid,
                parent_uuid=parent_uuid,
                message=message,
                compress=_compression(compress, algorithm),
                block_size=block_size,
                tar=tar,
            )

    trailer = _fail_on_workbench_errors(action)
    click.echo(f"committed {data} to {out} ({trailer.index_offset - 4096} bytes of data)")


@lsmt.command("import")
@click.argument("raw", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@output_options
def import_(
    raw: Path,
    out: Path,
    compress: bool,
    algorithm: str | None,
    block_size: int,
    tar: bool,
    uuid: str | None,
    parent_uuid: str | None,
    message: str,
    force: bool,
) -> None:
    """Turn the raw disk image RAW into a read-only layer file OUT.

    All-zero 4 KiB blocks are left out of the layer (they read as zeros anyway). The virtual
    size is RAW's size rounded up to a multiple of 512 bytes.
    """
    _check_output(out, force)

    def action():
        return import_raw(
            raw,
            out,
            uuid=uuid,
            parent_uuid=parent_uuid,
            message=message,
            compress=_compression(compress, algorithm),
            block_size=block_size,
            tar=tar,
        )

    trailer = _fail_on_workbench_errors(action)
    click.echo(f"imported {raw} to {out} ({trailer.index_offset - 4096} bytes of data)")


@lsmt.command()
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("index", type=click.Path(dir_okay=False, path_type=Path))
def seal(data: Path, index: Path) -> None:
    """Seal the writable layer DATA + INDEX: DATA becomes a read-only layer file.

    The index is appended to DATA with a trailer (as overlaybd-commit --seal); INDEX is no
    longer needed afterwards and can be deleted.
    """

    def action():
        with WritableLayer.open(data, index if index.exists() else None) as layer:
            layer.seal()
            return len(layer.index)

    entries = _fail_on_workbench_errors(action)
    click.echo(f"sealed {data} ({entries} index entries)")
