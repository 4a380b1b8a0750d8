"""A read-only LSMT layer: a committed (or sealed) layer file opened as a small virtual disk.

A read-only layer is the bottom of OverlayBD's read path for one blob: the blob, once its tar
wrapping and ZFile compression are peeled off (`workbench.formats.detect`), is an LSMT file
(layout in `workbench.formats.lsmt`)::

    [0, 4096)        header   HEADER|DATA (|SEALED when committed)
    [4096, IO)       data     sectors, in index order
    [IO, T)          index    sorted segment mappings, padded with invalid entries
    [T, T + 4096)    trailer  DATA|SEALED, index_offset = IO, index_size

Opening validates the file as OverlayBD's reader does (spec 1.5 "Reader") and loads the index
into a `SegmentIndex` (padding dropped, tags reset to 0). After that, `read_data` reads sectors
of the layer file (what a merged stack asks of each layer) and `pread` reads the layer alone as
a disk (gaps and zeroed ranges read as zeros).

Both committed files (header 0x07, trailer 0x06) and sealed writable data files (header 0x03,
trailer 0x06 or 0x16 if sparse) open here.

Tracing: one `lsmt`/`read` event per `read_data` call, target = the layer name, offset and
length in bytes of the (unwrapped) layer file.

Caveats:
- the whole index is loaded at open (16 bytes per entry, at most 1,000,000 entries as in
  OverlayBD); there is no lazy index loading;
- a layer is not checked against its neighbours (uuid chain, virtual size): that is the
  stack's job (`workbench.image.stack`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable

from workbench.blobs.common import LocalFile, RandomAccessFile, read_exact
from workbench.errors import AlignmentError, CorruptFileError, FormatError
from workbench.formats import detect
from workbench.formats.lsmt import (
    ALIGNMENT,
    FLAG_DATA,
    FLAG_HEADER,
    FLAG_SEALED,
    HEADER_STRUCT_SIZE,
    HT_SPACE,
    MAX_RO_INDEX_SIZE,
    SECTOR_SHIFT,
    LsmtHeader,
    SegmentIndex,
    is_lsmt,
)
from workbench.tracing import core as trace

__all__ = ["ReadOnlyLayer", "assemble_sectors", "check_aligned"]

log = logging.getLogger(__name__)

FIRST_DATA_SECTOR = HT_SPACE >> SECTOR_SHIFT
"""Data starts right after the 4 KiB header: sector 8 of the layer file."""

ENTRY_SIZE = 16
"""Bytes per on-disk index entry."""

# A segment as the read helpers see it: (offset, length, moffset, zeroed), all in sectors.
Segment = tuple[int, int, int, bool]


# ---------------------------------------------------------------------------------------------
# Helpers shared with the writable layer


def check_aligned(name: str, offset: int, length: int, what: str) -> None:
    """Raise `AlignmentError` unless `offset` and `length` are multiples of 512 bytes."""
    if offset < 0 or length < 0:
        raise AlignmentError(
            f"{name}: {what} at offset {offset}, length {length}: negative offset or length"
        )
    if offset % ALIGNMENT or length % ALIGNMENT:
        raise AlignmentError(
            f"{name}: {what} at offset {offset}, length {length} is not aligned to "
            f"{ALIGNMENT}-byte sectors; LSMT layers only do whole-sector I/O"
        )


def assemble_sectors(
    segments: Iterable[Segment],
    read_data: Callable[[int, int], bytes],
    first: int,
    count: int,
) -> bytes:
    """The bytes of sectors [first, first + count) of a disk described by `segments`.

    `segments` are the mappings that overlap the range, sorted by offset; sectors they do not
    cover, and zeroed ones, read as zeros. Neighbouring segments whose data also follow each
    other in the layer file are read with one `read_data` call.
    """
    out = bytearray(count << SECTOR_SHIFT)
    stop = first + count
    run_start = run_end = run_moffset = -1

    def flush_run() -> None:
        if run_start >= 0:
            data = read_data(run_moffset, run_end - run_start)
            out[(run_start - first) << SECTOR_SHIFT : (run_end - first) << SECTOR_SHIFT] = data

    for offset, length, moffset, zeroed in segments:
        start = max(offset, first)
        end = min(offset + length, stop)
        if zeroed or start >= end:
            continue
        source = moffset + (start - offset)

        # Extend the pending read when this segment continues it on disk and on the file.
        if start == run_end and source == run_moffset + (run_end - run_start):
            run_end = end
            continue
        flush_run()
        run_start, run_end, run_moffset = start, end, source

    flush_run()
    return bytes(out)


def index_segments(index: SegmentIndex, first: int, count: int) -> Iterable[Segment]:
    """The entries of `index` overlapping sectors [first, first + count), as tuples."""
    lo, hi = index.span(first, count)
    if lo == hi:
        return ()
    part = index.slice(lo, hi)
    return zip(
        part.offset.tolist(),
        part.length.tolist(),
        part.moffset.tolist(),
        part.zeroed.tolist(),
        strict=True,
    )


# ---------------------------------------------------------------------------------------------
# The read-only layer


class ReadOnlyLayer:
    """A committed or sealed LSMT layer, validated and with its index in memory.

    Attributes: `name` (the source's name), `header` and `trailer` (`LsmtHeader`), `index`
    (sorted `SegmentIndex`, tags 0, padding dropped), `file` (the LSMT bytes after tar and
    ZFile unwrapping), `virtual_size`, `uuid`, `parent_uuid`, `message` (the commit message)
    and `wrapping` (the wrappers peeled off, outermost first, e.g. ``("tar", "zfile")``).

    It is also a `RandomAccessFile` of the layer alone as a disk: `size` is the virtual
    size and `pread` reads it. Reads are thread-safe (no shared state besides the file).
    """

    def __init__(
        self,
        file: RandomAccessFile,
        header: LsmtHeader,
        trailer: LsmtHeader,
        index: SegmentIndex,
        name: str,
        wrapping: tuple[str, ...] = (),
        owned: tuple[RandomAccessFile, ...] = (),
    ) -> None:
        self.file = file
        self.header = header
        self.trailer = trailer
        self.index = index
        self.name = name
        self.wrapping = wrapping
        self._owned = owned

    # The trailer is written last (and rewritten by update_vsize with the header), so its
    # fields are the ones in force.
    @property
    def virtual_size(self) -> int:
        return self.trailer.virtual_size

    @property
    def uuid(self) -> str:
        return self.trailer.uuid

    @property
    def parent_uuid(self) -> str:
        return self.trailer.parent_uuid

    @property
    def message(self) -> str:
        return self.trailer.message

    @property
    def size(self) -> int:
        """The layer as a disk: its virtual size in bytes."""
        return self.virtual_size

    @property
    def source(self) -> RandomAccessFile:
        """The file the layer was opened from, before unwrapping (local or registry blob)."""
        return self._owned[-1] if self._owned else self.file

    @property
    def sparse(self) -> bool:
        """Whether the layer was a sparse writable layer before it was sealed."""
        return self.trailer.is_sparse

    # Opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, source: RandomAccessFile | str | os.PathLike[str]) -> ReadOnlyLayer:
        """Open a layer from a path or a random-access file (tar and ZFile are peeled off).

        The layer owns the file it is given: closing the layer closes it.

        Raises `FormatError` if it is not an LSMT file, `CorruptFileError` if it breaks a
        rule of the format (the message names the file, the offset and the rule).
        """
        opened = LocalFile(source) if isinstance(source, str | os.PathLike) else None
        outer: RandomAccessFile = source if opened is None else opened  # type: ignore
        try:
            file, wrapping = _unwrap(outer)
            layer = cls._load(file, outer.name, wrapping)
        except BaseException:
            if opened is not None:
                opened.close()
            raise

        # Closing a wrapper closes what it wraps; closing the source as well is harmless.
        layer._owned = (file, outer) if file is not outer else (outer,)
        log.debug(
            "opened layer %s: %d segments, virtual size %d, wrapping %s",
            layer.name,
            len(layer.index),
            layer.virtual_size,
            "+".join(wrapping) or "none",
        )
        return layer

    @classmethod
    def _load(cls, file: RandomAccessFile, name: str, wrapping: tuple[str, ...]) -> ReadOnlyLayer:
        size = file.size
        head = file.pread(0, HT_SPACE)
        if not is_lsmt(head):
            LsmtHeader.unpack(head.ljust(HEADER_STRUCT_SIZE, b"\0"), name)  # raises: no magic
        header = LsmtHeader.unpack(head, name, 0)
        _check_header(header, name)
        if size < 2 * HT_SPACE:
            raise CorruptFileError(
                f"{name}: LSMT layer file is {size} bytes, smaller than a header and a "
                f"trailer ({2 * HT_SPACE} bytes); the file was cut short"
            )

        trailer_offset = size - HT_SPACE
        raw_trailer = read_exact(file, trailer_offset, HT_SPACE, "LSMT trailer")
        try:
            trailer = LsmtHeader.unpack(raw_trailer, name, trailer_offset)
        except FormatError:
            if not header.is_sealed:
                raise FormatError(
                    f"{name}: a writable layer's data file (header flags {header.flags:#x}) "
                    f"without a trailer at offset {trailer_offset}; open it with "
                    "WritableLayer.open, or seal it first"
                ) from None
            raise
        _check_trailer(trailer, name, trailer_offset)

        index = _load_index(file, trailer, name, trailer_offset)
        return cls(file, header, trailer, index, name, wrapping)

    # Reading ---------------------------------------------------------------------------

    def read_data(self, moffset: int, length: int) -> bytes:
        """`length` sectors of the layer file at sector `moffset`, as bytes."""
        recorder = trace.recorder
        if recorder is not None:
            start_ns = time.perf_counter_ns()

        offset = moffset << SECTOR_SHIFT
        nbytes = length << SECTOR_SHIFT
        data = read_exact(self.file, offset, nbytes, "LSMT segment data")

        if recorder is not None:
            recorder.emit("lsmt", "read", self.name, offset, nbytes, start_ns, nbytes)
        return data

    def pread(self, offset: int, length: int) -> bytes:
        """`length` bytes of this layer alone as a disk at `offset` (512-aligned).

        Unmapped and zeroed ranges read as zeros; a read past the virtual size is short.
        """
        check_aligned(self.name, offset, length, "read")
        length = min(length, self.virtual_size - offset)
        if length <= 0:
            return b""

        first = offset >> SECTOR_SHIFT
        count = -(-length // ALIGNMENT)
        segments = index_segments(self.index, first, count)
        data = assemble_sectors(segments, self.read_data, first, count)
        return data[:length]

    # Lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        for file in self._owned:
            file.close()
        self._owned = ()

    def __enter__(self) -> ReadOnlyLayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ReadOnlyLayer({self.name!r}, {len(self.index)} segments, "
            f"virtual_size={self.virtual_size}, uuid={self.uuid})"
        )

    def _repr_html_(self) -> str:
        from workbench.explore.html import card, human_bytes

        fields = {
            "wrapping": "+".join(self.wrapping) or "none (plain LSMT)",
            "segments": len(self.index),
            "mapped": human_bytes(int(self.index.length.sum()) << SECTOR_SHIFT),
            "virtual size": human_bytes(self.virtual_size),
            "uuid": self.uuid,
            "message": self.message,
        }
        return card(f"ReadOnlyLayer {self.name}", fields, self.index.to_frame())


# ---------------------------------------------------------------------------------------------
# Validation (spec 1.5 "Reader")


def _unwrap(source: RandomAccessFile) -> tuple[RandomAccessFile, tuple[str, ...]]:
    """Peel tar and ZFile wrapping off `source`; a plain LSMT file comes back unchanged."""
    unwrapped = detect.unwrap(source)
    return unwrapped.file, tuple(unwrapped.layers)


def _check_header(header: LsmtHeader, name: str) -> None:
    if not header.flags & FLAG_HEADER:
        raise CorruptFileError(
            f"{name}: LSMT header at offset 0 has flags {header.flags:#x} without the "
            "HEADER bit (0x1); the block at offset 0 is a trailer, not a header"
        )
    if not header.flags & FLAG_DATA:
        raise FormatError(
            f"{name}: LSMT header at offset 0 has flags {header.flags:#x} without the DATA "
            "bit (0x2): this is a writable layer's index file, not a layer file"
        )


def _check_trailer(trailer: LsmtHeader, name: str, at: int) -> None:
    rules = (
        (not trailer.flags & FLAG_HEADER, "the HEADER bit (0x1) clear"),
        (bool(trailer.flags & FLAG_DATA), "the DATA bit (0x2) set"),
        (bool(trailer.flags & FLAG_SEALED), "the SEALED bit (0x4) set"),
    )
    for holds, rule in rules:
        if not holds:
            raise CorruptFileError(
                f"{name}: LSMT trailer at offset {at} has flags {trailer.flags:#x}, expected {rule}"
            )

    if trailer.index_size > MAX_RO_INDEX_SIZE:
        raise CorruptFileError(
            f"{name}: LSMT trailer at offset {at} has index_size {trailer.index_size} "
            f"entries, more than the {MAX_RO_INDEX_SIZE} a read-only layer may hold"
        )
    if trailer.index_offset < HT_SPACE or trailer.index_offset > at:
        raise CorruptFileError(
            f"{name}: LSMT trailer at offset {at} has index_offset {trailer.index_offset}, "
            f"expected a value in [{HT_SPACE}, {at}]"
        )
    room = at - trailer.index_offset
    if trailer.index_size * ENTRY_SIZE > room:
        raise CorruptFileError(
            f"{name}: LSMT trailer at offset {at}: index of {trailer.index_size} entries "
            f"({trailer.index_size * ENTRY_SIZE} bytes) at offset {trailer.index_offset} "
            f"does not fit in the {room} bytes before the trailer"
        )


def _load_index(file: RandomAccessFile, trailer: LsmtHeader, name: str, at: int) -> SegmentIndex:
    raw = read_exact(
        file, trailer.index_offset, trailer.index_size * ENTRY_SIZE, "LSMT segment index"
    )
    index = SegmentIndex.from_bytes(raw).with_tag(0)

    where = f"{name} (index at offset {trailer.index_offset})"
    index.check_sorted(where)
    index.check_data_range(where, FIRST_DATA_SECTOR, trailer.index_offset >> SECTOR_SHIFT)
    return index
