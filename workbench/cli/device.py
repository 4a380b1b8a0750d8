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
@_RUN_DIR
def mount(
    image: str,
    mountpoint: Path,
    writable_dir: Path | None,
    trace: Path | None,
    run_dir: Path | None,
) -> None:
    """Mount the ext4 file system of IMAGE at MOUNTPOINT.

    IMAGE is a config.v1.json or the reference of an OverlayBD image in a registry
    (127.0.0.1:5000/library/app:v1), whose layers are then read lazily through the block
    cache ($WORKBENCH_CACHE_DIR).
    """
    made = mount_image(image, mountpoint, writable_dir, run_dir=run_dir, trace=trace)
    mode = "read-only" if made.read_only else f"writable layer in {made.writable_dir}"
    click.echo(f"mounted {image} at {made.mountpoint} ({made.loop}, {mode}, id {made.id})")


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
