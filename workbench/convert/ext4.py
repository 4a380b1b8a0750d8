"""The ext4 of a converted image: OverlayBD's mkfs options, made reproducible, and the
normalisation of what the kernel stamps on it while a layer is applied.

`mkfs_arguments(seed)` are OverlayBD's options for the bottom writable layer
(overlaybd-formats.md section 4.4: ``-O ^has_journal,sparse_super,flex_bg -G 1 -E discard``)
plus what makes mkfs deterministic: the file system UUID (``-U``) and the directory hash seed
(``-E hash_seed=``) derived from `seed` (the image's first diff_id), the root owned by 0:0,
and ``E2FSPROGS_FAKE_TIME``/``E2FSCK_TIME`` (`mkfs_environment`) for every time e2fsprogs
writes.

`MOUNT_OPTIONS` are those of the mount a layer is applied on: ``noatime`` (reads do not
stamp atimes), ``noinit_itable`` (no background zeroing of inode tables, whose progress
would depend on timing), ``no_prefetch_block_bitmaps`` (mballoc skips groups whose bitmaps
an asynchronous prefetch has not loaded yet, so what it picks would depend on I/O timing) and
``mb_optimize_scan=0`` (groups are scanned in order). Delayed allocation stays on: without
it ext4 offsets each file's goal block by the writer's pid modulo 16
(``ext4_inode_to_goal_block``); with it the applier starts each file's writeback itself, so
blocks are allocated in its order on its CPU.

`normalize(device, report)` runs one ``debugfs -w -f SCRIPT`` on the unmounted device that:
- sets ctime and crtime of every inode the layer changed to its mtime (nanoseconds
  included), its generation to 0 (the kernel draws a random one per new inode) and its
  i_version change counter to 0 (it counts changes only while someone queries it);
- sets every time of every inode the layer freed to `FIXED_TIME` and its generation and
  version to 0 (the layer's trash folder is born and freed in the same layer);
- sets the superblock's mount and write times, last check to `FIXED_TIME`, the mount count
  and lifetime kilobytes written to 0 and the last mount point to "" (the kernel records
  all of them).
debugfs recomputes the checksums of what it writes, but not those seeded with an inode's
generation (directory blocks, extent tree blocks): ``e2fsck -fy`` then rewrites them, and
checks the whole file system on the way (it stops the conversion on an error it cannot fix,
and logs a warning for any fix that is not a checksum).

Caveats:
- mkfs reads ``/etc/mke2fs.conf``: the same source gives the same layers only with the same
  e2fsprogs version and configuration (Debian 12's 1.47.0 here);
- inode numbers of removed hard-link partners that survive elsewhere get their ctime from
  the mtime they had when removed;
- a negative mtime (before 1970) is stored as the applier set it, and its ctime is clamped
  to 0.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import subprocess
import tempfile
import time
import uuid
from typing import Final

from workbench.convert.apply import FIXED_TIME, ApplyReport
from workbench.errors import WorkbenchError

__all__ = ["MKFS_OPTIONS", "MOUNT_OPTIONS", "mkfs_arguments", "mkfs_environment", "normalize"]

log = logging.getLogger(__name__)

MKFS_OPTIONS: Final = ("-O", "^has_journal,sparse_super,flex_bg", "-G", "1")
"""OverlayBD's ext4 options for the bottom layer (``-E discard`` is added with the seeds)."""

IN_USE_RETRIES: Final = 300
"""Attempts (0.1 s apart, 30 s in all) while e2fsck finds the device still held after the
unmount."""

MOUNT_OPTIONS: Final = "noatime,noinit_itable,no_prefetch_block_bitmaps,mb_optimize_scan=0"
"""Mount options while a layer is applied (see the module docstring)."""


def _seeded_uuid(seed: str, purpose: str) -> str:
    digest = hashlib.sha256(f"{purpose}\0{seed}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def mkfs_arguments(seed: str) -> list[str]:
    """mkfs.ext4 arguments (before the device) of the bottom layer of an image from `seed`."""
    extended = f"discard,hash_seed={_seeded_uuid(seed, 'hash seed')},root_owner=0:0"
    return [*MKFS_OPTIONS, "-E", extended, "-U", _seeded_uuid(seed, "uuid")]


def mkfs_environment() -> dict[str, str]:
    return {"E2FSPROGS_FAKE_TIME": str(FIXED_TIME), "E2FSCK_TIME": str(FIXED_TIME)}


def _time_commands(ino: int, field: str, ns: int) -> list[str]:
    seconds, nanoseconds = divmod(max(ns, 0), 10**9)
    # The extra field holds nanoseconds << 2 and two epoch bits for times past 2038.
    epoch = ((seconds - ((seconds + 2**31) % 2**32 - 2**31)) >> 32) & 3
    return [
        f"sif <{ino}> {field} @{seconds}",
        f"sif <{ino}> {field}_extra {(nanoseconds << 2) | epoch}",
    ]


def normalize_script(report: ApplyReport) -> str:
    """The debugfs commands that `normalize` runs for `report`."""
    commands: list[str] = []
    for ino, mtime in sorted(report.changed.items()):
        commands += _time_commands(ino, "ctime", mtime)
        commands += _time_commands(ino, "crtime", mtime)
        commands += [f"sif <{ino}> generation 0", f"sif <{ino}> version 0"]
    fixed = FIXED_TIME * 10**9
    for ino in report.freed:
        commands.append(f"sif <{ino}> dtime @{FIXED_TIME}")
        for field in ("atime", "ctime", "mtime", "crtime"):
            commands += _time_commands(ino, field, fixed)
        commands += [f"sif <{ino}> generation 0", f"sif <{ino}> version 0"]
    for field in ("mtime", "wtime", "lastcheck"):
        commands.append(f"ssv {field} @{FIXED_TIME}")
    commands += ["ssv mnt_count 0", "ssv kbytes_written 0", 'ssv last_mounted ""']
    return "\n".join(commands) + "\n"


def normalize(device: str, report: ApplyReport) -> None:
    """Run `normalize_script(report)` on the unmounted ext4 on `device` (debugfs -w)."""
    _wait_released(device)
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs", delete=False) as script:
        script.write(normalize_script(report))
    try:
        env = {**os.environ, **mkfs_environment()}
        done = subprocess.run(
            ["debugfs", "-w", "-f", script.name, device], capture_output=True, text=True, env=env
        )
    finally:
        os.unlink(script.name)
    problems = [
        line
        for line in done.stderr.splitlines()
        if line.strip() and not line.startswith("debugfs ")
    ]
    if done.returncode != 0 or problems:
        raise WorkbenchError(
            f"debugfs could not normalise the ext4 on {device} (exit {done.returncode}): "
            f"{' | '.join(problems[:5]) or done.stderr.strip()}"
        )
    _check_and_fix(device)
    log.debug(
        "normalised %d changed and %d freed inodes on %s",
        len(report.changed),
        len(report.freed),
        device,
    )


def _wait_released(device: str) -> None:
    """Wait until no file system holds `device` (an exclusive open succeeds).

    `umount` can return while the kernel still has the ext4 superblock (its last write, the
    free counts and times, still to come); debugfs must not run before it is gone, or the
    kernel's write lands over the normalised fields.
    """
    for _ in range(IN_USE_RETRIES):
        try:
            fd = os.open(device, os.O_RDONLY | os.O_EXCL)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            time.sleep(0.1)
            continue
        os.close(fd)
        return
    raise WorkbenchError(
        f"{device} is still held {IN_USE_RETRIES / 10:.0f} s after its ext4 was unmounted "
        "(a copy of the mount in another mount namespace?); the layer cannot be normalised"
    )


def _check_and_fix(device: str) -> None:
    """``e2fsck -fy``: rewrite the checksums a new generation invalidates, check the rest."""
    env = {**os.environ, **mkfs_environment()}
    for _ in range(IN_USE_RETRIES):
        done = subprocess.run(["e2fsck", "-fy", device], capture_output=True, text=True, env=env)
        # Right after umount the device can still be held for a moment (exclusive open).
        if "is in use" not in done.stdout + done.stderr:
            break
        time.sleep(0.1)
    if done.returncode not in (0, 1):
        raise WorkbenchError(
            f"e2fsck found errors it could not fix on {device} (exit {done.returncode}): "
            f"{done.stdout.strip()[-1500:]}"
        )
    fixes = [
        block.strip().replace("\n", " ")
        for block in done.stdout.split("Fix? yes")[:-1]
        if "checksum" not in block.rsplit("\n\n", 1)[-1] and "in the future" not in block
    ]
    for fix in fixes:
        log.warning("e2fsck fixed more than a checksum on %s: %s", device, fix[-300:])
