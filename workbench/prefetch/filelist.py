"""The priority-list mode: a list of paths, resolved to the disk ranges that hold their data.

A priority list is a text file of at most `MAX_LIST_BYTES` (64 KiB, OverlayBD's limit), one
absolute path of the image's file system a line; a path ending in ``/`` or ``*`` stands for
every file below that directory. `resolve_extents` asks the mounted ext4 where each file's
data lies (the FIEMAP ioctl, what ``filefrag`` prints) and returns disk byte ranges: the
file system sits on the loop device from offset 0, so a physical offset is an offset of the
image's virtual disk. The FUSE server then prefetches those ranges (`range_jobs`).

Caveats:
- paths are resolved when the image is mounted, so the list costs the metadata reads of
  the lookups (which the application would make anyway);
- inline data (tiny files kept in the inode) and unwritten extents are skipped: there is
  nothing to prefetch for them besides the inode table, read by the lookup;
- missing paths are logged and skipped, as OverlayBD does.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from workbench.errors import ImageConfigError

__all__ = ["MAX_LIST_BYTES", "file_extents", "read_list", "resolve_extents"]

log = logging.getLogger(__name__)

MAX_LIST_BYTES = 64 << 10

_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP = struct.Struct("=QQIIII")  # fm_start, fm_length, flags, mapped, extent_count, reserved
_EXTENT = struct.Struct("=QQQ16xI12x")  # fe_logical, fe_physical, fe_length, fe_flags
_FLAG_SYNC = 0x1
_EXTENT_LAST = 0x1
_EXTENT_SKIP = 0x2 | 0x4 | 0x8 | 0x200 | 0x800  # unknown, delalloc, encoded, inline, unwritten
_BATCH = 128


def read_list(path: str | os.PathLike[str]) -> list[str]:
    """The paths of a priority list (blank lines and ``#`` comments skipped)."""
    data = Path(path).read_bytes()
    if len(data) > MAX_LIST_BYTES:
        raise ImageConfigError(
            f"{path}: a priority list of {len(data)} bytes; at most {MAX_LIST_BYTES} (OverlayBD's "
            "limit): list directories with a trailing / instead of every file"
        )
    paths = []
    for line in data.decode(errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("/"):
            raise ImageConfigError(
                f"{path}: {line!r} is not an absolute path; a priority list holds paths of the "
                "image's file system, one a line, such as /usr/bin/python3"
            )
        paths.append(line)
    return paths


def file_extents(path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """(physical offset, length) in bytes of every data extent of one file (FIEMAP)."""
    extents: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        start = 0
        while True:
            request = bytearray(_FIEMAP.size + _EXTENT.size * _BATCH)
            _FIEMAP.pack_into(request, 0, start, (1 << 64) - 1 - start, _FLAG_SYNC, 0, _BATCH, 0)
            fcntl.ioctl(fd, _FS_IOC_FIEMAP, request)
            mapped = _FIEMAP.unpack_from(request)[3]
            last = False
            for number in range(mapped):
                logical, physical, length, flags = _EXTENT.unpack_from(
                    request, _FIEMAP.size + number * _EXTENT.size
                )
                if not flags & _EXTENT_SKIP and length:
                    extents.append((physical, length))
                start = logical + length
                last = bool(flags & _EXTENT_LAST)
            if mapped == 0 or last:
                return extents
    finally:
        os.close(fd)


def _files(root: Path, entry: str) -> Iterator[Path]:
    walk = entry.endswith(("/", "*"))
    target = root / entry.rstrip("/*").lstrip("/")
    if walk and target.is_dir():
        for folder, _dirs, names in os.walk(target):
            for name in sorted(names):
                path = Path(folder) / name
                if path.is_file() and not path.is_symlink():
                    yield path
    elif target.is_file():
        yield target
    else:
        log.warning("priority list: %s is not a file of the image; skipped", entry)


def resolve_extents(mountpoint: str | os.PathLike[str], paths: list[str]) -> list[tuple[int, int]]:
    """The disk ranges holding the data of `paths` (in list order, adjacent ones joined)."""
    ranges: list[tuple[int, int]] = []
    for entry in paths:
        for path in _files(Path(mountpoint), entry):
            for offset, length in file_extents(path):
                if ranges and ranges[-1][0] + ranges[-1][1] == offset:
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
                else:
                    ranges.append((offset, length))
    return ranges
