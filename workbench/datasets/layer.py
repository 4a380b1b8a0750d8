"""A layer's directory tree made reproducible, then written as an OCI layer (tar+gzip).

A layer is built as the upper directory of an overlay mount (workbench.datasets.engine): new
and changed files are there as they are, a deletion is an overlayfs whiteout (a character
device 0:0) and a replaced directory is opaque (xattr ``trusted.overlay.opaque = y``).
`finalize` makes that tree the same on every build, then `write_layer` writes it as OCI:

    finalize(upper, epoch)                     # scrub, fix .pyc headers, clamp mtimes
    blob = write_layer(upper, blobs_dir, epoch)  # LayerBlob(digest, diff_id, size, ...)

`finalize`, in this order:
1. scrub what differs from build to build and belongs to no image: logs of dpkg, apt and
   debootstrap, apt's package lists and caches, ldconfig's aux-cache, debconf and dpkg
   ``*-old`` backups; other files under /var/log, /etc/hostname and /etc/resolv.conf (copied
   from the host) are emptied;
   the last-change day in /etc/shadow is set to the epoch's day;
2. fix the .pyc pitfall (shared/specs/runtime-notes.md section 2): a timestamp-based .pyc
   whose header matches its source's mtime gets the clamped mtime written into its header,
   so that it still matches once the source's mtime is clamped and imports do not recompile;
3. clamp: every mtime later than `epoch` becomes `epoch`, sub-second parts are dropped.

`write_layer` writes entries sorted by name (a directory before what it holds), with numeric
owners only (no user or group names), the clamped mtimes, the file mode, xattrs as PAX
``SCHILY.xattr.*`` records (overlayfs' own trusted.overlay.* left out), hard links within
the layer as link entries to the first name, whiteouts as ``.wh.NAME`` and opaque
directories as ``.wh..wh..opq``; gzip with mtime 0 and no file name. The same tree gives the
same bytes, hence the same digests.

Caveats:
- sockets cannot be stored in a tar; they are skipped with a warning;
- a .pyc whose source lives in a lower layer is left as it is (that source's mtime is final);
- gzip output depends on the zlib version; the tar (diff_id) does not.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import stat
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["LayerBlob", "finalize", "write_layer"]

log = logging.getLogger(__name__)

GZIP_LEVEL = 6
"""zlib level of the layer blobs (what Go's gzip.DefaultCompression gives, as docker does)."""

_SCRUB_FILES = (
    "var/log/dpkg.log",
    "var/log/alternatives.log",
    "var/log/bootstrap.log",
    "var/log/apt/history.log",
    "var/log/apt/term.log",
    "var/log/apt/eipp.log.xz",
    "var/cache/ldconfig/aux-cache",
    "var/cache/apt/pkgcache.bin",
    "var/cache/apt/srcpkgcache.bin",
)
_SCRUB_GLOBS = (
    "var/cache/apt/archives/*.deb",
    "var/cache/apt/archives/partial/*",
    "var/lib/apt/lists/*_*",
    "var/lib/apt/lists/partial/*",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/cache/man/**/*",
)
_EMPTY_FILES = ("etc/hostname", "etc/resolv.conf")
_SHADOW_FILES = ("etc/shadow", "etc/shadow-")
_OPAQUE_XATTR = "trusted.overlay.opaque"
_PYC_HEADER = 16


@dataclass(frozen=True)
class LayerBlob:
    """A written layer: blob digest and size (gzip), diff_id and size of the tar, entries."""

    digest: str
    size: int
    diff_id: str
    tar_size: int
    entries: int
    path: Path


# Making the tree reproducible


def finalize(upper: Path, epoch: int) -> None:
    """Scrub, fix .pyc headers and clamp mtimes of the layer tree `upper`, in place."""
    _scrub(upper, epoch)
    fixed = _fix_pyc(upper, epoch)
    clamped = _clamp(upper, epoch)
    log.debug("finalized %s: %d .pyc headers fixed, %d mtimes clamped", upper, fixed, clamped)


def _scrub(root: Path, epoch: int) -> None:
    for name in _SCRUB_FILES:
        _remove(root / name)
    for pattern in _SCRUB_GLOBS:
        for path in sorted(root.glob(pattern), reverse=True):
            if path.is_file() or path.is_symlink():
                _remove(path)
    # Whatever else a postinst logged (timestamps): kept as an empty file, owner and mode kept.
    for path in sorted((root / "var" / "log").rglob("*")):
        if path.is_file() and not path.is_symlink() and path.stat().st_size:
            path.write_bytes(b"")
    for name in _EMPTY_FILES:
        path = root / name
        if path.is_file() and not path.is_symlink() and path.stat().st_size:
            path.write_bytes(b"")
    day = str(epoch // 86400)
    for name in _SHADOW_FILES:
        path = root / name
        if path.is_file() and not path.is_symlink():
            _set_shadow_day(path, day)


def _remove(path: Path) -> None:
    try:
        if stat.S_ISCHR(path.lstat().st_mode):
            return  # a whiteout: the deletion itself is part of the layer
        path.unlink()
    except FileNotFoundError:
        pass


def _set_shadow_day(path: Path, day: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    out = []
    for line in lines:
        fields = line.rstrip("\n").split(":")
        if len(fields) >= 3 and fields[2]:
            fields[2] = day
        out.append(":".join(fields) + ("\n" if line.endswith("\n") else ""))
    text = "".join(out)
    if text != "".join(lines):
        info = path.stat()
        path.write_text(text)
        os.chmod(path, stat.S_IMODE(info.st_mode))


def _fix_pyc(upper: Path, epoch: int) -> int:
    """Rewrite the source mtime in .pyc headers whose source in `upper` gets clamped."""
    fixed = 0
    for pyc in upper.rglob("__pycache__/*.pyc"):
        if not pyc.is_file() or pyc.is_symlink():
            continue
        source = pyc.parent.parent / (pyc.name.split(".", 1)[0] + ".py")
        try:
            source_mtime = int(source.lstat().st_mtime)
        except FileNotFoundError:
            continue  # source in a lower layer (final already) or none at all
        with pyc.open("r+b") as file:
            header = file.read(_PYC_HEADER)
            if len(header) < _PYC_HEADER or int.from_bytes(header[4:8], "little") != 0:
                continue  # not a timestamp-based .pyc
            recorded = int.from_bytes(header[8:12], "little")
            clamped = min(source_mtime, epoch)
            if recorded != source_mtime & 0xFFFFFFFF or clamped == source_mtime:
                continue
            file.seek(8)
            file.write((clamped & 0xFFFFFFFF).to_bytes(4, "little"))
            fixed += 1
    return fixed


def _clamp(root: Path, epoch: int) -> int:
    """Set mtime (and atime) to min(int(mtime), epoch) everywhere, children before parents."""
    clamped = 0
    paths = (
        os.path.join(dirpath, name)
        for dirpath, dirnames, filenames in os.walk(root, topdown=False)
        for name in (*filenames, *dirnames)
    )
    for path in (*paths, str(root)):
        info = os.lstat(path)
        wanted = min(int(info.st_mtime), epoch)
        if info.st_mtime_ns != wanted * 1_000_000_000:
            ns = wanted * 1_000_000_000
            os.utime(path, ns=(ns, ns), follow_symlinks=False)
            clamped += 1
    return clamped


# Writing the tar


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner = inner
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.inner.write(data)

    def flush(self) -> None:
        self.inner.flush()


def write_layer(upper: Path, blobs_dir: Path, epoch: int, progress: bool = False) -> LayerBlob:
    """Write `upper` as a gzip layer blob into `blobs_dir` (named by digest); returns it."""
    blobs_dir.mkdir(parents=True, exist_ok=True)
    tmp = blobs_dir / f".layer-{os.getpid()}.tmp"
    entries = 0
    try:
        with tmp.open("wb") as out:
            compressed = _HashingWriter(out)
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=compressed, compresslevel=GZIP_LEVEL, mtime=0
            ) as gz:
                plain = _HashingWriter(gz)  # type: ignore[arg-type]
                with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    for info, path in _entries(upper, epoch):
                        if info.isreg() and info.size > 0:
                            with open(path, "rb") as file:
                                tar.addfile(info, file)
                        else:
                            tar.addfile(info)
                        entries += 1
                        if progress and entries % 5000 == 0:
                            print(f"  {entries} entries", file=sys.stderr)
            os.fsync(out.fileno())
        digest = "sha256:" + compressed.hash.hexdigest()
        final = blobs_dir / compressed.hash.hexdigest()
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return LayerBlob(
        digest=digest,
        size=compressed.size,
        diff_id="sha256:" + plain.hash.hexdigest(),
        tar_size=plain.size,
        entries=entries,
        path=final,
    )


def _entries(root: Path, epoch: int) -> Iterator[tuple[tarfile.TarInfo, str]]:
    """Tar headers of the tree under `root`, sorted, a directory before its content."""
    links: dict[tuple[int, int], str] = {}
    yield from _walk(str(root), "", epoch, links)


def _walk(
    root: str, prefix: str, epoch: int, links: dict[tuple[int, int], str]
) -> Iterator[tuple[tarfile.TarInfo, str]]:
    directory = os.path.join(root, prefix) if prefix else root
    listing = [(name, os.lstat(os.path.join(directory, name))) for name in os.listdir(directory)]
    # Sorted by the name in the tar (a whiteout is stored as .wh.NAME).
    listing.sort(key=lambda item: os.fsencode(_is_whiteout(item[1]) * ".wh." + item[0]))
    for name, info in listing:
        relative = f"{prefix}{name}"
        path = os.path.join(root, relative)
        mode = info.st_mode

        if _is_whiteout(info):
            yield _whiteout(f"{prefix}.wh.{name}", epoch), path
            continue
        if stat.S_ISSOCK(mode):
            log.warning("%s: a socket cannot be stored in a layer; skipped", path)
            continue

        entry = _header(relative, path, info, epoch)
        if stat.S_ISREG(mode) and info.st_nlink > 1:
            key = (info.st_dev, info.st_ino)
            if key in links:
                entry.type = tarfile.LNKTYPE
                entry.linkname = links[key]
                entry.size = 0
            else:
                links[key] = relative
        yield entry, path

        if stat.S_ISDIR(mode):
            if _xattr(path, _OPAQUE_XATTR) == b"y":
                yield _whiteout(f"{relative}/.wh..wh..opq", epoch), path
            yield from _walk(root, f"{relative}/", epoch, links)


def _header(name: str, path: str, info: os.stat_result, epoch: int) -> tarfile.TarInfo:
    entry = tarfile.TarInfo(name)
    entry.mode = stat.S_IMODE(info.st_mode)
    entry.uid, entry.gid = info.st_uid, info.st_gid
    entry.uname = entry.gname = ""
    entry.mtime = min(int(info.st_mtime), epoch)
    mode = info.st_mode
    if stat.S_ISREG(mode):
        entry.type, entry.size = tarfile.REGTYPE, info.st_size
    elif stat.S_ISDIR(mode):
        entry.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(mode):
        entry.type, entry.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        entry.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        entry.devmajor, entry.devminor = os.major(info.st_rdev), os.minor(info.st_rdev)
    elif stat.S_ISFIFO(mode):
        entry.type = tarfile.FIFOTYPE
    records = {}
    for key in sorted(os.listxattr(path, follow_symlinks=False)):
        if key.startswith("trusted.overlay."):
            continue
        value = os.getxattr(path, key, follow_symlinks=False)
        records[f"SCHILY.xattr.{key}"] = value.decode("utf-8", "surrogateescape")
    if records:
        entry.pax_headers = records
    return entry


def _is_whiteout(info: os.stat_result) -> bool:
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == 0


def _whiteout(name: str, epoch: int) -> tarfile.TarInfo:
    entry = tarfile.TarInfo(name)
    entry.type, entry.mode, entry.mtime = tarfile.REGTYPE, 0o644, epoch
    entry.uname = entry.gname = ""
    return entry


def _xattr(path: str, key: str) -> bytes | None:
    try:
        return os.getxattr(path, key, follow_symlinks=False)
    except OSError:
        return None
