"""`workbench mount IMAGE MOUNTPOINT`, `workbench umount`, `workbench commit MOUNTPOINT OUT`.

`mount` starts a FUSE server for the image (a child process that outlives the command),
attaches a loop device to its disk file and mounts ext4 on it; `umount` undoes all of it;
`commit` turns the writable layer of a mount into a read-only layer file while it stays
mounted (`workbench.device.commit`).
See `workbench.device.mount` for the pieces and the state kept under ``$WORKBENCH_RUN_DIR``
(default ``/run/workbench``). Both need root (loop devices and mounts).

Caveats:
- a registry reference must name its registry host (``host[:port]/name[:tag]``); Docker
  Hub's short names are not expanded.
"""

from __future__ import annotations

from pathlib import Path

import click

from workbench.cli.lsmt import output_options
from workbench.device.mount import mount_image, unmount, unmount_all

__all__ = ["commit", "mount", "umount"]

_RUN_DIR = click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where mount state is kept (default: $WORKBENCH_RUN_DIR or /run/workbench).",
)


@click.command("mount")
@click.argument("image")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--writable",
    "writable_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of the writable layer (created there if empty); without it: read-only.",
)
@click.option(
    "--trace",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Record every event of the mount; written to this Parquet file at umount.",
)
@click.option(
    "--record-trace",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Record the block accesses to this trace file (OverlayBD's format), written at umount.",
)
@click.option(
    "--replay-trace",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Prefetch the reads of this trace file into the cache at mount.",
)
@click.option(
    "--prefetch-list",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Prefetch the data of the paths listed in this file (one absolute path a line).",
)
@click.option(
    "--prefetch-trace",
    type=click.Path(dir_okay=False, path_type=Path),
    help="As ACI's record-trace label: record if the file is absent or empty, else replay it.",
)
@click.option(
    "--prefetch-concurrency",
    type=int,
    default=16,
    show_default=True,
    help="Prefetch reads at once.",
)
@click.option("--metrics", help="Serve Prometheus metrics on [HOST:]PORT (0: any free port).")
@click.option("--hang-threshold", type=float, help="Seconds before a request counts as hung.")
@_RUN_DIR
def mount(
    image: str,
    mountpoint: Path,
    writable_dir: Path | None,
    trace: Path | None,
    record_trace: Path | None,
    replay_trace: Path | None,
    prefetch_list: Path | None,
    prefetch_trace: Path | None,
    prefetch_concurrency: int,
    metrics: str | None,
    hang_threshold: float | None,
    run_dir: Path | None,
) -> None:
    """Mount the ext4 file system of IMAGE at MOUNTPOINT.

    IMAGE is a config.v1.json or the reference of an OverlayBD image in a registry
    (127.0.0.1:5000/library/app:v1), whose layers are then read lazily through the block
    cache ($WORKBENCH_CACHE_DIR). An image with an acceleration layer replays its trace.
    """
    from workbench.prefetch import PrefetchConfig

    chosen = [
        PrefetchConfig(str(path.absolute()), mode, prefetch_concurrency)
        for path, mode in (
            (record_trace, "record"),
            (replay_trace, "replay"),
            (prefetch_list, "list"),
            (prefetch_trace, "auto"),
        )
        if path is not None
    ]
    if len(chosen) > 1:
        raise click.UsageError(
            "give one of --record-trace, --replay-trace, --prefetch-list, --prefetch-trace"
        )
    made = mount_image(
        image,
        mountpoint,
        writable_dir,
        run_dir=run_dir,
        trace=trace,
        prefetch=chosen[0] if chosen else None,
        metrics=metrics,
        hang_threshold=hang_threshold,
    )
    mode = "read-only" if made.read_only else f"writable layer in {made.writable_dir}"
    click.echo(f"mounted {image} at {made.mountpoint} ({made.loop}, {mode}, id {made.id})")
    if made.prefetch is not None:
        click.echo(f"prefetch: {made.prefetch['mode']} {made.prefetch['trace']}")
    if made.metrics_port is not None:
        click.echo(f"metrics: http://127.0.0.1:{made.metrics_port}/metrics")


@click.command("umount")
@click.argument("mountpoint", required=False, type=click.Path(path_type=Path))
@click.option("--all", "everything", is_flag=True, help="Every workbench mount, and leftovers.")
@_RUN_DIR
def umount(mountpoint: Path | None, everything: bool, run_dir: Path | None) -> None:
    """Unmount MOUNTPOINT (ext4, loop device, FUSE, server), or with --all every one."""
    if everything == (mountpoint is not None):
        raise click.UsageError("give either MOUNTPOINT or --all")
    if everything:
        removed = unmount_all(run_dir)
        click.echo(f"removed {len(removed)} mount(s)")
    else:
        unmount(mountpoint, run_dir)  # type: ignore[arg-type]
        click.echo(f"unmounted {mountpoint}")


@click.command("commit")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@output_options
@_RUN_DIR
def commit(
    mountpoint: Path,
    out: Path,
    compress: bool,
    algorithm: str | None,
    block_size: int,
    tar: bool,
    uuid: str | None,
    parent_uuid: str | None,
    message: str,
    force: bool,
    run_dir: Path | None,
) -> None:
    """Commit the writable layer of the image mounted at MOUNTPOINT to a layer file OUT.

    The file system is frozen while the layer is written, so the new layer holds a
    consistent ext4; the mount stays as it is. The options are those of `lsmt commit`.
    """
    from workbench.device.commit import commit_mount

    if out.exists() and not force:
        raise click.ClickException(f"{out} exists; pass -f to overwrite it")
    trailer = commit_mount(
        mountpoint,
        out,
        run_dir=run_dir,
        uuid=uuid,
        parent_uuid=parent_uuid,
        message=message,
        compress=algorithm or ("lz4" if compress else None),
        block_size=block_size,
        tar=tar,
    )
    click.echo(
        f"committed the writable layer of {mountpoint} to {out} "
        f"({trailer.index_offset - 4096} bytes of data)"
    )
