"""Applying an OCI layer tar to a root directory with OCI semantics, inside a chroot.

`apply_layer(blob, root)` runs ``python -m workbench.convert.apply`` as a child process that
opens the blob, then ``chroot(root)``: every path it touches, a symlink's target included,
resolves inside `root`, so no entry can write outside it. In the child, entries are applied
one by one in archive order, single-threaded (block allocation follows the order of writes,
so a fixed order gives a fixed layout), optionally pinned to one CPU (ext4's mballoc keeps
per-CPU locality groups). The rules (those of the OCI image spec's "Applying changesets",
as containerd applies them):

- names are cleaned lexically (``./``, ``//``, ``a/..``); a name or hard link target whose
  ``..`` climbs above the root is refused (`LayerError`), not clamped;
- ``DIR/.wh.NAME`` removes NAME (recursively) from what is there; ``DIR/.wh..wh..opq`` removes
  everything under DIR that this layer has not itself written (the opaque marker);
- a missing parent directory is created (0755, root, time `FIXED_TIME`); an existing entry is
  replaced unless both are directories (then only the metadata changes);
- regular files (all-zero 1 MiB chunks are left as holes, so sparse files stay sparse),
  each pushed to writeback as soon as it is written (`_start_writeback`),
  directories, symlinks (targets stored as given), hard links (to the link target's inode,
  not following a symlink), character and block devices, FIFOs;
- numeric owner, mode (setuid/setgid/sticky included, set after chown), xattrs from PAX
  ``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*`` records (after chown, which clears file
  capabilities), atime and mtime with nanoseconds from PAX records; directory times are set
  last, after everything inside them;
- a directory this layer changes (an entry added or removed) without naming it keeps the
  times it had, so that a layer's result does not depend on when it was applied;
- what a whiteout or a replacement removes is moved into a trash folder at the root and
  deleted once the layer is applied, so that no inode or block is freed (and handed out
  again, depending on the clock) while the layer allocates.

Layer blobs may be plain tar, gzip or zstd (detected by magic, checked against the media type
by the caller, `open_layer`). The child hashes the uncompressed stream: the report carries its
sha256 (the diff_id) and size, and bytes after the end-of-archive marker must be zeros (a
corrupt header otherwise silently ends a tar). It also reports which inodes it changed, with
the mtime each should get as ctime (the kernel sets ctime to "now"), and which it freed, for
`workbench.convert.normalize`.

Caveats:
- entries are refused, not clamped, when ``..`` escapes: a hostile layer fails the
  conversion instead of being rewritten;
- xattrs that the file system refuses (``user.*`` on a symlink, unknown namespaces) are
  skipped with one warning per name; SELinux labels are written as given;
- a parent path traversing a symlink is followed (inside the chroot), as the kernel would;
  the opaque marker then matches this layer's entries by name, not by inode;
- the child needs root (chroot, mknod, chown).
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import dataclasses
import errno
import gzip
import hashlib
import io
import json
import logging
import os
import stat
import subprocess
import sys
import tarfile
import urllib.parse
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import IO, Any, Final

from workbench.errors import LayerError, UnsupportedFormatError

__all__ = [
    "FIXED_TIME",
    "ApplyReport",
    "apply_layer",
    "clean_name",
    "layer_compression",
    "open_layer",
]

log = logging.getLogger(__name__)

FIXED_TIME: Final = 1
"""Seconds since the epoch given to what no entry dates: implicit parent directories, the
file system's own times (mkfs, superblock), freed inodes. 0 would mean "now" to e2fsprogs."""

CHUNK: Final = 1 << 20
"""Bytes copied per read; an all-zero chunk becomes a hole."""

PROGRESS_EVERY: Final = 8 << 20
"""The child reports progress after this many uncompressed bytes."""

RECENT_BYTES: Final = 4 * CHUNK
"""Bytes of the uncompressed stream kept to check what follows the archive's end."""

_ZERO: Final = bytes(CHUNK)
_GZIP_MAGIC: Final = b"\x1f\x8b"
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
_WHITEOUT: Final = ".wh."
TRASH_NAME: Final = ".wh..wh.workbench-trash"
"""Where removed entries wait until the layer is applied; a whiteout name, so no layer can
have it."""
_OPAQUE: Final = ".wh..wh..opq"

GZIP_TYPES: Final = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
TAR_TYPES: Final = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.docker.image.rootfs.diff.tar",
    }
)
ZSTD_TYPES: Final = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    }
)


@dataclasses.dataclass
class ApplyReport:
    """What the child did: the uncompressed stream, the entries, the inodes it changed."""

    diff_id: str
    tar_size: int
    entries: int
    changed: dict[int, int]
    """inode -> the mtime (ns) it has now; its ctime and crtime are to be set to it."""
    freed: list[int]
    """Inodes the layer freed (their dtime, ctime and mtime are "now")."""
    skipped_xattrs: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> ApplyReport:
        document = dict(document)
        document["changed"] = {int(ino): int(ns) for ino, ns in document["changed"].items()}
        return cls(**document)


# ---------------------------------------------------------------------------------------------
# Names and media types


def clean_name(name: str, where: str = "entry") -> str:
    """`name` cleaned lexically, relative to the root ("" is the root itself).

    Raises `LayerError` when ``..`` climbs above the root.
    """
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise LayerError(
                    f"{where} {name!r} escapes the image root with '..'; the layer is hostile or "
                    "broken and is not applied (rebuild it without '..' in its paths)"
                )
            parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


def layer_compression(media_type: str, head: bytes, where: str) -> str:
    """``"gzip"``, ``"zstd"`` or ``"tar"`` for a layer of `media_type` starting with `head`.

    Raises `UnsupportedFormatError` for a media type that is not a layer tar, and
    `LayerError` when the bytes contradict a compressed media type.
    """
    if media_type and media_type not in GZIP_TYPES | TAR_TYPES | ZSTD_TYPES:
        known = ", ".join(sorted(GZIP_TYPES | TAR_TYPES | ZSTD_TYPES))
        raise UnsupportedFormatError(
            f"{where}: media type {media_type!r} is not a layer type the converter reads; "
            f"supported: {known}"
        )
    found = "gzip" if head.startswith(_GZIP_MAGIC) else "tar"
    found = "zstd" if head.startswith(_ZSTD_MAGIC) else found
    expected = "gzip" if media_type in GZIP_TYPES else "zstd" if media_type in ZSTD_TYPES else ""
    if expected and found != expected:
        raise LayerError(
            f"{where}: media type {media_type} says {expected}, but the blob does not start "
            f"with the {expected} magic (first bytes {head[:4].hex()}); the blob is corrupt or "
            "mislabelled"
        )
    return found


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, inner: IO[bytes], progress: Callable[[int], None] | None = None) -> None:
        self._inner = inner
        self.hasher = hashlib.sha256()
        self.count = 0
        self._progress = progress
        self._reported = 0
        self._recent: deque[tuple[int, bytes]] = deque()
        """The last bytes read, (offset, bytes), about `RECENT_BYTES` of them."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.hasher.update(data)
        self._recent.append((self.count, data))
        while self._recent and self._recent[0][0] + RECENT_BYTES < self.count:
            self._recent.popleft()
        self.count += n
        if self._progress is not None and self.count - self._reported >= PROGRESS_EVERY:
            self._reported = self.count
            self._progress(self.count)
        return n

    def recent_from(self, offset: int) -> bytes | None:
        """The bytes read from `offset` to now, None if they are no longer kept."""
        if offset >= self.count:
            return b""
        if not self._recent or self._recent[0][0] > offset:
            return None
        joined = b"".join(data for _, data in self._recent)
        return joined[offset - self._recent[0][0] :]


def open_layer(path: str | os.PathLike[str], compression: str) -> IO[bytes]:
    """The uncompressed tar stream of the layer blob at `path`."""
    raw = open(path, "rb")  # noqa: SIM115 - handed to the caller inside the stream
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return io.BufferedReader(reader)  # type: ignore[arg-type]
    return raw


# ---------------------------------------------------------------------------------------------
# Parent side


def apply_layer(
    blob: str | os.PathLike[str],
    root: str | os.PathLike[str],
    *,
    compression: str = "tar",
    cpu: int | None = None,
    where: str = "layer",
    progress: Callable[[int], None] | None = None,
) -> ApplyReport:
    """Apply the layer blob at `blob` to the tree at `root` in a chrooted child process.

    `compression` is what `layer_compression` said; `cpu` pins the child to that CPU;
    `progress` is called with the uncompressed bytes read so far. Raises `LayerError` (with
    `where` naming the layer) when the child refuses or fails.
    """
    command = [sys.executable, "-m", __name__, os.fspath(blob), os.fspath(root), compression]
    if cpu is not None:
        command += ["--cpu", str(cpu)]
    result: dict[str, Any] | None = None
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as child:
        assert child.stdout is not None and child.stderr is not None
        for line in child.stdout:
            message = json.loads(line)
            if "progress" in message and progress is not None:
                progress(message["progress"])
            result = message if "progress" not in message else result
        stderr = child.stderr.read().decode(errors="replace").strip()

    if result is None or (child.returncode != 0 and "error" not in result):
        raise LayerError(
            f"{where}: the applier exited with status {child.returncode} without a report: "
            f"{stderr[-2000:] or 'no output'}"
        )
    if "error" in result:
        raise LayerError(f"{where}: {result['error']}")
    for name in result.get("skipped_xattrs", []):
        log.warning("%s: xattr %s could not be set and was skipped", where, name)
    return ApplyReport.from_json(result)


# ---------------------------------------------------------------------------------------------
# Child side


@dataclasses.dataclass
class _Applier:
    """Applies members in order under the (chrooted) root ``/``."""

    written: set[str] = dataclasses.field(default_factory=set)
    """Paths this layer has written (absolute inside the root), for the opaque marker."""
    dir_times: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    """Directories named by the layer: their times, set once everything is in place."""
    kept_times: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    """Directories changed but not named: (inode, atime, mtime) to restore at the end."""
    touched: set[str] = dataclasses.field(default_factory=set)
    removed: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    """Inode -> (links left, mtime ns) of what removals took away."""
    skipped_xattrs: set[str] = dataclasses.field(default_factory=set)
    entries: int = 0
    trash: str | None = None
    trash_ino: int = 0
    trashed: int = 0

    def apply(self, tar: tarfile.TarFile) -> None:
        for member in tar:
            self.entries += 1
            try:
                self._apply_member(tar, member)
            except LayerError:
                raise
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise LayerError(
                        f"entry {member.name!r}: the image's disk is full; convert with a "
                        "larger virtual size (--vsize)"
                    ) from exc
                raise LayerError(f"entry {member.name!r} ({_kind(member)}): {exc}") from exc

    # Members

    def _apply_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = clean_name(member.name)
        path = "/" + name
        parent, base = os.path.split(path)

        if base.startswith(_WHITEOUT):
            if not self._is_dir(parent):
                return
            if base == _OPAQUE:
                self._opaque(parent)
            else:
                self._keep_times(parent)
                self._remove(os.path.join(parent, base[len(_WHITEOUT) :]))
            return

        if name:
            self._make_parents(parent)
            existing = _lstat(path)
            if existing is not None and not (stat.S_ISDIR(existing.st_mode) and member.isdir()):
                self._keep_times(parent)
                self._remove(path)
                existing = None
            if existing is None:
                self._keep_times(parent)
                self._create(tar, member, path)
        elif not member.isdir():
            raise LayerError(f"entry {member.name!r} names the root but is not a directory")

        if not member.islnk():
            self._set_metadata(member, path)
        self.written.add(path)
        self.touched.add(path)

    def _create(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> None:
        mode = member.mode & 0o7777
        if member.isreg():
            self._write_file(tar, member, path)
        elif member.isdir():
            os.mkdir(path, 0o700)
        elif member.issym():
            os.symlink(member.linkname, path)
        elif member.islnk():
            target = "/" + clean_name(member.linkname, "hard link target")
            if _lstat(target) is None:
                raise LayerError(
                    f"entry {member.name!r} is a hard link to {member.linkname!r}, which "
                    "neither this layer nor the ones below have"
                )
            os.link(target, path, follow_symlinks=False)
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(path, kind | mode, os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            os.mkfifo(path, mode)
        else:
            raise LayerError(f"entry {member.name!r} has tar type {member.type!r}, not supported")

    def _write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> None:
        source = tar.extractfile(member)
        assert source is not None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            raw = getattr(source, "raw", None)
            if member.sparse and raw is not None:
                # A sparse member: copy its data regions only, the holes stay holes (reading
                # them through tarfile would produce every zero byte of them).
                for offset, length in member.sparse:
                    raw.seek(offset)
                    _copy(raw, fd, offset, length, member)
            else:
                _copy(source, fd, 0, member.size, member)
            os.ftruncate(fd, member.size)
            _start_writeback(fd)
        finally:
            os.close(fd)

    def _set_metadata(self, member: tarfile.TarInfo, path: str) -> None:
        os.chown(path, member.uid, member.gid, follow_symlinks=False)
        if not member.issym():
            os.chmod(path, member.mode & 0o7777)
        for name, value in _xattrs(member):
            try:
                os.setxattr(path, name, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                self.skipped_xattrs.add(name)
        times = _times(member)
        if member.isdir():
            self.dir_times[path] = times
            self.kept_times.pop(path, None)
        else:
            os.utime(path, ns=times, follow_symlinks=False)

    # Directories

    def _make_parents(self, parent: str) -> None:
        if self._is_dir(parent):
            return
        # A symlink on the way (dangling, or through one) is followed inside the root, and
        # the directories it names are made, as containerd resolves paths in the root.
        real = os.path.realpath(parent)
        if real != parent:
            self._make_parents(real)
            return
        if _lstat(parent) is not None:
            raise LayerError(f"{parent} is needed as a directory, but the image has a file there")
        grand = os.path.dirname(parent)
        self._make_parents(grand)
        self._keep_times(grand)
        os.mkdir(parent, 0o755)
        os.utime(parent, ns=(FIXED_TIME * 10**9, FIXED_TIME * 10**9), follow_symlinks=False)
        self.kept_times[parent] = (os.lstat(parent).st_ino, FIXED_TIME * 10**9, FIXED_TIME * 10**9)
        self.touched.add(parent)

    def _keep_times(self, directory: str) -> None:
        """Remember `directory`'s times before the layer first changes it (unless it names it)."""
        if directory in self.kept_times or directory in self.dir_times:
            return
        info = os.stat(directory)
        self.kept_times[directory] = (info.st_ino, info.st_atime_ns, info.st_mtime_ns)
        self.touched.add(directory)

    def _opaque(self, directory: str) -> None:
        for entry in _scandir(directory):
            if entry.path == self.trash:
                continue
            if entry.path not in self.written:
                self._keep_times(directory)
                self._remove(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                self._opaque(entry.path)

    def _is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    # Removal

    def _remove(self, path: str) -> None:
        """Take `path` out of the tree: moved into the trash, deleted when the layer is done.

        Deleting at once would free inodes and blocks in the middle of the layer, and whether
        ext4 hands a freed inode out again depends on the clock (no-journal ext4 skips inodes
        deleted within the last seconds, by their dtime), so inode numbers would vary.
        """
        info = _lstat(path)
        if info is None:
            return
        self._note_tree(path, info)
        if self.trash is None:
            self._keep_times("/")
            self.trash = "/" + TRASH_NAME
            os.mkdir(self.trash, 0o700)
            self.trash_ino = os.lstat(self.trash).st_ino
        self.trashed += 1
        os.rename(path, f"{self.trash}/{self.trashed}")
        self.written.discard(path)
        self.touched.discard(path)

    def _note_tree(self, path: str, info: os.stat_result) -> None:
        if stat.S_ISDIR(info.st_mode):
            for entry in _scandir(path):
                self._note_tree(entry.path, entry.stat(follow_symlinks=False))
        self._note_removed(info)

    def _empty_trash(self) -> None:
        if self.trash is None:
            return
        for folder, directories, files in os.walk(self.trash, topdown=False):
            for name in files:
                os.unlink(os.path.join(folder, name))
            for name in directories:
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    os.unlink(path)
                else:
                    os.rmdir(path)
        os.rmdir(self.trash)
        self.removed[self.trash_ino] = (0, 0)

    def _note_removed(self, info: os.stat_result) -> None:
        links, mtime = self.removed.get(info.st_ino, (info.st_nlink, info.st_mtime_ns))
        links = 0 if stat.S_ISDIR(info.st_mode) else links - 1
        self.removed[info.st_ino] = (links, mtime)

    # The end

    def finish(self) -> tuple[dict[int, int], list[int]]:
        """Empty the trash, set the directories' times; (changed inode -> mtime ns, freed)."""
        self._empty_trash()
        for path, times in self.dir_times.items():
            os.utime(path, ns=times, follow_symlinks=False)
        for path, (ino, atime, mtime) in self.kept_times.items():
            info = _lstat(path)
            if info is not None and info.st_ino == ino:
                os.utime(path, ns=(atime, mtime), follow_symlinks=False)

        changed: dict[int, int] = {}
        for path in sorted(self.touched):
            info = _lstat(path)
            if info is not None:
                changed[info.st_ino] = info.st_mtime_ns
        for ino, (links, mtime) in self.removed.items():
            if links > 0 and ino not in changed:
                changed[ino] = mtime
        freed = sorted(ino for ino, (links, _) in self.removed.items() if links <= 0)
        return changed, [ino for ino in freed if ino not in changed]


def _copy(source: IO[bytes], fd: int, position: int, length: int, member: tarfile.TarInfo) -> None:
    """Copy `length` bytes from `source` to `fd` at `position`; all-zero chunks are skipped
    (a hole reads the same and costs no blocks)."""
    end = position + length
    while position < end:
        chunk = source.read(min(CHUNK, end - position))
        if not chunk:
            raise LayerError(f"entry {member.name!r}: the archive ends inside its data")
        if chunk != _ZERO[: len(chunk)]:
            os.pwrite(fd, chunk, position)
        position += len(chunk)


_SYNC_FILE_RANGE_WRITE: Final = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages out now, from this process (no wait, no flush).

    ext4 allocates delayed blocks when pages are written out: done here, that happens in
    file order on this process's CPU, not whenever (and wherever) the flusher threads run.
    """
    if _libc.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"sync_file_range: {os.strerror(number)}")


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _scandir(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as entries:
        return sorted(entries, key=lambda entry: entry.name)


def _kind(member: tarfile.TarInfo) -> str:
    kinds = {
        tarfile.REGTYPE: "file",
        tarfile.AREGTYPE: "file",
        tarfile.DIRTYPE: "directory",
        tarfile.SYMTYPE: "symlink",
        tarfile.LNKTYPE: "hard link",
        tarfile.CHRTYPE: "character device",
        tarfile.BLKTYPE: "block device",
        tarfile.FIFOTYPE: "fifo",
    }
    return kinds.get(member.type, f"type {member.type!r}")


def _times(member: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in ns: PAX records when present (exact), else the header's mtime."""
    mtime = _pax_time(member.pax_headers.get("mtime")) or int(member.mtime) * 10**9
    atime = _pax_time(member.pax_headers.get("atime")) or mtime
    return atime, mtime


def _pax_time(text: str | None) -> int | None:
    if not text:
        return None
    sign = -1 if text.startswith("-") else 1
    seconds, _, fraction = text.lstrip("-").partition(".")
    try:
        nanoseconds = int((fraction + "000000000")[:9]) if fraction else 0
        return sign * (int(seconds) * 10**9 + nanoseconds)
    except ValueError:
        return None


def _xattrs(member: tarfile.TarInfo) -> Iterator[tuple[str, bytes]]:
    for key, value in sorted(member.pax_headers.items()):
        if key.startswith("SCHILY.xattr."):
            yield key[len("SCHILY.xattr.") :], value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :])
            yield name, base64.b64decode(value + "=" * (-len(value) % 4))


def _child(blob: str, root: str, compression: str, cpu: int | None) -> dict[str, Any]:
    """Apply in this process: open the blob, chroot, apply; the report as a JSON object."""

    def progress(count: int) -> None:
        print(json.dumps({"progress": count}), flush=True)

    errors = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, *_zstd_errors())
    stream = _HashingReader(open_layer(blob, compression), progress)
    buffered = io.BufferedReader(stream, CHUNK)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    os.chroot(root)
    os.chdir("/")
    os.umask(0)

    applier = _Applier()
    try:
        with tarfile.open(fileobj=buffered, mode="r|", errorlevel=2) as tar:
            applier.apply(tar)
            end = tar.offset
        _check_tail(stream, buffered, end)
    except errors as exc:
        if isinstance(exc, LayerError):
            raise
        raise LayerError(
            f"the layer archive is corrupt or truncated ({type(exc).__name__}: {exc}) after "
            f"{stream.count} bytes of tar; fetch or rebuild the layer"
        ) from exc

    changed, freed = applier.finish()
    return {
        "diff_id": "sha256:" + stream.hasher.hexdigest(),
        "tar_size": stream.count,
        "entries": applier.entries,
        "changed": {str(ino): ns for ino, ns in changed.items()},
        "freed": freed,
        "skipped_xattrs": sorted(applier.skipped_xattrs),
    }


def _zstd_errors() -> tuple[type[Exception], ...]:
    import zstandard

    return (zstandard.ZstdError,)


def _check_tail(stream: _HashingReader, buffered: IO[bytes], end: int) -> None:
    """Everything after the last member must be zeros (end marker and record padding).

    tarfile ends an archive quietly at a header that does not parse, so a corrupt header
    would otherwise drop the rest of the layer without an error.
    """
    seen = stream.recent_from(end)
    if seen is None:
        raise LayerError(f"the layer archive ended at byte {end}, too far back to check")
    chunk = seen
    while chunk is not None:
        if chunk.count(0) != len(chunk):
            raise LayerError(
                f"the layer archive has data after its end at byte {end}: a corrupt header "
                "ended it early; fetch or rebuild the layer"
            )
        chunk = buffered.read(CHUNK) or None


def main(argv: list[str] | None = None) -> int:
    """``python -m workbench.convert.apply BLOB ROOT COMPRESSION [--cpu N]``; JSON on stdout."""
    parser = argparse.ArgumentParser(prog="python -m workbench.convert.apply")
    parser.add_argument("blob")
    parser.add_argument("root")
    parser.add_argument("compression", choices=("tar", "gzip", "zstd"))
    parser.add_argument("--cpu", type=int)
    args = parser.parse_args(argv)
    try:
        report = _child(args.blob, args.root, args.compression, args.cpu)
    except LayerError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 1
    except Exception as exc:  # the parent gets one line, not a traceback
        print(json.dumps({"error": f"the applier failed: {type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
