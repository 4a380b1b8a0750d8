"""ZFile, OverlayBD's seekable block compression: header, index, reader and writer.

This module is the canonical description of the bytes; byte-compatible with
containerd/overlaybd (shared/specs/overlaybd-formats.md, section 2). Integers are
little-endian.

File layout
    ===================  ==========================================================
    [0, 512)             header: the 96-byte struct below, zero-padded to 512 bytes
    [512, 512 + D)       dictionary, D = dict_size (always 0; not implemented)
    blocks               block i: compressed bytes, then a u32 CRC if `verify`
    index                u32 per block: stored length of block i, CRC included
    [EOF - 512, EOF)     trailer: the same struct
    ===================  ==========================================================

Header / trailer struct (96 bytes)
    ====  ====  ==================  ================================================
    off   size  field               meaning
    ====  ====  ==================  ================================================
    0     8     magic0              ``ZFile\\0\\1\\0``
    8     16    magic1              ``tuji.yyf@Alibaba``
    24    4     size                96
    28    4     digest              raw CRC32C (seed 0) of the 512-byte block with
                                    this field zeroed; checked if `FLAG_DIGEST`
    32    8     flags               `FLAG_*` bits
    40    8     index_offset        bytes
    48    8     index_size          number of blocks (u32 index entries)
    56    8     original_file_size  bytes before compression
    64    4     index_crc           raw CRC32C (seed 0) of the index bytes
    68    4     reserved            0
    72    4     block_size          bytes of input per block, at most 64 KiB
    76    1     algo                0 mini-LZO (unsupported), 1 LZ4, 2 zstd
    77    1     level               stored, ignored (zstd is always level 3)
    78    1     use_dict            0
    79    1     pad                 0
    80    4     reserved            0
    84    4     dict_size           0
    88    1     verify              1: each block is followed by its CRC32C
    89    7     pad                 0
    ====  ====  ==================  ================================================

    Flag values written: initial header 0x13 (header | data | digest, only the options
    filled), trailer 0x16 (data | sealed | digest), and, with overwrite-header, the header
    rewritten at the end as 0x1B (header | data | overwrite | digest, every field filled).

Blocks
    The input is cut into `block_size` chunks (the last may be short). LZ4 blocks are the
    raw LZ4 block format (no frame, no size prefix); zstd blocks are one complete frame
    each. The block CRC is raw CRC32C with seed 100007 over the compressed bytes only.
    Block i starts at ``512 + dict_size + sum(stored length of blocks < i)``; the blocks
    fill the file exactly up to `index_offset`.

Reading (`ZFileReader`)
    The index comes from the header when it was overwritten (bit 3), otherwise from the
    trailer at ``size - 512``. A read fetches one contiguous compressed range covering the
    blocks it needs, checks each block's CRC, decompresses only those blocks and returns the
    requested slice.

    The per-block loop runs in C when the optional extension `_zfile_native` is built (see
    setup.py): it checks the CRCs with the CPU's CRC32C instruction, decompresses with the
    system liblz4/libzstd straight into the returned bytes, and releases the GIL. The
    pure-Python loop stays as the fallback and is always used while tracing records (it
    emits one event per block). `WORKBENCH_PURE_PYTHON=1` in the environment, or setting the
    module attribute `native` to None, forces the Python loop.

    A block that fails its CRC or does not decompress is healed when the source can `evict`
    (a cached registry blob, or a tar payload over one; see `blobs.common`): its compressed
    range is evicted and the whole read is made again, up to `READ_ATTEMPTS` reads in all as
    OverlayBD does, with a WARNING and a ("zfile", "evict") tracing event per eviction. Only
    then is the error raised, saying how many attempts were made; the block is evicted after
    the last failure too, so no wrong block stays cached. Without `evict` the first failure
    is raised. The retry lives in the error branch: a good read costs nothing more.

Caveats:
- dictionaries and mini-LZO (algo 0) are refused with `UnsupportedFormatError`; no writer
  produces them;
- the jump table is kept as a Python list of block starts for cheap scalar access: about
  36 bytes per block (36 MiB for a 4 GiB layer at 4 KiB blocks), more than OverlayBD's
  compact u64 + u16 table;
- the native and the Python loop may word a decompression failure differently (library
  messages differ, and the native one bounds the last block at its exact size, so an
  overlong last block is "does not decompress" instead of "decompresses to N bytes"); both
  raise `CorruptFileError` naming the block and its offset;
- healing evicts the failing block only; if several blocks of one read are bad, each costs
  an attempt, so a read with three bad blocks fails even if every re-fetch would be good;
- a CRC failure of the header, trailer or index (at open) is not healed: open again;
- a cache evicts and re-fetches whole refill blocks, so the bytes sharing one with a healed
  block are fetched again too; ZFile blocks among them are CRC-checked when read, but the
  headers and the index are checked only at open, so a corrupt re-fetch of them stays
  cached until the next open fails on it (a registry cannot serve a verifiable range);
- our compressed bytes need not equal OverlayBD's: it bundles lz4 1.8.x and the system
  libzstd; the format and every header field match, the block payloads depend on the
  library version (on layer1.lsmt: 535 of 1306 lz4 blocks and 838 of 1306 zstd blocks are
  identical with lz4 1.9.4 / zstandard 0.25).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import struct
import sys
import threading
import time
import types
from array import array
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import BinaryIO, Final, Literal

import crc32c as _crc32c
import lz4.block
import numpy as np
import zstandard

from workbench.blobs.common import LocalFile, RandomAccessFile, read_exact
from workbench.errors import (
    ChecksumError,
    CorruptFileError,
    FormatError,
    UnsupportedFormatError,
)
from workbench.formats.checksum import INIT_BLOCK, MASK32, SEED_BLOCK, crc32c_raw
from workbench.tracing import core as trace

__all__ = [
    "ALGORITHMS",
    "BLOCK_SIZES",
    "HEADER_SPACE",
    "Algorithm",
    "ZFileHeader",
    "ZFileReader",
    "ZFileWriter",
    "compress",
    "decompress",
    "is_zfile",
]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Constants

MAGIC0: Final = b"ZFile\x00\x01\x00"
MAGIC1: Final = b"tuji.yyf@Alibaba"

HEADER_SPACE: Final = 512
"""Bytes taken by the header (at 0) and by the trailer (at the end)."""

HEADER_STRUCT_SIZE: Final = 96

FLAG_HEADER: Final = 1 << 0
"""Set in a header, clear in a trailer."""
FLAG_DATA: Final = 1 << 1
"""Set in every file the writers make (data file)."""
FLAG_SEALED: Final = 1 << 2
"""Set in a trailer: the file is complete."""
FLAG_HEADER_OVERWRITE: Final = 1 << 3
"""The header was rewritten at the end and carries the index: the trailer need not be read."""
FLAG_DIGEST: Final = 1 << 4
"""The header digest and the index CRC are valid (always set by the writers)."""
FLAG_INDEX_COMPRESSED: Final = 1 << 5
"""Defined by OverlayBD, never set nor handled."""

FLAGS_INITIAL_HEADER: Final = FLAG_HEADER | FLAG_DATA | FLAG_DIGEST  # 0x13
FLAGS_TRAILER: Final = FLAG_DATA | FLAG_SEALED | FLAG_DIGEST  # 0x16
FLAGS_OVERWRITTEN_HEADER: Final = (
    FLAG_HEADER | FLAG_DATA | FLAG_HEADER_OVERWRITE | FLAG_DIGEST
)  # 0x1B

Algorithm = Literal["lz4", "zstd"]
"""Names of the supported compression algorithms."""

ALGO_MINILZO: Final = 0
ALGO_LZ4: Final = 1
ALGO_ZSTD: Final = 2
ALGORITHMS: Final[dict[str, int]] = {"lz4": ALGO_LZ4, "zstd": ALGO_ZSTD}
"""Algorithm name -> `algo` byte."""
_ALGORITHM_NAMES: Final = {code: name for name, code in ALGORITHMS.items()}

ZSTD_LEVEL: Final = 3
"""OverlayBD always compresses zstd blocks at level 3, whatever the header's level byte."""

BLOCK_SIZES: Final = (4096, 8192, 16384, 32768, 65536)
"""Block sizes the writers accept (the tools' 4..64 KiB powers of two)."""

MAX_BLOCK_SIZE: Final = 65536
"""Largest block size a reader accepts."""

MAX_INDEX_SIZE: Final = 1_000_000_000
"""Largest index (blocks) a reader accepts, as OverlayBD."""

CRC_SIZE: Final = 4

READ_ATTEMPTS: Final = 3
"""Reads of a range whose block fails before the error is raised (evicting it in between)."""

FAILURES: collections.Counter[str] = collections.Counter()
"""Bad blocks met by every reader of this process, by kind (``crc``, ``decompress``); counted
on the error path only, for metrics (`workbench.device.metrics`)."""

_REMEDY: Final = "the file is corrupt, fetch or copy it again"

CHUNK_SIZE: Final = 1 << 20
"""Bytes per read or write in the streaming helpers and the writer's output batching."""

_HEADER = struct.Struct("<8s16sIIQQQQIIIBBBBIIB7x")
assert _HEADER.size == HEADER_STRUCT_SIZE
_DIGEST_FIELD: Final = slice(28, 32)
_U32 = struct.Struct("<I")
_LITTLE_ENDIAN: Final = sys.byteorder == "little"


def _load_native() -> types.ModuleType | None:
    """The native decoder, or None when it is not built or WORKBENCH_PURE_PYTHON is set."""
    if os.environ.get("WORKBENCH_PURE_PYTHON", "") not in ("", "0"):
        log.debug("zfile: pure-Python block loop (WORKBENCH_PURE_PYTHON is set)")
        return None
    try:
        from workbench.formats import _zfile_native
    except ImportError as exc:
        log.debug("zfile: pure-Python block loop (native decoder not built: %s)", exc)
        return None
    log.debug(
        "zfile: native block loop (crc32c %s, lz4 %s, zstd %s)",
        _zfile_native.CRC32C_IMPLEMENTATION,
        _zfile_native.LZ4_VERSION,
        _zfile_native.ZSTD_VERSION,
    )
    return _zfile_native


native: types.ModuleType | None = _load_native()
"""The native decoder module (`_zfile_native`), or None to use the pure-Python loop."""


def _max_stored_length(block_size: int, verify: bool) -> int:
    """Longest stored block any compressor can produce for `block_size` input bytes.

    A block of random data grows: LZ4 adds up to size/255 + 16 bytes and zstd a frame header
    and about size/256. The margin is generous; the check only stops an index that would
    make a reader fetch megabytes for one block.
    """
    return block_size + block_size // 64 + 256 + CRC_SIZE * verify


# ---------------------------------------------------------------------------------------------
# Header and trailer


@dataclass(frozen=True)
class ZFileHeader:
    """The header or trailer of a ZFile; see the module docstring for the layout.

    `digest` is the value stored in the file (0 when built in memory); `pack()` always
    computes a fresh one when `FLAG_DIGEST` is set.
    """

    flags: int
    index_offset: int = 0
    index_size: int = 0
    original_file_size: int = 0
    index_crc: int = 0
    block_size: int = 4096
    algo: int = ALGO_LZ4
    level: int = 0
    use_dict: int = 0
    dict_size: int = 0
    verify: bool = True
    digest: int = 0

    @property
    def is_header(self) -> bool:
        return bool(self.flags & FLAG_HEADER)

    @property
    def is_data_file(self) -> bool:
        return bool(self.flags & FLAG_DATA)

    @property
    def is_sealed(self) -> bool:
        return bool(self.flags & FLAG_SEALED)

    @property
    def is_overwritten(self) -> bool:
        return bool(self.flags & FLAG_HEADER_OVERWRITE)

    @property
    def has_digest(self) -> bool:
        return bool(self.flags & FLAG_DIGEST)

    @property
    def algorithm(self) -> str:
        """ "lz4", "zstd", or "algo<N>" for a code the workbench does not know."""
        return _ALGORITHM_NAMES.get(self.algo, f"algo{self.algo}")

    @property
    def data_offset(self) -> int:
        """Where block 0 starts: after the header and the dictionary."""
        return HEADER_SPACE + self.dict_size

    def with_(self, **changes: object) -> ZFileHeader:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def pack(self) -> bytes:
        """The 512-byte block holding this header, with its digest computed."""
        block = bytearray(HEADER_SPACE)
        _HEADER.pack_into(
            block,
            0,
            MAGIC0,
            MAGIC1,
            HEADER_STRUCT_SIZE,
            0,
            self.flags,
            self.index_offset,
            self.index_size,
            self.original_file_size,
            self.index_crc,
            0,
            self.block_size,
            self.algo,
            self.level,
            self.use_dict,
            0,
            0,
            self.dict_size,
            int(self.verify),
        )
        if self.flags & FLAG_DIGEST:
            block[_DIGEST_FIELD] = _U32.pack(crc32c_raw(block))
        return bytes(block)

    @classmethod
    def unpack(cls, raw: bytes, name: str = "<zfile>", at: int = 0) -> ZFileHeader:
        """Parse the header or trailer in `raw` (the 512 bytes read at offset `at`).

        Raises `FormatError` without the ZFile magic, `CorruptFileError` if it is cut short
        or has a wrong size field, `ChecksumError` if the digest does not match.
        """
        if len(raw) < HEADER_SPACE:
            if raw[: len(MAGIC0)] == MAGIC0[: len(raw)] and raw:
                raise CorruptFileError(
                    f"{name}: ZFile header at offset {at} is truncated: "
                    f"{len(raw)} of {HEADER_SPACE} bytes; the file was cut short"
                )
            raise FormatError(f"{name}: no ZFile magic at offset {at}; not a ZFile")

        fields = _HEADER.unpack_from(raw, 0)
        magic0, magic1, size, digest, flags, index_offset, index_size, original_size = fields[:8]
        index_crc, _reserved, block_size, algo, level, use_dict, _pad, _reserved2 = fields[8:16]
        dict_size, verify = fields[16:]
        if magic0 != MAGIC0 or magic1 != MAGIC1:
            raise FormatError(
                f"{name}: no ZFile magic at offset {at} (found {magic0!r}); not a ZFile"
            )
        if size != HEADER_STRUCT_SIZE:
            raise CorruptFileError(
                f"{name}: ZFile header at offset {at}: size field is {size}, "
                f"expected {HEADER_STRUCT_SIZE}"
            )

        # The digest covers the whole 512-byte block with the digest field itself zeroed.
        if flags & FLAG_DIGEST:
            block = bytearray(raw[:HEADER_SPACE])
            block[_DIGEST_FIELD] = b"\0\0\0\0"
            actual = crc32c_raw(block)
            if actual != digest:
                raise ChecksumError(
                    f"{name}: ZFile {'header' if flags & FLAG_HEADER else 'trailer'} at "
                    f"offset {at}: digest mismatch: stored {digest:#010x}, computed "
                    f"{actual:#010x}; the file is corrupt, fetch or copy it again"
                )

        return cls(
            flags=flags,
            index_offset=index_offset,
            index_size=index_size,
            original_file_size=original_size,
            index_crc=index_crc,
            block_size=block_size,
            algo=algo,
            level=level,
            use_dict=use_dict,
            dict_size=dict_size,
            verify=bool(verify),
            digest=digest,
        )


def is_zfile(head: bytes) -> bool:
    """True if `head` (the first 512 bytes of a file) is a valid ZFile header.

    Checks the magics, the HEADER bit and, if the digest flag is set, the digest.
    """
    if len(head) < HEADER_SPACE or head[:8] != MAGIC0 or head[8:24] != MAGIC1:
        return False
    try:
        header = ZFileHeader.unpack(head[:HEADER_SPACE])
    except FormatError:
        return False
    return header.is_header


# ---------------------------------------------------------------------------------------------
# Reader


class ZFileReader:
    """The decompressed content of a ZFile, as a random-access file.

    `size` is the original file size. `pread` fetches one contiguous compressed range from
    `source` per call, checks every block's CRC (when the file has them and `check_crc`),
    decompresses only the blocks it needs and returns exactly the requested bytes.

    Raises (on open and on read) `FormatError` if `source` is not a ZFile,
    `CorruptFileError` for truncation, a bad index or a block that does not decompress,
    `ChecksumError` for a CRC mismatch, `UnsupportedFormatError` for mini-LZO or
    dictionaries. Thread-safe: no shared cursor, one zstd context per thread.

    Closing the reader closes `source`.
    """

    def __init__(self, source: RandomAccessFile, *, check_crc: bool = True) -> None:
        self.source = source
        self.name = source.name

        # The header tells whether it carries the index itself (overwrite-header variant).
        first = source.pread(0, HEADER_SPACE)
        self.header = ZFileHeader.unpack(first, self.name, 0)
        if not self.header.is_header:
            raise CorruptFileError(
                f"{self.name}: ZFile header at offset 0 has the HEADER flag clear "
                f"(flags {self.header.flags:#x}); a trailer where the header should be"
            )
        if self.header.is_overwritten:
            self.descriptor = self.header
            index_limit = source.size
            log.debug(
                "%s: overwritten header: index at %d, %d blocks",
                self.name,
                self.header.index_offset,
                self.header.index_size,
            )
        else:
            self.descriptor = self._read_trailer()
            index_limit = source.size - HEADER_SPACE
        self.trailer = None if self.header.is_overwritten else self.descriptor

        self._check_options(self.descriptor)
        self._load_index(index_limit)

        self.block_size: int = self.descriptor.block_size
        self.algorithm: str = self.descriptor.algorithm
        self.verify: bool = self.descriptor.verify
        self.check_crc = check_crc and self.verify
        self.block_count: int = self.descriptor.index_size
        self._size: int = self.descriptor.original_file_size
        self._tail = self._size - (self.block_count - 1) * self.block_size
        self._local = threading.local()
        self._crc_size = CRC_SIZE if self.verify else 0
        self._jump_view = memoryview(self.jump_table)
        self._algo = self.descriptor.algo

    # -- opening -----------------------------------------------------------------------------

    def _read_trailer(self) -> ZFileHeader:
        if not self.header.is_data_file:
            raise CorruptFileError(
                f"{self.name}: ZFile header flags {self.header.flags:#x} lack the DATA bit; "
                "not a ZFile data file"
            )
        at = self.source.size - HEADER_SPACE
        if at < HEADER_SPACE:
            raise CorruptFileError(
                f"{self.name}: ZFile of {self.source.size} bytes has no room for a trailer "
                f"(needs at least {2 * HEADER_SPACE}); the file was cut short"
            )
        raw = read_exact(self.source, at, HEADER_SPACE, "ZFile trailer")
        try:
            trailer = ZFileHeader.unpack(raw, self.name, at)
        except CorruptFileError:
            raise
        except FormatError:
            raise CorruptFileError(
                f"{self.name}: no ZFile trailer magic at offset {at} (end of file - 512); "
                "the file was cut short or is not sealed"
            ) from None
        wanted = FLAG_DATA | FLAG_SEALED
        if trailer.is_header or trailer.flags & wanted != wanted:
            raise CorruptFileError(
                f"{self.name}: ZFile trailer at offset {at} has flags {trailer.flags:#x}; "
                "a trailer must have HEADER clear and DATA and SEALED set"
            )
        return trailer

    def _check_options(self, desc: ZFileHeader) -> None:
        if desc.algo == ALGO_MINILZO:
            raise UnsupportedFormatError(
                f"{self.name}: ZFile compressed with mini-LZO (algo 0) is not supported; "
                "recompress it with lz4 or zstd"
            )
        if desc.algo not in _ALGORITHM_NAMES:
            raise CorruptFileError(
                f"{self.name}: ZFile algo byte is {desc.algo}; expected 1 (lz4) or 2 (zstd)"
            )
        if desc.use_dict or desc.dict_size:
            raise UnsupportedFormatError(
                f"{self.name}: ZFile uses a dictionary (use_dict {desc.use_dict}, dict_size "
                f"{desc.dict_size}); dictionaries are not supported, recompress without one"
            )
        if not 0 < desc.block_size <= MAX_BLOCK_SIZE:
            raise CorruptFileError(
                f"{self.name}: ZFile block_size is {desc.block_size}; expected 1..{MAX_BLOCK_SIZE}"
            )
        expected_blocks = math.ceil(desc.original_file_size / desc.block_size)
        if desc.index_size > MAX_INDEX_SIZE or desc.index_size != expected_blocks:
            raise CorruptFileError(
                f"{self.name}: ZFile index_size is {desc.index_size} blocks, but "
                f"original_file_size {desc.original_file_size} at block_size "
                f"{desc.block_size} needs {expected_blocks}"
            )

    def _load_index(self, index_limit: int) -> None:
        desc = self.descriptor
        index_bytes = desc.index_size * 4
        if desc.index_offset < desc.data_offset or desc.index_offset + index_bytes > index_limit:
            raise CorruptFileError(
                f"{self.name}: ZFile index of {desc.index_size} entries at offset "
                f"{desc.index_offset} does not fit in [{desc.data_offset}, {index_limit}); "
                "the file was cut short or its header is corrupt"
            )
        raw = read_exact(self.source, desc.index_offset, index_bytes, "ZFile index")
        if desc.has_digest:
            actual = crc32c_raw(raw)
            if actual != desc.index_crc:
                raise ChecksumError(
                    f"{self.name}: ZFile index at offset {desc.index_offset}: CRC mismatch: "
                    f"stored {desc.index_crc:#010x}, computed {actual:#010x}; the file is "
                    "corrupt, fetch or copy it again"
                )

        # Every stored block holds at least one compressed byte besides its CRC, and no
        # more than a compressor can produce for one block.
        lengths = np.frombuffer(raw, dtype="<u4")
        if lengths.size:
            smallest = CRC_SIZE * desc.verify + 1
            largest = _max_stored_length(desc.block_size, desc.verify)
            bad = np.flatnonzero((lengths < smallest) | (lengths > largest))
            if bad.size:
                block = int(bad[0])
                raise CorruptFileError(
                    f"{self.name}: ZFile index entry {block} (at offset "
                    f"{desc.index_offset + 4 * block}) says block {block} is "
                    f"{int(lengths[block])} bytes; expected {smallest}..{largest}"
                )

        # Jump table: start of every block, plus the end of the last one.
        starts = np.empty(desc.index_size + 1, dtype=np.uint64)
        starts[0] = desc.data_offset
        np.cumsum(lengths, dtype=np.uint64, out=starts[1:])
        starts[1:] += np.uint64(desc.data_offset)
        if int(starts[-1]) != desc.index_offset:
            raise CorruptFileError(
                f"{self.name}: ZFile blocks end at offset {int(starts[-1])} but the index "
                f"starts at {desc.index_offset}; the index does not describe this file"
            )
        self.jump_table = starts
        self._starts: list[int] = starts.tolist()

    # -- the random-access file ----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    def stored_range(self, offset: int, length: int) -> tuple[int, int]:
        """(offset, length) of the compressed bytes in `source` that hold decompressed
        [offset, offset + length): what a prefetcher reads to warm a cache below."""
        end = min(offset + length, self._size)
        if length <= 0 or offset >= end or offset < 0:
            return (0, 0)
        first, last = offset // self.block_size, (end - 1) // self.block_size
        return self._starts[first], self._starts[last + 1] - self._starts[first]

    def block_offsets(self) -> np.ndarray:
        """Start of every block in the compressed file, plus the end of the last (n + 1 u64)."""
        return self.jump_table.copy()

    def pread(self, offset: int, length: int) -> bytes:
        """Read `length` decompressed bytes at `offset`; short only at the end of the file."""
        recorder = trace.recorder
        if recorder is not None:
            start_ns = time.perf_counter_ns()

        end = min(offset + length, self._size)
        if length <= 0 or offset >= end:
            if recorder is not None:
                recorder.emit("zfile", "read", self.name, offset, length, start_ns, 0)
            return b""
        block_size = self.block_size
        first = offset // block_size
        last = (end - 1) // block_size
        base = self._starts[first]

        # One contiguous fetch covers every block the read needs.
        wanted = self._starts[last + 1] - base
        raw = self.source.pread(base, wanted)
        if len(raw) != wanted:
            raise CorruptFileError(
                f"{self.name}: ZFile blocks {first}..{last} at offset {base}: wanted "
                f"{wanted} bytes, got {len(raw)} (source size {self.source.size}); "
                "the file was cut short"
            )
        head = offset - first * block_size
        decoder = native
        try:
            if decoder is not None and recorder is None:
                return self._read_native(decoder, raw, first, last, head, end - offset)
            parts = self._decode_blocks(raw, self._starts[first : last + 2], first, recorder)
        except CorruptFileError as error:
            return self._heal(offset, length, error)

        # Trim the first and last blocks to the requested range; join copies once.
        stop = end - last * block_size
        if first == last:
            data = parts[0] if head == 0 and stop == len(parts[0]) else parts[0][head:stop]
        else:
            if head:
                parts[0] = memoryview(parts[0])[head:]
            if stop != len(parts[-1]):
                parts[-1] = memoryview(parts[-1])[:stop]
            data = b"".join(parts)

        if recorder is not None:
            recorder.emit("zfile", "read", self.name, offset, length, start_ns, len(data))
        return data

    def _read_native(
        self, decoder: types.ModuleType, raw: bytes, first: int, last: int, head: int, length: int
    ) -> bytes:
        """`length` bytes from `head` bytes into block `first`, decoded by the C loop."""
        block_size = self.block_size
        last_size = self._tail if last == self.block_count - 1 else block_size
        result = decoder.read_range(
            raw,
            self._jump_view[first : last + 2],
            block_size,
            last_size,
            self._algo,
            self._crc_size,
            self.check_crc,
            head,
            length,
        )
        if type(result) is bytes:
            return result
        raise self._native_error(result, raw, first)

    def _native_error(
        self, failure: tuple[int, str, int, int, object], raw: bytes, first: int
    ) -> FormatError:
        """The error the Python loop raises for the bad block the C loop reported."""
        position, kind, stored, _computed, detail = failure
        block = first + position
        base = self._starts[first]
        start = self._starts[block]
        if kind == "crc":
            payload = memoryview(raw)[start - base : self._starts[block + 1] - base - CRC_SIZE]
            return self._crc_error(block, start, payload, stored)
        if kind == "length":
            expected = self._tail if block == self.block_count - 1 else self.block_size
            rule = f"decompresses to {detail} bytes, not {expected}"
            return self._block_error(block, start, rule)
        return self._block_error(block, start, f"does not decompress: {detail}")

    def _decode_blocks(
        self, raw: bytes, bounds: list[int], first: int, recorder: trace.Recorder | None
    ) -> list[bytes]:
        """Check and decompress the blocks in `raw`, which starts at block `first`.

        The loop is the hot path: names are bound to locals, the CRC is compared against
        the library's inverted form to save an XOR, and tracing costs one comparison per
        block when off.
        """
        view = memoryview(raw)
        base = bounds[0]
        block_size = self.block_size
        final_block = self.block_count - 1
        tail = self._tail
        check_crc = self.check_crc
        crc_size = CRC_SIZE if self.verify else 0
        crc = _crc32c.crc32c
        unpack_crc = _U32.unpack_from
        is_lz4 = self.descriptor.algo == ALGO_LZ4
        if is_lz4:
            lz4_decompress = lz4.block.decompress
        else:
            dctx = self._zstd_context()
            frame_size = zstandard.frame_content_size

        parts: list[bytes] = []
        block = first
        start = bounds[0] - base
        for next_start in bounds[1:]:
            if recorder is not None:
                block_start_ns = time.perf_counter_ns()
            stop = next_start - base - crc_size
            payload = view[start:stop]
            if check_crc and crc(payload, INIT_BLOCK) != unpack_crc(raw, stop)[0] ^ MASK32:
                raise self._crc_error(block, base + start, payload, unpack_crc(raw, stop)[0])
            try:
                if is_lz4:
                    data = lz4_decompress(payload, block_size)  # positional: no keyword parsing
                else:
                    # A corrupt frame header may claim a huge content size; zstandard would
                    # try to allocate it, so refuse before decompressing.
                    if frame_size(payload) > block_size:
                        raise zstandard.ZstdError("frame content size exceeds the block size")
                    data = dctx.decompress(payload, max_output_size=block_size)
            except (lz4.block.LZ4BlockError, zstandard.ZstdError) as exc:
                raise self._block_error(
                    block, base + start, f"does not decompress: {exc}"
                ) from None
            if len(data) != block_size and (block != final_block or len(data) != tail):
                expected = tail if block == final_block else block_size
                raise self._block_error(
                    block, base + start, f"decompresses to {len(data)} bytes, not {expected}"
                )
            parts.append(data)
            if recorder is not None:
                recorder.emit(
                    "zfile",
                    "block",
                    self.name,
                    base + start,
                    next_start - base - start,
                    block_start_ns,
                    len(data),
                )
            start = next_start - base
            block += 1
        return parts

    def _heal(self, offset: int, length: int, error: CorruptFileError) -> bytes:
        """Evict the block `error` names and read again, up to `READ_ATTEMPTS` reads in all.

        Re-raises `error` at once if the source cannot evict, if the error is not about one
        block, or if this thread is already healing (the retry is itself a `pread`).
        """
        evict = getattr(self.source, "evict", None)
        bad_block = getattr(error, "zfile_block", None)
        if evict is None or bad_block is None or getattr(self._local, "healing", False):
            raise error

        # The last eviction too: no wrong block stays in a cache below once we give up.
        self._local.healing = True
        try:
            for attempt in range(1, READ_ATTEMPTS + 1):
                self._evict_block(evict, bad_block, error, attempt)
                if attempt == READ_ATTEMPTS:
                    break
                try:
                    return self.pread(offset, length)
                except CorruptFileError as again:
                    bad_block = getattr(again, "zfile_block", None)
                    if bad_block is None:
                        raise
                    error = again
        finally:
            self._local.healing = False

        # Every attempt failed: the source itself serves bad bytes.
        message = str(error).removesuffix(_REMEDY) + (
            f"still wrong after {READ_ATTEMPTS} attempts, the block evicted and fetched again "
            "after each; the source serves corrupt bytes, check the blob it comes from"
        )
        raise type(error)(message) from None

    def _evict_block(
        self, evict: Callable[[int, int], None], block: int, error: Exception, attempt: int
    ) -> None:
        """Forget the compressed bytes of `block` in the source, traced and logged."""
        recorder = trace.recorder
        start_ns = time.perf_counter_ns()
        start = self._starts[block]
        stored = self._starts[block + 1] - start
        log.warning(
            "%s: ZFile block %d at offset %d failed (attempt %d of %d): %s; evicting its %d "
            "compressed bytes and reading again",
            self.name,
            block,
            start,
            attempt,
            READ_ATTEMPTS,
            error,
            stored,
        )
        evict(start, stored)
        if recorder is not None:
            recorder.emit("zfile", "evict", self.name, start, stored, start_ns, 0)

    def _zstd_context(self) -> zstandard.ZstdDecompressor:
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        return dctx

    def _crc_error(self, block: int, at: int, payload: memoryview, stored: int) -> ChecksumError:
        FAILURES["crc"] += 1
        actual = crc32c_raw(payload, SEED_BLOCK)
        error = ChecksumError(
            f"{self.name}: ZFile block {block} at offset {at}: CRC mismatch: stored "
            f"{stored:#010x}, computed {actual:#010x} over {len(payload)} compressed bytes; "
            + _REMEDY
        )
        error.zfile_block = block  # type: ignore[attr-defined]  # read by `_heal`
        return error

    def _block_error(self, block: int, at: int, rule: str) -> CorruptFileError:
        FAILURES["decompress"] += 1
        error = CorruptFileError(
            f"{self.name}: ZFile block {block} at offset {at} ({self.algorithm}) {rule}; " + _REMEDY
        )
        error.zfile_block = block  # type: ignore[attr-defined]  # read by `_heal`
        return error

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> ZFileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ZFileReader({self.name!r}, size={self._size}, {self.algorithm}, "
            f"block_size={self.block_size}, blocks={self.block_count}, verify={self.verify})"
        )


# ---------------------------------------------------------------------------------------------
# Writer


class ZFileWriter:
    """Build a ZFile by streaming: `write()` any amount, `close()` writes index and trailer.

    `out` needs `write`, `seek` and `tell`; the ZFile starts at `out.tell()`. Memory stays
    bounded: one pending block, a batch of compressed output (`CHUNK_SIZE`) and the index
    (4 bytes per block). With `overwrite_header`, `close()` rewrites the header with every
    field filled (flag 0x1B) so readers can skip the trailer, as `overlaybd-commit -z` does.

    Raises `FormatError` for a block size or algorithm OverlayBD's tools do not accept.
    """

    def __init__(
        self,
        out: BinaryIO,
        algorithm: str = "lz4",
        block_size: int = 4096,
        verify: bool = True,
        overwrite_header: bool = False,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise FormatError(
                f"unknown ZFile algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}"
            )
        if block_size not in BLOCK_SIZES:
            raise FormatError(
                f"ZFile block size {block_size} is not allowed; choose one of "
                f"{', '.join(map(str, BLOCK_SIZES))} bytes (powers of two, 4 KiB..64 KiB)"
            )
        self.out = out
        self.algorithm = algorithm
        self.block_size = block_size
        self.verify = verify
        self.overwrite_header = overwrite_header
        self.original_size = 0
        self.trailer: ZFileHeader | None = None

        self._options = ZFileHeader(
            flags=FLAGS_INITIAL_HEADER,
            block_size=block_size,
            algo=ALGORITHMS[algorithm],
            verify=verify,
        )
        self._base = out.tell()
        self._position = HEADER_SPACE
        self._pending = bytearray()
        self._batch = bytearray()
        self._lengths = array("I")
        if algorithm == "lz4":
            self._compress = lambda block: lz4.block.compress(block, store_size=False)
        else:
            self._compress = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress
        out.write(self._options.pack())

    @property
    def compressed_size(self) -> int:
        """Bytes of ZFile produced so far (all of it once closed)."""
        return self._position + len(self._batch)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append `data` to the content; returns its length."""
        if self.trailer is not None:
            raise ValueError("write to a closed ZFileWriter")
        view = memoryview(data).cast("B")
        size = len(view)
        block_size = self.block_size

        # Complete a pending partial block first, then compress whole blocks straight from
        # the caller's buffer and keep the rest for later.
        start = 0
        if self._pending:
            start = min(block_size - len(self._pending), size)
            self._pending += view[:start]
            if len(self._pending) == block_size:
                self._add_block(self._pending)
                self._pending = bytearray()
        whole_end = start + (size - start) // block_size * block_size
        for at in range(start, whole_end, block_size):
            self._add_block(view[at : at + block_size])
        if whole_end < size:
            self._pending += view[whole_end:]

        self.original_size += size
        return size

    def _add_block(self, block: bytes | bytearray | memoryview) -> None:
        compressed = self._compress(block)
        self._batch += compressed
        stored = len(compressed)
        if self.verify:
            self._batch += _U32.pack(crc32c_raw(compressed, SEED_BLOCK))
            stored += CRC_SIZE
        self._lengths.append(stored)
        if len(self._batch) >= CHUNK_SIZE:
            self._flush()

    def _flush(self) -> None:
        self.out.write(self._batch)
        self._position += len(self._batch)
        self._batch = bytearray()

    def close(self) -> ZFileHeader:
        """Write the last block, the index and the trailer; returns the trailer.

        Closing twice returns the same trailer. Does not close `out`.
        """
        if self.trailer is not None:
            return self.trailer
        if self._pending:
            self._add_block(self._pending)
            self._pending = bytearray()
        self._flush()

        # Index: one u32 LE stored length per block, right after the blocks.
        lengths = self._lengths
        if not _LITTLE_ENDIAN:
            lengths = array("I", lengths)
            lengths.byteswap()
        index = lengths.tobytes()
        index_offset = self._position
        self.out.write(index)
        self._position += len(index)

        trailer = self._options.with_(
            flags=FLAGS_TRAILER,
            index_offset=index_offset,
            index_size=len(self._lengths),
            original_file_size=self.original_size,
            index_crc=crc32c_raw(index),
        )
        self.out.write(trailer.pack())
        self._position += HEADER_SPACE

        if self.overwrite_header:
            self.out.seek(self._base)
            self.out.write(trailer.with_(flags=FLAGS_OVERWRITTEN_HEADER).pack())
            self.out.seek(self._base + self._position)

        self.trailer = trailer
        log.debug(
            "zfile: wrote %d blocks, %d -> %d bytes (%s, block size %d)",
            trailer.index_size,
            self.original_size,
            self._position,
            self.algorithm,
            self.block_size,
        )
        return trailer

    def __enter__(self) -> ZFileWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # On error the output is left incomplete (no trailer) rather than sealed with
        # partial content; callers write to a temporary file and drop it.
        if exc_type is None:
            self.close()


# ---------------------------------------------------------------------------------------------
# File helpers


def compress(
    src_path: str | os.PathLike[str],
    dst_path: str | os.PathLike[str],
    *,
    algorithm: str = "lz4",
    block_size: int = 4096,
    verify: bool = True,
    overwrite_header: bool = False,
    tar: bool = False,
) -> ZFileHeader:
    """Compress the file at `src_path` into a ZFile at `dst_path`, streaming in 1 MiB chunks.

    With `tar`, the ZFile is wrapped in OverlayBD's single-entry tar (`formats.tar`).
    Writes `dst_path` directly (truncating it); returns the trailer.
    """
    from workbench.formats.tar import TarWriter

    with open(src_path, "rb") as src, open(dst_path, "wb") as dst:
        target: BinaryIO = TarWriter(dst) if tar else dst  # type: ignore[assignment]
        writer = ZFileWriter(
            target,
            algorithm=algorithm,
            block_size=block_size,
            verify=verify,
            overwrite_header=overwrite_header,
        )
        while chunk := src.read(CHUNK_SIZE):
            writer.write(chunk)
        trailer = writer.close()
        if tar:
            target.close()  # type: ignore[call-arg]
    return trailer


def decompress(src_path: str | os.PathLike[str], dst_path: str | os.PathLike[str]) -> int:
    """Decompress the ZFile at `src_path` (tar-wrapped or not) into `dst_path`.

    Reads and checks every block; returns the number of bytes written. Raises `FormatError`
    if the input is not a ZFile.
    """
    from workbench.formats.detect import unwrap

    unwrapped = unwrap(LocalFile(src_path))
    try:
        if unwrapped.zfile is None:
            raise FormatError(
                f"{os.fspath(src_path)}: not a ZFile (found layers: "
                f"{', '.join(unwrapped.layers) or 'none'}); nothing to decompress"
            )
        reader = unwrapped.zfile
        step = max(CHUNK_SIZE // reader.block_size, 1) * reader.block_size
        with open(dst_path, "wb") as dst:
            for offset in range(0, reader.size, step):
                dst.write(reader.pread(offset, step))
        return reader.size
    finally:
        unwrapped.close()
