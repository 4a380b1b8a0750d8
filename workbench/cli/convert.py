"""`workbench convert SRC DST` and `workbench verify SRC DST`: OCI/Docker -> OverlayBD, checked."""

from __future__ import annotations

import json
import sys

import click

from workbench.cli.units import parse_size


@click.command("convert")
@click.argument("source")
@click.argument("destination")
@click.option(
    "--algorithm",
    type=click.Choice(["lz4", "zstd"]),
    default="lz4",
    show_default=True,
    help="ZFile compression of the converted layers.",
)
@click.option("--block-size", default="4K", show_default=True, help="ZFile block size.")
@click.option("--vsize", default="64G", show_default=True, help="Virtual disk size.")
@click.option("--no-sizes", is_flag=True, help="Skip measuring the other forms (zstd/lz4, gz).")
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep the work files here.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON here.")
@click.option(
    "--progress/--no-progress", default=None, help="Progress bars (default: on a terminal)."
)
def convert(
    source: str,
    destination: str,
    algorithm: str,
    block_size: str,
    vsize: str,
    no_sizes: bool,
    workdir: str | None,
    json_path: str | None,
    progress: bool | None,
) -> None:
    """Convert the OCI or Docker image SOURCE into an OverlayBD image at DESTINATION.

    SOURCE and DESTINATION are registry references (host[:port]/name:tag; plain HTTP for
    loopback) or OCI layout directories (oci:DIR[:TAG]). Each layer becomes an ext4 change
    on a writable LSMT layer, committed as ZFile in OverlayBD's tar wrapping; the same
    source always gives the same layer digests. Prints the per-layer size table. Needs root.
    """
    from workbench.convert import convert_image

    report = convert_image(
        source,
        destination,
        algorithm=algorithm,
        block_size=parse_size(block_size),
        vsize=parse_size(vsize),
        sizes=not no_sizes,
        workdir=workdir,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    click.echo(report.table())
    click.echo(
        f"{destination}: manifest {report.manifest_digest}, {len(report.layers)} layers, "
        f"{report.seconds:.1f} s ({report.tar_bytes / (1 << 20) / report.seconds:.1f} MB/s of tar)"
    )
    if json_path:
        with open(json_path, "w") as out:
            json.dump(report.to_dict(), out, indent=2)


@click.command("verify")
@click.argument("source")
@click.argument("converted")
@click.option("--limit", default=50, show_default=True, help="Differences printed at most.")
def verify(source: str, converted: str, limit: int) -> None:
    """Compare the converted image CONVERTED with its source SOURCE, path by path.

    Extracts SOURCE with OCI semantics, mounts CONVERTED (lazily from its registry, or from
    an oci: layout) and compares every path's type, mode, owner, size, content hash, link
    target, device numbers, xattrs, mtime and hard links. Exits 1 on any difference.
    """
    from workbench.convert import verify_image

    report = verify_image(source, converted)
    for difference in report.differences[:limit]:
        click.echo(str(difference))
    if len(report.differences) > limit:
        click.echo(f"... and {len(report.differences) - limit} more")
    if not report.ok:
        raise click.ClickException(
            f"{converted} differs from {source} in {len(report.differences)} places "
            f"({report.paths} paths compared)"
        )
    click.echo(f"{converted} matches {source}: {report.paths} paths compared, no differences")
