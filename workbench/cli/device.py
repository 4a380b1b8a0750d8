"""`workbench mount IMAGE MOUNTPOINT [--writable DIR]` and `workbench umount MOUNTPOINT|--all`.

`mount` starts a FUSE server for the image (a child process that outlives the command),
attaches a loop device to its disk file and mounts ext4 on it; `umount` undoes all of it.
See `workbench.device.mount` for the pieces and the state kept under ``$WORKBENCH_RUN_DIR``
(default ``/run/workbench``). Both need root (loop devices and mounts).

Caveats:
- IMAGE is a config.v1.json path; a registry reference is resolved by the registry commands
  into such a config first.
"""

from __future__ import annotations

from pathlib import Path

import click

from workbench.device.mount import mount_image, unmount, unmount_all

__all__ = ["mount", "umount"]

_RUN_DIR = click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where mount state is kept (default: $WORKBENCH_RUN_DIR or /run/workbench).",
)


@click.command("mount")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
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
    image: Path,
    mountpoint: Path,
    writable_dir: Path | None,
    trace: Path | None,
    run_dir: Path | None,
) -> None:
    """Mount the ext4 file system of IMAGE (a config.v1.json) at MOUNTPOINT."""
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
