"""Commit: write a sealed, read-only LSMT layer from any indexed source.

`compact` is OverlayBD's compaction (spec 1.5 "Commit algorithm"), used by `overlaybd-commit`,
`overlaybd-merge` and flattening alike. Given sources that can read sectors and an index whose
tag picks the source of each entry, it streams::

    header   flags 0x07 (HEADER|DATA|SEALED), index_offset 0, index_size 0, the given
             virtual size, uuids and user tag (commit message)
    data     each data entry's sectors, copied in index order from sector 8 on;
             zeroed entries copy nothing and get moffset = the current position
    index    the entries with their new moffsets, neighbours merged (below), padded with
             invalid entries to a multiple of 256 entries
    trailer  flags 0x06, index_offset = start of the index in bytes,
             index_size = entries INCLUDING the padding

Neighbours i, j merge when ``i.end == j.offset``, ``i.mend == j.moffset`` (mend = moffset
for zeroed entries, moffset + length otherwise), both are zeroed or both not, their tags are
equal and ``i.length + j.length < 16383`` (strictly), greedily from the left. Written entries
keep their tags: 0 for a single source, the source number when merging a stack.

On top of it:
- `commit_writable`: a writable (or sealed) layer -> committed file, optionally compressed
  with ZFile (`overlaybd-commit -z`: checksums on, header overwritten) and tar-wrapped (-t);
  with the uuid/parent/message of the testdata it is byte-identical to `overlaybd-commit`;
- `import_raw`: a raw disk image -> committed layer, all-zero blocks left out.

Every output is written to ``<out>.tmp`` and renamed into place once complete and fsynced, so
a crash never leaves a half-written file under the final name.

Caveats:
- compressed output equals OverlayBD's only where the lz4/zstd libraries produce the same
  bytes as OverlayBD's (they mostly do not; see `workbench.formats.zfile`); the ZFile
  content, and so the decompressed layer, is identical;
- like OverlayBD, compaction does not look for zero data (a written block of zeros stays data);
  only `import_raw` skips zero blocks;
- the whole output index is held in memory (16 bytes per entry) until it is written.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np

from workbench.errors import FormatError
from workbench.formats.lsmt import (
    ALIGNMENT,
    FLAG_DATA,
    FLAG_HEADER,
    FLAG_SEALED,
    HT_SPACE,
    INDEX_PAD_COMMITTED,
    MAX_SEGMENT_LENGTH,
    SECTOR_SHIFT,
    TAG_SIZE,
    LsmtHeader,
    SegmentIndex,
    normalize_uuid,
)
from workbench.formats.tar import TarWriter
from workbench.formats.zfile import ZFileWriter
from workbench.image.layer import ENTRY_SIZE, FIRST_DATA_SECTOR

__all__ = ["CommitSource", "commit_writable", "compact", "import_raw", "merge_neighbours"]

log = logging.getLogger(__name__)

COPY_BATCH_SECTORS = 16384
"""Largest single read while copying data (8 MiB): bounds memory, amortises calls."""

ZERO_SCAN_CHUNK = 4 << 20
"""Bytes of a raw image scanned for zero blocks per read."""

PathLike = str | os.PathLike[str]


class SectorSource(Protocol):
    """Anything `compact` can copy from: sectors of a layer file by moffset."""

    def read_data(self, moffset: int, length: int) -> bytes: ...


class CommitSource(SectorSource, Protocol):
    """A layer `commit_writable` accepts: a `WritableLayer` or a sealed `ReadOnlyLayer`."""

    @property
    def index(self) -> SegmentIndex: ...

    @property
    def virtual_size(self) -> int: ...

    @property
    def parent_uuid(self) -> str: ...


# ---------------------------------------------------------------------------------------------
# Compaction


def compact(
    sources: Sequence[SectorSource], index: SegmentIndex, out: BinaryIO, header: LsmtHeader
) -> LsmtHeader:
    """Write a committed layer of `index` (tags select `sources`) to `out`; see the module.

    `out` only needs `write`; the layer starts where `out` is. `header` gives the virtual
    size, uuids and user tag; its flags and index fields are replaced. Returns the trailer.
    """
    header = header.with_(flags=FLAG_HEADER | FLAG_DATA | FLAG_SEALED, index_offset=0, index_size=0)
    out.write(header.pack())

    # New moffsets: data packed in index order from sector 8; zeroed entries take the
    # position they would have had, and copy nothing.
    zeroed = index.zeroed
    data_length = np.where(zeroed, np.uint64(0), index.length)
    ends = np.cumsum(data_length, dtype=np.uint64)
    new_moffset = np.uint64(FIRST_DATA_SECTOR) + ends - data_length
    data_sectors = int(ends[-1]) if len(ends) else 0

    _copy_data(sources, index, out)

    written = SegmentIndex.from_fields(index.offset, index.length, new_moffset, zeroed, index.tag)
    written = merge_neighbours(written)
    index_bytes = written.to_bytes(pad_to=INDEX_PAD_COMMITTED)
    index_offset = HT_SPACE + (data_sectors << SECTOR_SHIFT)
    out.write(index_bytes)

    trailer = header.with_(
        flags=FLAG_DATA | FLAG_SEALED,
        index_offset=index_offset,
        index_size=len(index_bytes) // ENTRY_SIZE,
    )
    out.write(trailer.pack())
    log.debug(
        "compacted %d entries into %d (%d sectors of data)",
        len(index),
        len(written),
        data_sectors,
    )
    return trailer


def _copy_data(sources: Sequence[SectorSource], index: SegmentIndex, out: BinaryIO) -> None:
    """Copy every data entry's sectors in index order, one read per contiguous run."""
    data = ~index.zeroed
    tags = index.tag[data].tolist()
    moffsets = index.moffset[data].tolist()
    lengths = index.length[data].tolist()

    run_tag = run_moffset = run_length = 0
    for tag, moffset, length in zip(tags, moffsets, lengths, strict=True):
        # Extend the pending read when this entry follows it in the same source file.
        if (
            run_length
            and tag == run_tag
            and moffset == run_moffset + run_length
            and run_length + length <= COPY_BATCH_SECTORS
        ):
            run_length += length
            continue
        if run_length:
            out.write(_read_source(sources, run_tag, run_moffset, run_length))
        run_tag, run_moffset, run_length = tag, moffset, length

    if run_length:
        out.write(_read_source(sources, run_tag, run_moffset, run_length))


def _read_source(sources: Sequence[SectorSource], tag: int, moffset: int, length: int) -> bytes:
    if tag >= len(sources):
        raise FormatError(
            f"index entry at file sector {moffset} has tag {tag}, but only "
            f"{len(sources)} source files were given"
        )
    data = sources[tag].read_data(moffset, length)
    if len(data) != length << SECTOR_SHIFT:
        raise FormatError(
            f"source {tag} returned {len(data)} bytes for {length} sectors at sector {moffset}"
        )
    return data


def merge_neighbours(index: SegmentIndex) -> SegmentIndex:
    """Merge touching entries that continue each other (the rule in the module docstring)."""
    if len(index) < 2:
        return index
    offset, length, moffset = index.offset, index.length, index.moffset
    zeroed, tag = index.zeroed, index.tag
    mend = np.where(zeroed, moffset, moffset + length)

    # Which entries could join the one before them, ignoring the length limit.
    joinable = np.zeros(len(index), bool)
    joinable[1:] = (
        (offset[:-1] + length[:-1] == offset[1:])
        & (mend[:-1] == moffset[1:])
        & (zeroed[:-1] == zeroed[1:])
        & (tag[:-1] == tag[1:])
    )
    if not joinable.any():
        return index

    # The length limit makes merging greedy and sequential; walk the entries once.
    keep: list[int] = []
    merged_length: list[int] = []
    for i, (can_join, n) in enumerate(zip(joinable.tolist(), length.tolist(), strict=True)):
        if can_join and merged_length[-1] + n < MAX_SEGMENT_LENGTH:
            merged_length[-1] += n
        else:
            keep.append(i)
            merged_length.append(n)

    keep_at = np.array(keep, np.int64)
    return SegmentIndex.from_fields(
        offset[keep_at],
        np.array(merged_length, np.uint64),
        moffset[keep_at],
        zeroed[keep_at],
        tag[keep_at],
    )


# ---------------------------------------------------------------------------------------------
# Files


def commit_writable(
    layer: CommitSource,
    out_path: PathLike,
    uuid: str | None = None,
    parent_uuid: str | None = None,
    message: str = "",
    compress: str | None = None,
    block_size: int = 4096,
    tar: bool = False,
) -> LsmtHeader:
    """Commit `layer` to a read-only layer file at `out_path`, as `overlaybd-commit`.

    The virtual size comes from the layer, the parent uuid from the layer unless given, the
    uuid is the null UUID unless given. `compress` ("lz4" or "zstd") writes a ZFile of
    `block_size` blocks with checksums and the header overwritten (`overlaybd-commit -z`);
    `tar` wraps the result in OverlayBD's tar (-t). Replaces `out_path` if it exists.
    Returns the LSMT trailer written.
    """
    header = LsmtHeader(
        flags=FLAG_HEADER | FLAG_DATA | FLAG_SEALED,
        virtual_size=layer.virtual_size,
        uuid=normalize_uuid(uuid),
        parent_uuid=(
            normalize_uuid(parent_uuid, "parent uuid") if parent_uuid else layer.parent_uuid
        ),
        user_tag=_user_tag(message),
    )
    index = layer.index.with_tag(0)

    started = time.perf_counter()
    with _output(out_path, compress, block_size, tar) as out:
        trailer = compact([layer], index, out, header)
    log.info(
        "committed %s to %s: %d segments, %d bytes of layer file, %.2f s",
        getattr(layer, "name", "layer"),
        out_path,
        len(index),
        trailer.index_offset + trailer.index_size * ENTRY_SIZE + HT_SPACE,
        time.perf_counter() - started,
    )
    return trailer


def import_raw(
    raw_path: PathLike,
    out_path: PathLike,
    uuid: str | None = None,
    parent_uuid: str | None = None,
    message: str = "",
    compress: str | None = None,
    block_size: int = 4096,
    tar: bool = False,
    zero_block: int = 4096,
) -> LsmtHeader:
    """Make a committed layer of a raw disk image, leaving out all-zero blocks.

    The image is scanned in `zero_block`-byte blocks; the mapped ranges are the runs of
    blocks that hold a non-zero byte, split at 16383 sectors. The virtual size is the
    image size rounded up to 512 bytes (a partial last sector reads as zeros). The other
    options are those of `commit_writable`. Returns the LSMT trailer written.
    """
    if zero_block <= 0 or zero_block % ALIGNMENT:
        raise FormatError(f"zero-detection block {zero_block} is not a multiple of {ALIGNMENT}")

    with open(raw_path, "rb", buffering=0) as raw:
        size = os.fstat(raw.fileno()).st_size
        virtual_size = -(-size // ALIGNMENT) * ALIGNMENT
        if virtual_size == 0:
            raise FormatError(f"{raw_path}: the raw image is empty; nothing to import")

        index = _nonzero_index(raw, size, zero_block)
        header = LsmtHeader(
            flags=FLAG_HEADER | FLAG_DATA | FLAG_SEALED,
            virtual_size=virtual_size,
            uuid=normalize_uuid(uuid),
            parent_uuid=normalize_uuid(parent_uuid, "parent uuid"),
            user_tag=_user_tag(message),
        )
        with _output(out_path, compress, block_size, tar) as out:
            trailer = compact([_RawSource(raw, size)], index, out, header)

    mapped = int(index.length.sum()) << SECTOR_SHIFT if len(index) else 0
    log.info(
        "imported %s to %s: virtual size %d, %d bytes mapped in %d segments",
        raw_path,
        out_path,
        virtual_size,
        mapped,
        len(index),
    )
    return trailer


class _RawSource:
    """A raw image read by sector; moffset = disk sector, zeros past the end of the file."""

    def __init__(self, raw: BinaryIO, size: int) -> None:
        self._fd = raw.fileno()
        self._size = size

    def read_data(self, moffset: int, length: int) -> bytes:
        offset = moffset << SECTOR_SHIFT
        nbytes = length << SECTOR_SHIFT
        data = os.pread(self._fd, nbytes, offset)
        while len(data) < nbytes and offset + len(data) < self._size:
            data += os.pread(self._fd, nbytes - len(data), offset + len(data))
        return data.ljust(nbytes, b"\0")


def _nonzero_index(raw: BinaryIO, size: int, zero_block: int) -> SegmentIndex:
    """Segments (moffset = offset) covering the blocks of `raw` that are not all zero."""
    block_sectors = zero_block >> SECTOR_SHIFT
    end_sector = -(-size // ALIGNMENT)
    chunk = max(zero_block, ZERO_SCAN_CHUNK // zero_block * zero_block)

    # One flag per block, computed a chunk at a time (the last block padded with zeros).
    flags = []
    fd = raw.fileno()
    for offset in range(0, size, chunk):
        data = os.pread(fd, min(chunk, size - offset), offset)
        data = data.ljust(-(-len(data) // zero_block) * zero_block, b"\0")
        words = np.frombuffer(data, np.uint8).reshape(-1, zero_block)
        flags.append(words.any(axis=1))
    nonzero = np.concatenate(flags) if flags else np.zeros(0, bool)

    # Runs of non-zero blocks -> [start, stop) sector ranges, clipped to the image.
    edges = np.diff(np.concatenate([[False], nonzero, [False]]).astype(np.int8))
    starts = np.flatnonzero(edges == 1) * block_sectors
    stops = np.minimum(np.flatnonzero(edges == -1) * block_sectors, end_sector)

    offsets: list[int] = []
    lengths: list[int] = []
    for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
        for piece in range(start, stop, MAX_SEGMENT_LENGTH):
            offsets.append(piece)
            lengths.append(min(MAX_SEGMENT_LENGTH, stop - piece))
    return SegmentIndex.from_fields(offsets, lengths, offsets)


def _user_tag(message: str) -> bytes:
    tag = message.encode("utf-8")
    if len(tag) > TAG_SIZE:
        raise FormatError(
            f"commit message is {len(tag)} bytes in UTF-8; at most {TAG_SIZE} fit in an "
            "LSMT header, shorten it"
        )
    return tag


@contextmanager
def _output(
    out_path: PathLike, compress: str | None, block_size: int, tar: bool
) -> Iterator[BinaryIO]:
    """A writable stream into `<out_path>.tmp`, with the requested wrappers.

    On success the wrappers are finished, the file fsynced and renamed to `out_path`; on
    failure the temporary file is removed.
    """
    final = Path(out_path)
    temporary = final.with_name(final.name + ".tmp")
    try:
        with open(temporary, "wb") as raw:
            tar_writer = TarWriter(raw) if tar else None
            target: BinaryIO = raw if tar_writer is None else tar_writer  # type: ignore

            zfile = None
            if compress is not None:
                zfile = ZFileWriter(
                    target,
                    algorithm=compress,
                    block_size=block_size,
                    verify=True,
                    overwrite_header=True,
                )
                target = zfile  # type: ignore[assignment]

            yield target

            if zfile is not None:
                zfile.close()
            if tar_writer is not None:
                tar_writer.close(os.fstat(raw.fileno()).st_mode)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
