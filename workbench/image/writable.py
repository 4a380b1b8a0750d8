"""The writable LSMT layer: an append-only data file plus an append-only index file.

Files (spec 1.6, byte-compatible with `overlaybd-create` and OverlayBD's writable layer)::

    data file   [0, 4096) header flags 0x03 (0x13 if sparse), index_offset 0, index_size 0,
                          virtual_size, uuid, parent_uuid
                [4096, EOF) written sectors, appended in write order
    index file  [0, 4096) header flags 0x01, index_offset 4096, same sizes and uuids
                [4096, EOF) segment mappings, 16 bytes each, appended in write order

A write of N bytes at disk offset X appends the bytes at the data file's end P and appends one
mapping {X/512, length, P/512} per piece of at most 4 MiB (OverlayBD splits I/O at 4 MiB). A
trim appends zeroed mappings (pieces of at most 16383 sectors, moffset = data end in sectors)
and writes no data. Nothing is ever rewritten in place, so the files only grow.

Reopening replays the index file in file order into an ordered map where a later mapping
hides the overlapped parts of older ones. Padding entries are skipped; a partial entry at the
end of the index file (a write torn by a crash) is dropped with a WARNING and cut off so that
later appends stay aligned; complete entries whose data reached the data file are never lost.

Sparse variant (flag 0x10, ``sparse=True``): the data file is a sparse file of
4096 + virtual_size bytes and disk offset X lives at file offset 4096 + X. No index file is
written; opening rebuilds the mappings from the file's data extents (SEEK_DATA/SEEK_HOLE), and
a trim punches a hole (fallocate PUNCH_HOLE|KEEP_SIZE).

`seal()` turns the data file into a read-only layer (spec 1.6 "Seal"): it appends the sorted
index, padded with invalid entries to a multiple of 32, and a trailer (0x06, +0x10 if sparse).

In memory the visible mappings are a `SortedDict` offset -> (length, w1): a write costs
O(log n) plus the mappings it overlaps, and the `SegmentIndex` the stack and commit use is
built from it lazily and cached until the next write.

Durability contract
    - `pwrite` writes the data, then appends the entries that name it; `flush()` fsyncs the
      data file, then the index file. So every entry a flush acknowledged has its data inside
      the data file, whatever order the kernel wrote the pages back in.
    - After a crash every write and trim acknowledged by a `flush()` that returned reads
      back, and possibly later ones. After kill -9 the page cache survives, so the layer
      reads as after a prefix of its writes that holds every `pwrite` that returned. After a
      power loss, unacknowledged writes may be there, missing, or partly there (Caveats).
    - A torn tail is repaired at open: a partial index entry is dropped, and so are the
      entries from the first one whose data lies past the data file's end onward (the index
      write reached the disk, the data append did not). They were never acknowledged, since a
      later flush would have fsynced their data first; the older contents of their ranges stay
      visible. ONE WARNING names the count and the first entry's offset. Opened writable, the
      index file is cut back (and fsynced) so that new data cannot be named by old entries.
    - What cannot come from a crash still raises `CorruptFileError`: an entry mapping data
      below the header (moffset < 8 sectors) or past the virtual disk.
    - ``readonly=True`` opens both files O_RDONLY and repairs nothing on disk: the torn tail
      is dropped in memory only, and writes, trims and `seal` raise `ReadOnlyError`.

Caveats:
- about 150 bytes of Python objects per visible mapping (the on-disk index is 16 bytes);
- a crash can leave the data file's size extended over blocks that were never written
  (some file systems then read zeros): entries naming them are inside the file and replay;
  only unacknowledged writes are affected, but they may read as zeros instead of their older
  content;
- a lost tail left on disk (the layer only ever opened read-only) is dropped again at every
  open, with its WARNING; other tools (OverlayBD's replay) may refuse such a layer until one
  writable open cuts the tail off;
- sparse layers learn their mappings from the filesystem's extents: granularity is the
  filesystem block (a 512-byte write maps its whole 4 KiB block, reading zeros around it),
  and a trimmed range becomes a gap after reopening, so a lower layer shows through it
  again (as in OverlayBD);
- a layer is meant to have one writer; concurrent `pwrite` calls are serialised by a lock.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import struct
import threading
import time
import uuid as uuid_module
from pathlib import Path

import numpy as np
from sortedcontainers import SortedDict

from workbench.errors import AlignmentError, CorruptFileError, FormatError, ReadOnlyError
from workbench.formats.lsmt import (
    ALIGNMENT,
    FLAG_DATA,
    FLAG_HEADER,
    FLAG_SEALED,
    FLAG_SPARSE,
    HT_SPACE,
    INDEX_PAD_SEALED,
    INVALID_OFFSET,
    MAX_IO_SIZE,
    MAX_SEGMENT_LENGTH,
    SECTOR_SHIFT,
    LsmtHeader,
    SegmentIndex,
    normalize_uuid,
)
from workbench.image.layer import ENTRY_SIZE, FIRST_DATA_SECTOR, assemble_sectors, check_aligned
from workbench.tracing import core as trace

__all__ = ["WritableLayer"]

log = logging.getLogger(__name__)

ZEROED_BIT = 1 << 55
MOFFSET_MASK = (1 << 55) - 1
WRITE_PIECE_SECTORS = MAX_IO_SIZE >> SECTOR_SHIFT
"""A write is split into pieces of 4 MiB (8192 sectors), one index entry each."""

_U64 = np.dtype("<u8")
_ENTRY = struct.Struct("<QQ")
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

PathLike = str | os.PathLike[str]


class WritableLayer:
    """A writable LSMT layer; see the module docstring for the files and their rules.

    Attributes: `name` (the data file path), `header` (the data file header),
    `virtual_size`, `uuid`, `parent_uuid`, `sparse`, `readonly`. `index` is the current
    visible mapping set (later writes win, tags 0) and `lookup` the part of it over a range;
    `read_data` reads the data file in sectors, `pread` reads the layer alone as a disk.
    """

    def __init__(
        self,
        data_path: Path,
        index_path: Path | None,
        data_fd: int,
        index_fd: int,
        header: LsmtHeader,
        data_end: int,
        index_end: int,
        readonly: bool = False,
    ) -> None:
        self.name = str(data_path)
        self.data_path = data_path
        self.index_path = index_path
        self.header = header
        self._data_fd = data_fd
        self._index_fd = index_fd
        self._data_end = data_end
        self._index_end = index_end
        # offset -> (length, w1) of each visible mapping, sorted by offset.
        self._map: SortedDict = SortedDict()
        self._index_cache: SegmentIndex | None = None
        self._lock = threading.Lock()
        self._sealed = False
        self._readonly = readonly

    @property
    def virtual_size(self) -> int:
        return self.header.virtual_size

    @property
    def size(self) -> int:
        """The layer as a disk: its virtual size in bytes."""
        return self.header.virtual_size

    @property
    def uuid(self) -> str:
        return self.header.uuid

    @property
    def parent_uuid(self) -> str:
        return self.header.parent_uuid

    @property
    def sparse(self) -> bool:
        return self.header.is_sparse

    @property
    def sealed(self) -> bool:
        return self._sealed

    @property
    def readonly(self) -> bool:
        """True if opened with ``readonly=True``: the files are never modified."""
        return self._readonly

    # Creating and opening --------------------------------------------------------------

    @classmethod
    def create(
        cls,
        data_path: PathLike,
        index_path: PathLike | None,
        virtual_size: int,
        parent_uuid: str | None = None,
        uuid: str | None = None,
        sparse: bool = False,
    ) -> WritableLayer:
        """Create a new, empty layer (as `overlaybd-create`); the files must not exist.

        `uuid` defaults to a random one, `parent_uuid` to the null UUID. A sparse layer needs
        no index file; if `index_path` is given anyway, an empty index file is written.
        """
        if virtual_size <= 0 or virtual_size % ALIGNMENT:
            raise AlignmentError(
                f"virtual size {virtual_size} is not a positive multiple of {ALIGNMENT} bytes"
            )
        if not sparse and index_path is None:
            raise FormatError(f"{data_path}: a non-sparse writable layer needs an index file path")

        header = LsmtHeader(
            flags=FLAG_HEADER | FLAG_DATA | (FLAG_SPARSE if sparse else 0),
            virtual_size=virtual_size,
            uuid=normalize_uuid(uuid) if uuid else str(uuid_module.uuid4()).upper(),
            parent_uuid=normalize_uuid(parent_uuid, "parent uuid"),
        )
        index_header = header.with_(flags=FLAG_HEADER, index_offset=HT_SPACE)

        data_path = Path(data_path)
        data_fd = _create_file(data_path, header.pack())
        if sparse:
            os.ftruncate(data_fd, HT_SPACE + virtual_size)
        index_fd = -1
        if index_path is not None:
            index_path = Path(index_path)
            index_fd = _create_file(index_path, index_header.pack())

        data_end = HT_SPACE + virtual_size if sparse else HT_SPACE
        layer = cls(data_path, index_path, data_fd, index_fd, header, data_end, HT_SPACE)
        log.info(
            "created %swritable layer %s: virtual size %d, uuid %s, parent %s",
            "sparse " if sparse else "",
            data_path,
            virtual_size,
            header.uuid,
            header.parent_uuid,
        )
        return layer

    @classmethod
    def open(
        cls, data_path: PathLike, index_path: PathLike | None = None, *, readonly: bool = False
    ) -> WritableLayer:
        """Open an existing layer, replaying its index; for writing unless `readonly`.

        A sparse layer needs no index file (its mappings come from the data file's extents).
        A torn tail (module docstring, "Durability contract") is dropped with a WARNING and,
        unless `readonly`, cut off the index file. With ``readonly=True`` both files are
        opened O_RDONLY and never modified; writes raise `ReadOnlyError`.

        Raises `FormatError` if the data file is not a writable layer (for instance a sealed
        or committed one) and `CorruptFileError` for index entries no crash can produce
        (data below the header, or mappings past the virtual disk).
        """
        data_path = Path(data_path)
        mode = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        data_fd = os.open(data_path, mode)
        index_fd = -1
        try:
            header = _read_data_header(data_fd, data_path)
            if header.is_sparse:
                layer = cls._open_sparse(data_path, index_path, data_fd, header, readonly)
            else:
                if index_path is None:
                    raise FormatError(
                        f"{data_path}: a non-sparse writable layer (flags {header.flags:#x}) "
                        "needs its index file; pass index_path"
                    )
                index_fd = os.open(index_path, mode)
                layer = cls._open_indexed(
                    data_path, Path(index_path), data_fd, index_fd, header, readonly
                )
        except BaseException:
            os.close(data_fd)
            if index_fd >= 0:
                os.close(index_fd)
            raise

        log.debug(
            "opened writable layer %s%s: %d segments",
            data_path,
            " read-only" if readonly else "",
            len(layer._map),
        )
        return layer

    @classmethod
    def _open_indexed(
        cls,
        data_path: Path,
        index_path: Path,
        data_fd: int,
        index_fd: int,
        header: LsmtHeader,
        readonly: bool,
    ) -> WritableLayer:
        data_size = os.fstat(data_fd).st_size
        data_end = -(-data_size // ALIGNMENT) * ALIGNMENT
        if data_end != data_size:
            log.warning(
                "%s: data file size %d is not a multiple of %d (a write torn by a crash); "
                "new data goes after the partial sector",
                data_path,
                data_size,
                ALIGNMENT,
            )

        entries_at, raw = _read_index_file(index_fd, index_path, header, readonly)
        _check_entries(raw, header.virtual_size, index_path, entries_at)
        raw = _drop_lost_tail(raw, data_size >> SECTOR_SHIFT, index_path, entries_at)
        index_end = entries_at + len(raw) * ENTRY_SIZE
        if not readonly and os.fstat(index_fd).st_size > index_end:
            # New entries would land after the dropped ones, and a later open would replay
            # those against data appended since: cut them off for good before any write.
            os.ftruncate(index_fd, index_end)
            os.fsync(index_fd)

        layer = cls(data_path, index_path, data_fd, index_fd, header, data_end, index_end, readonly)
        layer._replay(raw)
        return layer

    @classmethod
    def _open_sparse(
        cls,
        data_path: Path,
        index_path: PathLike | None,
        data_fd: int,
        header: LsmtHeader,
        readonly: bool,
    ) -> WritableLayer:
        end = HT_SPACE + header.virtual_size
        size = os.fstat(data_fd).st_size
        if size < end:
            # Sectors past the end of a short file read as zeros either way: the extents
            # below stop at the file's end, so a read-only open needs no repair.
            log.warning(
                "%s: sparse data file is %d bytes, expected %d; %s",
                data_path,
                size,
                end,
                "reading the rest as zeros" if readonly else "extending it",
            )
            if not readonly:
                os.ftruncate(data_fd, end)

        index_path = Path(index_path) if index_path is not None else None
        layer = cls(data_path, index_path, data_fd, -1, header, end, HT_SPACE, readonly)
        for start, stop in _data_extents(data_fd, HT_SPACE, end):
            offset = (start - HT_SPACE) >> SECTOR_SHIFT
            count = (stop - start) >> SECTOR_SHIFT
            for entry in _pieces(offset, count, MAX_SEGMENT_LENGTH, None):
                layer._insert(*entry)
        return layer

    def _replay(self, raw: np.ndarray) -> None:
        """Load index-file entries (an (N, 2) u64 array, file order), later entries winning.

        The entries are checked (`_check_entries`) and the lost tail is cut off
        (`_drop_lost_tail`): every data entry left names sectors inside the data file.
        """
        w0, w1 = raw[:, 0], raw[:, 1]
        offset = w0 & np.uint64(INVALID_OFFSET)
        length = w0 >> np.uint64(50)

        # Padding entries (invalid offset) are expected; zero-length ones are not, but carry
        # no mapping either, so they are skipped with a warning rather than failing the open.
        valid = offset != np.uint64(INVALID_OFFSET)
        empty = valid & (length == 0)
        if empty.any():
            log.warning(
                "%s: skipped %d index entries of length 0", self.index_path, int(empty.sum())
            )
        keep = valid & ~empty
        offset, length = offset[keep], length[keep]
        mapping = w1[keep] & np.uint64(MOFFSET_MASK | ZEROED_BIT)  # tags reset to 0

        # Fast path: when no two entries overlap, file order does not matter.
        order = np.argsort(offset, kind="stable")
        end = offset + length
        if len(order) < 2 or bool((end[order][:-1] <= offset[order][1:]).all()):
            values = zip(length[order].tolist(), mapping[order].tolist(), strict=True)
            self._map = SortedDict(zip(offset[order].tolist(), values, strict=True))
            return

        for o, n, m in zip(offset.tolist(), length.tolist(), mapping.tolist(), strict=True):
            self._insert(o, n, m)

    # The visible mappings --------------------------------------------------------------

    def _overlapping(self, offset: int, end: int) -> list[int]:
        """Offsets of the mappings that overlap sectors [offset, end), in order."""
        mappings = self._map
        found = list(mappings.irange(offset, end, inclusive=(True, False)))

        # The mapping starting before `offset` overlaps if it reaches past it.
        before = mappings.bisect_left(offset) - 1
        if before >= 0:
            start = mappings.keys()[before]
            if start + mappings[start][0] > offset:
                found.insert(0, start)
        return found

    def _insert(self, offset: int, length: int, mapping: int) -> None:
        """Make [offset, offset + length) map to `mapping`, cutting what it overlaps."""
        mappings = self._map
        end = offset + length
        overlapped = self._overlapping(offset, end)

        if overlapped:
            # The part of the last overlapped mapping right of the new one survives, its
            # data shifted; so does the part of the first one left of it.
            last = overlapped[-1]
            last_length, last_mapping = mappings[last]
            if last + last_length > end:
                if not last_mapping & ZEROED_BIT:
                    last_mapping += end - last
                mappings[end] = (last + last_length - end, last_mapping)

            first = overlapped[0]
            first_mapping = mappings[first][1]
            for start in overlapped:
                del mappings[start]
            if first < offset:
                mappings[first] = (offset - first, first_mapping)

        mappings[offset] = (length, mapping)
        self._index_cache = None

    def _insert_all(self, entries: list[tuple[int, int, int]]) -> None:
        for offset, length, mapping in entries:
            self._insert(offset, length, mapping)

    @property
    def index(self) -> SegmentIndex:
        """The visible mappings as a sorted `SegmentIndex` (tags 0), cached until a write."""
        with self._lock:
            cached = self._index_cache
            if cached is None:
                count = len(self._map)
                offsets = np.fromiter(self._map.keys(), _U64, count)
                values = np.array(self._map.values(), _U64).reshape(count, 2)
                keys = (offsets << np.uint64(14)) | values[:, 0]
                cached = SegmentIndex(keys, np.ascontiguousarray(values[:, 1]))
                self._index_cache = cached
            return cached

    def lookup(self, first: int, count: int) -> list[tuple[int, int, int, bool]]:
        """The visible mappings overlapping sectors [first, first + count), sorted by offset.

        Each is ``(offset, length, moffset, zeroed)`` in sectors, whole (not cut to the
        range): a read of n sectors costs O(log entries + mappings it meets), where `index`
        costs O(entries) after every write. Gaps between them are unmapped.
        """
        with self._lock:
            segments = []
            for start in self._overlapping(first, first + count):
                length, mapping = self._map[start]
                zeroed = bool(mapping & ZEROED_BIT)
                segments.append((start, length, mapping & MOFFSET_MASK, zeroed))
            return segments

    # Reading ---------------------------------------------------------------------------

    def read_data(self, moffset: int, length: int) -> bytes:
        """`length` sectors of the data file at sector `moffset`, as bytes."""
        recorder = trace.recorder
        if recorder is not None:
            start_ns = time.perf_counter_ns()

        offset = moffset << SECTOR_SHIFT
        nbytes = length << SECTOR_SHIFT
        data = _pread_full(self._data_fd, offset, nbytes)
        if len(data) != nbytes:
            raise CorruptFileError(
                f"{self.name}: truncated segment data: wanted {nbytes} bytes at offset "
                f"{offset}, the data file has {len(data)}"
            )

        if recorder is not None:
            recorder.emit("lsmt", "read", self.name, offset, nbytes, start_ns, nbytes)
        return data

    def pread(self, offset: int, length: int) -> bytes:
        """`length` bytes of this layer alone as a disk at `offset` (512-aligned).

        Unmapped and trimmed ranges read as zeros; a read past the virtual size is short.
        """
        check_aligned(self.name, offset, length, "read")
        length = min(length, self.virtual_size - offset)
        if length <= 0:
            return b""

        first = offset >> SECTOR_SHIFT
        count = -(-length // ALIGNMENT)
        data = assemble_sectors(self.lookup(first, count), self.read_data, first, count)
        return data[:length]

    # Writing ---------------------------------------------------------------------------

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at disk `offset`; both must be multiples of 512 bytes."""
        length = len(data)
        self._check_writable(offset, length, "write")
        if length == 0:
            return
        recorder = trace.recorder
        if recorder is not None:
            start_ns = time.perf_counter_ns()

        first = offset >> SECTOR_SHIFT
        count = length >> SECTOR_SHIFT
        with self._lock:
            if self.sparse:
                _pwrite_full(self._data_fd, data, HT_SPACE + offset)
                self._insert_all(_pieces(first, count, WRITE_PIECE_SECTORS, None))
            else:
                # Data first, then the entries that name it, then the visible map: an entry
                # on disk never names data that was not written before it (the durability
                # contract), and a failed append leaves the map as the files are.
                moffset = self._data_end >> SECTOR_SHIFT
                _pwrite_full(self._data_fd, data, self._data_end)
                self._data_end += length
                entries = _pieces(first, count, WRITE_PIECE_SECTORS, moffset)
                self._append_entries(entries)
                self._insert_all(entries)

        if recorder is not None:
            recorder.emit("lsmt", "write", self.name, offset, length, start_ns, length)

    def trim(self, offset: int, length: int) -> None:
        """Discard [offset, offset + length): it reads as zeros and hides lower layers."""
        self._check_writable(offset, length, "trim")
        if length == 0:
            return
        recorder = trace.recorder
        if recorder is not None:
            start_ns = time.perf_counter_ns()

        first = offset >> SECTOR_SHIFT
        count = length >> SECTOR_SHIFT
        with self._lock:
            if self.sparse:
                _punch_hole(self._data_fd, HT_SPACE + offset, length, self.name)
                moffset = FIRST_DATA_SECTOR + first
            else:
                moffset = self._data_end >> SECTOR_SHIFT
            entries = _pieces(first, count, MAX_SEGMENT_LENGTH, moffset, zeroed=True)
            if not self.sparse:
                self._append_entries(entries)
            self._insert_all(entries)

        if recorder is not None:
            recorder.emit("lsmt", "trim", self.name, offset, length, start_ns, 0)

    def _check_writable(self, offset: int, length: int, what: str) -> None:
        self._check_not_readonly(what)
        if self._sealed:
            raise ReadOnlyError(f"{self.name}: the layer is sealed; {what} refused")
        if self._data_fd < 0:
            raise ReadOnlyError(f"{self.name}: the layer is closed; {what} refused")
        check_aligned(self.name, offset, length, what)
        if offset + length > self.virtual_size:
            raise AlignmentError(
                f"{self.name}: {what} at offset {offset}, length {length} ends past the "
                f"virtual disk ({self.virtual_size} bytes)"
            )

    def _check_not_readonly(self, what: str) -> None:
        if self._readonly:
            raise ReadOnlyError(
                f"{self.name}: the layer was opened read-only; {what} refused; open it with "
                "WritableLayer.open(data, index) (readonly=False) to change it"
            )

    def _append_entries(self, entries: list[tuple[int, int, int]]) -> None:
        payload = b"".join(_ENTRY.pack(offset | length << 50, w1) for offset, length, w1 in entries)
        _pwrite_full(self._index_fd, payload, self._index_end)
        self._index_end += len(payload)

    def flush(self) -> None:
        """Make every write so far durable: fsync the data file, then the index file.

        The order is the durability contract: an index entry that reaches the disk through
        this flush names data that reached it first. Nothing to do for a read-only layer.
        """
        if self._readonly:
            return
        os.fsync(self._data_fd)
        if self._index_fd >= 0:
            os.fsync(self._index_fd)

    # Sealing ---------------------------------------------------------------------------

    def seal(self) -> None:
        """Append the sorted index and a trailer to the data file, making it read-only.

        The sealed data file is a valid read-only layer (`ReadOnlyLayer.open` reads it); the
        index file is no longer needed. Later writes raise `ReadOnlyError`.
        """
        if self._sealed:
            return
        self._check_not_readonly("seal")
        index = self.index
        with self._lock:
            index_offset = self._data_end
            trailer = self.header.with_(
                flags=FLAG_DATA | FLAG_SEALED | (self.header.flags & FLAG_SPARSE),
                index_offset=index_offset,
                index_size=len(index),
            )
            payload = index.to_bytes(pad_to=INDEX_PAD_SEALED) + trailer.pack()
            _pwrite_full(self._data_fd, payload, index_offset)
            self._data_end += len(payload)
            self._sealed = True
        self.flush()
        log.info("sealed %s: %d segments, index at offset %d", self.name, len(index), index_offset)

    # Lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        for fd in (self._data_fd, self._index_fd):
            if fd >= 0:
                os.close(fd)
        self._data_fd = self._index_fd = -1

    def __enter__(self) -> WritableLayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "sparse " if self.sparse else ""
        return (
            f"WritableLayer({self.name!r}, {kind}{len(self._map)} segments, "
            f"virtual_size={self.virtual_size}, uuid={self.uuid})"
        )


# ---------------------------------------------------------------------------------------------
# File helpers


def _create_file(path: Path, header_block: bytes) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        _pwrite_full(fd, header_block, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pread_full(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    # A regular file only reads short at its end; one more call tells which it was.
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _pwrite_full(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _read_data_header(fd: int, path: Path) -> LsmtHeader:
    raw = os.pread(fd, HT_SPACE, 0)
    header = LsmtHeader.unpack(raw, str(path), 0)
    if not header.is_header or not header.is_data_file:
        raise FormatError(
            f"{path}: LSMT header at offset 0 has flags {header.flags:#x}; a writable layer's "
            "data file has HEADER and DATA set (0x03, or 0x13 if sparse)"
        )
    if header.is_sealed:
        raise FormatError(
            f"{path}: header flags {header.flags:#x} mark a committed layer; open it with "
            "ReadOnlyLayer.open"
        )

    # A sealed writable layer keeps its 0x03 header; its trailer gives it away.
    size = os.fstat(fd).st_size
    if size >= 2 * HT_SPACE:
        tail = os.pread(fd, HT_SPACE, size - HT_SPACE)
        try:
            trailer = LsmtHeader.unpack(tail, str(path), size - HT_SPACE)
        except (FormatError, CorruptFileError):
            trailer = None
        if trailer is not None and trailer.is_sealed and not trailer.is_header:
            raise FormatError(
                f"{path}: the data file ends with an LSMT trailer at offset "
                f"{size - HT_SPACE}: the layer is sealed; open it with ReadOnlyLayer.open"
            )
    return header


def _read_index_file(
    fd: int, path: Path, data_header: LsmtHeader, readonly: bool = False
) -> tuple[int, np.ndarray]:
    """The entries of an index file, as (file offset of the first entry, (N, 2) array).

    A partial entry at the end is dropped (with a WARNING) and, unless `readonly`, cut off
    the file.
    """
    header = LsmtHeader.unpack(os.pread(fd, HT_SPACE, 0), str(path), 0)
    if not header.is_header or header.is_data_file:
        raise FormatError(
            f"{path}: LSMT header at offset 0 has flags {header.flags:#x}; a writable "
            "layer's index file has HEADER set and DATA clear (0x01)"
        )
    if header.uuid != data_header.uuid:
        log.warning(
            "%s: index file uuid %s differs from the data file's %s",
            path,
            header.uuid,
            data_header.uuid,
        )
    start = header.index_offset or HT_SPACE
    size = os.fstat(fd).st_size
    if size < start:
        raise CorruptFileError(
            f"{path}: index file is {size} bytes, shorter than its entries' start at "
            f"offset {start} (header index_offset)"
        )

    torn = (size - start) % ENTRY_SIZE
    if torn:
        complete = size - torn
        log.warning(
            "%s: dropped a partial index entry of %d bytes at offset %d (a write torn by "
            "a crash); %s",
            path,
            torn,
            complete,
            "read-only, the file is left as it is"
            if readonly
            else f"the file is cut back to {complete} bytes",
        )
        if not readonly:
            os.ftruncate(fd, complete)
        size = complete

    raw = _pread_full(fd, start, size - start)
    return start, SegmentIndex.parse_raw(raw).copy()


def _check_entries(raw: np.ndarray, virtual_size: int, path: Path, entries_at: int) -> None:
    """Refuse entries no crash can produce: data inside the header, or past the disk.

    Checked over every entry, the lost tail included: a crash loses appends, it does not
    write entries that were never written.
    """
    w0, w1 = raw[:, 0], raw[:, 1]
    offset = w0 & np.uint64(INVALID_OFFSET)
    length = w0 >> np.uint64(50)
    moffset = w1 & np.uint64(MOFFSET_MASK)
    zeroed = (w1 & np.uint64(ZEROED_BIT)) != 0
    mapped = (offset != np.uint64(INVALID_OFFSET)) & (length != 0)

    disk_sectors = -(-virtual_size // ALIGNMENT)
    beyond = offset + length > np.uint64(disk_sectors)
    in_header = ~zeroed & (moffset < np.uint64(FIRST_DATA_SECTOR))
    bad = np.flatnonzero(mapped & (beyond | in_header))
    if len(bad):
        i = int(bad[0])
        raise CorruptFileError(
            f"{path}: index entry at offset {entries_at + i * ENTRY_SIZE} for sectors "
            f" [{int(offset[i])}, {int(offset[i] + length[i])}) maps data sectors "
            f"[{int(moffset[i])}, {int(moffset[i] + length[i])}); data starts at sector "
            f"{FIRST_DATA_SECTOR} (after the header) and the virtual disk has {disk_sectors} "
            "sectors; the index file is damaged or belongs to another layer"
        )


def _drop_lost_tail(raw: np.ndarray, data_sectors: int, path: Path, entries_at: int) -> np.ndarray:
    """`raw` up to its first data entry that maps sectors past `data_sectors`.

    Such an entry reached the index file while its data never reached the data file: a
    crash before any flush that would have acknowledged it. Data is appended in write order,
    so the entries after it were not acknowledged either; dropping them all keeps the layer
    equal to a prefix of its writes. One WARNING names how many and where they start.
    """
    w0, w1 = raw[:, 0], raw[:, 1]
    valid = (w0 & np.uint64(INVALID_OFFSET)) != np.uint64(INVALID_OFFSET)
    data = valid & ((w1 & np.uint64(ZEROED_BIT)) == 0)
    moffset = w1 & np.uint64(MOFFSET_MASK)
    past_end = data & (moffset + (w0 >> np.uint64(50)) > np.uint64(data_sectors))
    lost = np.flatnonzero(past_end)
    if len(lost) == 0:
        return raw

    cut = int(lost[0])
    first_moffset = int(moffset[cut])
    log.warning(
        "%s: dropped %d index entries from offset %d on (%d naming data past the data "
        "file's end): the first maps data sectors [%d, %d), the data file has %d; writes "
        "lost in a crash before a flush, the older contents of their ranges stay visible",
        path,
        len(raw) - cut,
        entries_at + cut * ENTRY_SIZE,
        len(lost),
        first_moffset,
        first_moffset + int(w0[cut] >> np.uint64(50)),
        data_sectors,
    )
    return raw[:cut]


def _pieces(
    offset: int, count: int, piece: int, moffset: int | None, zeroed: bool = False
) -> list[tuple[int, int, int]]:
    """Entries (offset, length, w1) for [offset, offset + count) in pieces of `piece` sectors.

    Data pieces map to consecutive sectors from `moffset` (None: the sparse identity
    mapping); zeroed pieces all get `moffset`.
    """
    entries = []
    done = 0
    while done < count:
        length = min(piece, count - done)
        if moffset is None:
            mapping = FIRST_DATA_SECTOR + offset + done
        elif zeroed:
            mapping = moffset
        else:
            mapping = moffset + done
        if zeroed:
            mapping |= ZEROED_BIT
        entries.append((offset + done, length, mapping))
        done += length
    return entries


def _data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """[begin, stop) byte ranges of `fd` within [start, end) that hold data, sector-aligned."""
    extents = []
    position = start
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after `position`
                break
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        begin = data - (data - start) % ALIGNMENT
        stop = min(end, -(-(hole - start) // ALIGNMENT) * ALIGNMENT + start)
        if stop > begin:
            extents.append((begin, stop))
        position = hole
    return extents


_libc: ctypes.CDLL | None = None


def _punch_hole(fd: int, offset: int, length: int, name: str) -> None:
    """Deallocate [offset, offset + length) of `fd`, keeping the file size."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(code, f"{name}: fallocate(PUNCH_HOLE) at {offset}+{length} failed")
        # The filesystem cannot punch holes: write zeros, which reads the same.
        _pwrite_full(fd, bytes(length), offset)
