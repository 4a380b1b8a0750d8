"""Committing a mounted image: its writable layer becomes a new read-only layer file.

This is how images are built on a block device: mount the base image with a writable layer,
change files in it, commit the writable layer as the next layer of the image. `commit_mount`
does it without unmounting:

    1. freeze the ext4 file system (``fsfreeze --freeze``): ext4 writes out every dirty
       block and its journal, and new writes wait, so the disk is consistent and stays so;
    2. fsync the FUSE disk file: the server makes the writable layer durable (data, then
       index; `BlockHandler.synchronize_cache`);
    3. commit the writable layer's files, opened read-only beside the server
       (`workbench.image.commit.commit_writable`), into the output file;
    4. thaw the file system, whatever happened in 3.

The writable layer is left as it is: the mount goes on with the same writes, and a later
commit contains them again. To stack the new layer, write a config whose lowers end with it.

Caveats:
- writers on the mount block from 1 to 4, so a long commit (a big layer, zstd) is a long
  pause for them;
- the commit reads the layer's files while the server holds them open; that is safe only
  because the file system is frozen and nothing else writes to the disk file (the loop
  device is the only writer the workbench makes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from workbench.device.mount import Mount, MountError, find_mount
from workbench.formats.lsmt import LsmtHeader

__all__ = ["commit_mount", "frozen"]

log = logging.getLogger(__name__)


def commit_mount(
    mountpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    run_dir: str | os.PathLike[str] | None = None,
    uuid: str | None = None,
    parent_uuid: str | None = None,
    message: str = "",
    compress: str | None = None,
    block_size: int = 4096,
    tar: bool = False,
) -> LsmtHeader:
    """Commit the writable layer of the image mounted at `mountpoint` to `out`.

    The options are those of `commit_writable` (uuid, parent uuid, message, ZFile
    compression and block size, tar wrapping). Returns the trailer of the new layer.
    Raises `MountError` for a folder that is not a writable workbench mount.
    """
    from workbench.image.commit import commit_writable
    from workbench.image.writable import WritableLayer

    mount = _writable_mount(mountpoint, run_dir)
    folder = Path(mount.writable_dir)  # type: ignore[arg-type]

    with frozen(mount.mountpoint):
        _fsync_disk(mount)
        with WritableLayer.open(folder / "data", folder / "index", readonly=True) as layer:
            trailer = commit_writable(
                layer,
                out,
                uuid=uuid,
                parent_uuid=parent_uuid,
                message=message,
                compress=compress,
                block_size=block_size,
                tar=tar,
            )
    log.info("committed the writable layer of %s to %s", mount.mountpoint, out)
    return trailer


def _writable_mount(mountpoint: str | os.PathLike[str], run_dir: object) -> Mount:
    mount = find_mount(mountpoint, run_dir)  # type: ignore[arg-type]
    if mount.read_only or mount.writable_dir is None:
        raise MountError(
            f"{mount.mountpoint} is a read-only mount: there is no writable layer to commit; "
            "mount the image with --writable DIR to make changes that can be committed"
        )
    if not mount.complete:
        raise MountError(f"{mount.mountpoint} is still being mounted (or a failed mount)")
    return mount


@contextlib.contextmanager
def frozen(mountpoint: str) -> Iterator[None]:
    """Freeze the file system at `mountpoint` for the block; thawed again on every exit."""
    _fsfreeze("--freeze", mountpoint)
    try:
        yield
    finally:
        _fsfreeze("--unfreeze", mountpoint)


def _fsfreeze(action: str, mountpoint: str) -> None:
    done = subprocess.run(["fsfreeze", action, mountpoint], capture_output=True, text=True)
    if done.returncode != 0:
        raise MountError(f"fsfreeze {action} {mountpoint} failed: {done.stderr.strip()}")


def _fsync_disk(mount: Mount) -> None:
    # Opening the disk read-only is enough for fsync, and cannot race with the loop device.
    fd = os.open(mount.disk, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
