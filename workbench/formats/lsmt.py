"""LSMT, OverlayBD's layered block format: header, trailer and segment index.

This module is the canonical description of the bytes; the layer readers and writers in
`workbench.image` refer to it. Byte-compatible with containerd/overlaybd (see
shared/specs/overlaybd-formats.md, section 1). All integers are little-endian.

Header and trailer
    Each is a 390-byte packed struct, zero-padded to a 4 KiB block (`HT_SPACE`):

    ====  ====  ==============  ===================================================
    off   size  field           meaning
    ====  ====  ==============  ===================================================
    0     8     magic0          ``LSMT\\0\\1\\2\\0``
    8     16    magic1          a fixed UUID (`MAGIC1`)
    24    4     size            390, the struct size
    28    4     flags           `FLAG_*` bits
    32    8     index_offset    bytes
    40    8     index_size      number of 16-byte entries (not bytes)
    48    8     virtual_size    bytes of the virtual disk
    56    37    uuid            text UUID, uppercase, NUL-terminated
    93    37    parent_uuid     text UUID of the layer below
    130   2     reserved        0
    132   1     version         1
    133   1     sub_version     1
    134   256   user_tag        commit message, zero-padded
    ====  ====  ==============  ===================================================

Segment mapping (one index entry, 16 bytes, two u64 words)
    w0 = offset | length << 50         offset: first sector on the virtual disk (50 bits),
                                       length: sectors, 1..16383 (14 bits)
    w1 = moffset | zeroed << 55 | tag << 56
                                       moffset: sector inside the layer's own file (55 bits),
                                       zeroed: the range reads as zeros and hides lower layers,
                                       tag: which file of a stack serves the range (runtime)

    An entry whose offset is `INVALID_OFFSET` is padding; readers drop it.

Layer files
    committed (sealed) layer: header(0x07) | data | index padded to 256 entries | trailer(0x06)
    writable data file:       header(0x03, 0x13 if sparse) | appended data
    writable index file:      header(0x01, index_offset=4096) | appended entries

In memory
    `SegmentIndex` keeps the 16 bytes per entry, but re-arranged so that one array sorts by
    offset: `keys = offset << 14 | length` and `mappings = w1`. Searching a sector is then a
    `searchsorted` over a contiguous u64 array, and the fields decode from the found entries
    only.
"""

from __future__ import annotations

import struct
import uuid as uuid_module
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Final

import numpy as np

from workbench.errors import CorruptFileError, FormatError

__all__ = [
    "ALIGNMENT",
    "HT_SPACE",
    "MAX_IO_SIZE",
    "MAX_RO_INDEX_SIZE",
    "MAX_SEGMENT_LENGTH",
    "MAX_STACK_LAYERS",
    "NULL_UUID",
    "LsmtHeader",
    "SegmentIndex",
    "is_lsmt",
    "normalize_uuid",
]

# ---------------------------------------------------------------------------------------------
# Constants

ALIGNMENT: Final = 512
"""Bytes per sector; every offset and length in an index is in sectors."""

SECTOR_SHIFT: Final = 9

HT_SPACE: Final = 4096
"""Bytes taken by the header (at 0) and by the trailer (at the end)."""

HEADER_STRUCT_SIZE: Final = 390

MAGIC0: Final = b"LSMT\x00\x01\x02\x00"
MAGIC1: Final = bytes.fromhex("657e63d29444084ca2d2c8ec4fcfae8a")

TAG_SIZE: Final = 256
"""Bytes of the user tag (commit message), zero-padded."""

UUID_TEXT_SIZE: Final = 37
NULL_UUID: Final = "00000000-0000-0000-0000-000000000000"

MAX_STACK_LAYERS: Final = 255
MAX_RO_INDEX_SIZE: Final = 1_000_000
"""Largest index (entries) OverlayBD accepts in a read-only layer's trailer."""

MAX_INDEX_SIZE: Final = 128_000_000
"""Largest writable or merged index (entries)."""

MAX_IO_SIZE: Final = 4 << 20
"""OverlayBD splits reads and writes at 4 MiB."""

MAX_SEGMENT_LENGTH: Final = (1 << 14) - 1
"""Longest segment, in sectors (16383, just under 8 MiB)."""

INDEX_PAD_COMMITTED: Final = 256
"""A committed layer's index is padded with invalid entries to a multiple of 256 (4 KiB)."""

INDEX_PAD_SEALED: Final = 32
"""A sealed writable layer's index is padded to a multiple of 32 entries (512 B)."""

FLAG_HEADER: Final = 1 << 0
"""Set in a header, clear in a trailer."""
FLAG_DATA: Final = 1 << 1
"""Set in a data (or committed) file, clear in a writable index file."""
FLAG_SEALED: Final = 1 << 2
"""The file is sealed: it ends with an index and a trailer."""
FLAG_SPARSE: Final = 1 << 4
"""A sparse writable layer: logical offset X is stored at file offset 4096 + X."""

# Bit fields of an index entry.
OFFSET_BITS: Final = 50
LENGTH_BITS: Final = 14
MOFFSET_BITS: Final = 55
INVALID_OFFSET: Final = (1 << OFFSET_BITS) - 1
"""Offset of a padding entry; readers drop such entries."""

_OFFSET_MASK: Final = np.uint64((1 << OFFSET_BITS) - 1)
_LENGTH_MASK: Final = np.uint64((1 << LENGTH_BITS) - 1)
_MOFFSET_MASK: Final = np.uint64((1 << MOFFSET_BITS) - 1)
_U64 = np.dtype("<u8")
_SORT_PROBES_ABOVE: Final = 4096

_HEADER = struct.Struct("<8s16sIIQQQ37s37sHBB256s")
assert _HEADER.size == HEADER_STRUCT_SIZE


# ---------------------------------------------------------------------------------------------
# UUIDs


def normalize_uuid(text: str | None, what: str = "uuid") -> str:
    """Return `text` in OverlayBD's form (36 uppercase hex digits with dashes); None -> null.

    Raises `FormatError` naming `what` if `text` is not a UUID.
    """
    if text is None or text == "":
        return NULL_UUID
    try:
        value = uuid_module.UUID(text)
    except ValueError:
        raise FormatError(
            f"{what} {text!r} is not a UUID; expected 32 hex digits as "
            "XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX"
        ) from None
    return str(value).upper()


def _decode_uuid(raw: bytes, name: str, field: str) -> str:
    text = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    if text == "":
        return NULL_UUID
    try:
        return normalize_uuid(text, field)
    except FormatError as exc:
        raise CorruptFileError(f"{name}: header field {field}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Header and trailer


@dataclass(frozen=True)
class LsmtHeader:
    """The header or trailer of an LSMT file; see the module docstring for the layout."""

    flags: int
    index_offset: int = 0
    index_size: int = 0
    virtual_size: int = 0
    uuid: str = NULL_UUID
    parent_uuid: str = NULL_UUID
    user_tag: bytes = b""
    version: int = 1
    sub_version: int = 1

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
    def is_sparse(self) -> bool:
        return bool(self.flags & FLAG_SPARSE)

    @property
    def message(self) -> str:
        """The user tag as text (the commit message)."""
        return self.user_tag.rstrip(b"\0").decode("utf-8", "replace")

    def with_(self, **changes: object) -> LsmtHeader:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def pack(self) -> bytes:
        """The 4 KiB block holding this header."""
        if len(self.user_tag) > TAG_SIZE:
            raise FormatError(
                f"user tag (commit message) is {len(self.user_tag)} bytes; "
                f"at most {TAG_SIZE} fit in an LSMT header, shorten it"
            )
        packed = _HEADER.pack(
            MAGIC0,
            MAGIC1,
            HEADER_STRUCT_SIZE,
            self.flags,
            self.index_offset,
            self.index_size,
            self.virtual_size,
            normalize_uuid(self.uuid).encode("ascii") + b"\0",
            normalize_uuid(self.parent_uuid, "parent uuid").encode("ascii") + b"\0",
            0,
            self.version,
            self.sub_version,
            self.user_tag.ljust(TAG_SIZE, b"\0"),
        )
        return packed.ljust(HT_SPACE, b"\0")

    @classmethod
    def unpack(cls, raw: bytes, name: str = "<lsmt>", at: int = 0) -> LsmtHeader:
        """Parse a header or trailer from `raw` (at least 390 bytes read at offset `at`).

        Raises `FormatError` if the magic does not match, `CorruptFileError` if it is cut
        short or its size field is wrong.
        """
        if len(raw) < HEADER_STRUCT_SIZE:
            raise CorruptFileError(
                f"{name}: LSMT header at offset {at} is truncated: "
                f"{len(raw)} of {HEADER_STRUCT_SIZE} bytes"
            )
        fields = _HEADER.unpack_from(raw, 0)
        (magic0, magic1, size, flags, index_offset, index_size, virtual_size) = fields[:7]
        uuid_raw, parent_raw, _reserved, version, sub_version, user_tag = fields[7:]
        if magic0 != MAGIC0 or magic1 != MAGIC1:
            raise FormatError(
                f"{name}: no LSMT magic at offset {at} (found {magic0[:8]!r}); "
                "not an LSMT layer file"
            )
        if size != HEADER_STRUCT_SIZE:
            raise CorruptFileError(
                f"{name}: LSMT header at offset {at} has size field {size}, "
                f"expected {HEADER_STRUCT_SIZE}"
            )
        return cls(
            flags=flags,
            index_offset=index_offset,
            index_size=index_size,
            virtual_size=virtual_size,
            uuid=_decode_uuid(uuid_raw, name, "uuid"),
            parent_uuid=_decode_uuid(parent_raw, name, "parent_uuid"),
            user_tag=user_tag.rstrip(b"\0"),
            version=version,
            sub_version=sub_version,
        )


def is_lsmt(head: bytes) -> bool:
    """Whether `head` (the first bytes of a file) starts with the LSMT magics."""
    return head[:8] == MAGIC0 and head[8:24] == MAGIC1


# ---------------------------------------------------------------------------------------------
# Segment index


@dataclass(frozen=True, eq=False)
class SegmentIndex:
    """A sorted, non-overlapping list of segment mappings, 16 bytes per entry.

    `keys[i] = offset << 14 | length` and `mappings[i] = moffset | zeroed << 55 | tag << 56`
    (the on-disk w1). Both are contiguous little-endian u64 arrays of equal length, sorted by
    offset. Instances are immutable; operations return new indexes.

    Offsets, lengths and moffsets are in 512-byte sectors.
    """

    keys: np.ndarray
    mappings: np.ndarray

    # Construction ----------------------------------------------------------------------

    @classmethod
    def empty(cls) -> SegmentIndex:
        return cls(np.zeros(0, _U64), np.zeros(0, _U64))

    @classmethod
    def from_fields(
        cls,
        offset: np.ndarray | list[int],
        length: np.ndarray | list[int],
        moffset: np.ndarray | list[int],
        zeroed: np.ndarray | list[bool] | None = None,
        tag: np.ndarray | list[int] | None = None,
    ) -> SegmentIndex:
        """Build from field arrays; the entries must already be sorted and non-overlapping."""
        offset = np.asarray(offset, _U64)
        keys = (offset << np.uint64(LENGTH_BITS)) | np.asarray(length, _U64)
        mappings = np.asarray(moffset, _U64).copy()
        if zeroed is not None:
            mappings |= np.asarray(zeroed, _U64) << np.uint64(55)
        if tag is not None:
            mappings |= np.asarray(tag, _U64) << np.uint64(56)
        return cls(np.ascontiguousarray(keys), np.ascontiguousarray(mappings))

    @classmethod
    def from_raw(cls, raw: np.ndarray) -> SegmentIndex:
        """Convert on-disk entries (an (N, 2) u64 array of w0, w1) dropping padding entries.

        The entries are taken in the given order; call `check_sorted` to validate them.
        """
        w0 = raw[:, 0]
        w1 = raw[:, 1]
        offset = w0 & _OFFSET_MASK
        valid = offset != np.uint64(INVALID_OFFSET)
        if not valid.all():
            w0, w1, offset = w0[valid], w1[valid], offset[valid]
        keys = (offset << np.uint64(LENGTH_BITS)) | (w0 >> np.uint64(OFFSET_BITS))
        return cls(np.ascontiguousarray(keys, _U64), np.ascontiguousarray(w1, _U64))

    @staticmethod
    def parse_raw(data: bytes | bytearray | memoryview) -> np.ndarray:
        """On-disk entries of `data` (a multiple of 16 bytes) as an (N, 2) u64 array."""
        return np.frombuffer(data, _U64).reshape(-1, 2)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> SegmentIndex:
        """Parse on-disk entries, dropping padding entries, in the given order."""
        return cls.from_raw(cls.parse_raw(data))

    # Fields ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def offset(self) -> np.ndarray:
        return self.keys >> np.uint64(LENGTH_BITS)

    @property
    def length(self) -> np.ndarray:
        return self.keys & _LENGTH_MASK

    @property
    def end(self) -> np.ndarray:
        return self.offset + self.length

    @property
    def moffset(self) -> np.ndarray:
        return self.mappings & _MOFFSET_MASK

    @property
    def zeroed(self) -> np.ndarray:
        return ((self.mappings >> np.uint64(55)) & np.uint64(1)).astype(bool)

    @property
    def tag(self) -> np.ndarray:
        return (self.mappings >> np.uint64(56)).astype(np.uint8)

    def with_tag(self, tag: int | np.ndarray) -> SegmentIndex:
        """The same entries with their tag set to `tag` (a scalar or an array)."""
        cleared = self.mappings & ~(np.uint64(0xFF) << np.uint64(56))
        tagged = cleared | (np.asarray(tag, _U64) << np.uint64(56))
        return SegmentIndex(self.keys, np.ascontiguousarray(tagged, _U64))

    def to_raw(self) -> np.ndarray:
        """The entries in on-disk form, an (N, 2) u64 array of w0, w1."""
        raw = np.empty((len(self), 2), _U64)
        raw[:, 0] = self.offset | (self.length << np.uint64(OFFSET_BITS))
        raw[:, 1] = self.mappings
        return raw

    def to_bytes(self, pad_to: int = 1) -> bytes:
        """On-disk bytes, padded with invalid entries to a multiple of `pad_to` entries."""
        raw = self.to_raw()
        missing = -len(raw) % pad_to
        if missing:
            padding = np.zeros((missing, 2), _U64)
            padding[:, 0] = INVALID_OFFSET
            raw = np.concatenate([raw, padding])
        return raw.astype("<u8", copy=False).tobytes()

    def to_frame(self):  # -> pandas.DataFrame
        """The entries as a DataFrame: offset, length, moffset, zeroed, tag (sectors)."""
        import pandas as pd

        return pd.DataFrame(
            {
                "offset": self.offset,
                "length": self.length,
                "moffset": self.moffset,
                "zeroed": self.zeroed,
                "tag": self.tag,
            }
        )

    # Validation ------------------------------------------------------------------------

    def check_sorted(self, name: str) -> None:
        """Raise `CorruptFileError` unless entries are sorted, non-overlapping, non-empty."""
        if len(self) == 0:
            return
        length = self.length
        empty = np.flatnonzero(length == 0)
        if len(empty):
            i = int(empty[0])
            raise CorruptFileError(
                f"{name}: index entry {i} (offset {int(self.offset[i])} sectors) has length 0"
            )
        bad = np.flatnonzero(self.end[:-1] > self.offset[1:])
        if len(bad):
            i = int(bad[0])
            raise CorruptFileError(
                f"{name}: index entries {i} and {i + 1} overlap or are out of order: "
                f"[{int(self.offset[i])}, {int(self.end[i])}) then "
                f"[{int(self.offset[i + 1])}, {int(self.end[i + 1])}) sectors; "
                "a read-only layer's index must be sorted and non-overlapping"
            )

    def check_data_range(self, name: str, first_sector: int, end_sector: int) -> None:
        """Raise `CorruptFileError` unless each data entry lies in [first, end) sectors.

        Zeroed entries carry no data; only their start is checked (moffset <= end).
        """
        if len(self) == 0:
            return
        moffset = self.moffset
        mend = moffset + self.length
        zeroed = self.zeroed
        data_bad = ~zeroed & ((moffset < first_sector) | (mend > end_sector))
        zero_bad = zeroed & (moffset > end_sector)
        bad = np.flatnonzero(data_bad | zero_bad)
        if len(bad):
            i = int(bad[0])
            raise CorruptFileError(
                f"{name}: index entry {i} maps sectors [{int(self.offset[i])}, "
                f"{int(self.end[i])}) to file sectors [{int(moffset[i])}, {int(mend[i])}), "
                f"outside the data area [{first_sector}, {end_sector})"
            )

    # Lookups ---------------------------------------------------------------------------

    def find(self, sectors: np.ndarray | list[int] | int) -> np.ndarray:
        """For each sector, the position of the entry that covers it, or -1 (batched).

        One `searchsorted` over the keys, then a bound check on the found entries only.
        Unsorted probes are sorted first: numpy's search reuses the last position as a hint,
        so sorted probes run about ten times faster than random ones, which pays for the sort.
        """
        sectors = np.atleast_1d(np.asarray(sectors, _U64))
        order = None
        if len(sectors) > _SORT_PROBES_ABOVE and (np.diff(sectors).view(np.int64) < 0).any():
            order = np.argsort(sectors)
            sectors = sectors[order]

        probe = (sectors << np.uint64(LENGTH_BITS)) | _LENGTH_MASK
        position = np.searchsorted(self.keys, probe, side="right").astype(np.int64) - 1
        found = position >= 0
        clipped = np.where(found, position, 0)
        key = self.keys[clipped] if len(self) else np.zeros_like(sectors)
        end = (key >> np.uint64(LENGTH_BITS)) + (key & _LENGTH_MASK)
        result = np.where(found & (sectors < end), position, -1)

        if order is not None:
            unsorted = np.empty_like(result)
            unsorted[order] = result
            result = unsorted
        return result

    def find_one(self, sector: int) -> int:
        """The position of the entry that covers `sector`, or -1: `find` for one sector."""
        keys = self._key_view
        position = bisect_right(keys, (sector << LENGTH_BITS) | MAX_SEGMENT_LENGTH) - 1
        if position >= 0:
            key = keys[position]
            if sector < (key >> LENGTH_BITS) + (key & MAX_SEGMENT_LENGTH):
                return position
        return -1

    def cover(self, first: int, count: int) -> tuple[int, int] | None:
        """``(entry offset, w1)`` of the one entry covering all of sectors [first, first+count).

        None if no single entry does (a gap, or the range crosses entries). The fast path of a
        small read: one bisect and two memoryview lookups, no arrays made.
        """
        keys = self._key_view
        position = bisect_right(keys, (first << LENGTH_BITS) | MAX_SEGMENT_LENGTH) - 1
        if position < 0:
            return None
        key = keys[position]
        offset = key >> LENGTH_BITS
        if offset + (key & MAX_SEGMENT_LENGTH) < first + count:
            return None
        return offset, self._mapping_view[position]

    @cached_property
    def _mapping_view(self) -> memoryview:
        """The w1 words as a memoryview of Python ints, made once (as `_key_view`)."""
        return _u64_view(self.mappings)

    def span(self, offset: int, length: int) -> tuple[int, int]:
        """Positions [first, stop) of the entries that overlap sectors [offset, offset+length).

        The scalar path of a read: `bisect` over a memoryview of the keys costs about 0.5 us,
        a numpy `searchsorted` on one value about 4 us, and neither copies the index.
        """
        keys = self._key_view
        first = bisect_right(keys, (offset << LENGTH_BITS) | MAX_SEGMENT_LENGTH)
        if first > 0:
            key = keys[first - 1]
            if (key >> LENGTH_BITS) + (key & MAX_SEGMENT_LENGTH) > offset:
                first -= 1
        stop = bisect_left(keys, (offset + length) << LENGTH_BITS, first)
        return first, max(first, stop)

    @cached_property
    def _key_view(self) -> memoryview:
        """The keys as a memoryview of Python ints, made once (the index is immutable).

        A `cached_property` rather than a property: after the first use it is a plain
        attribute, which the read path's few-microsecond budget notices."""
        return _u64_view(self.keys)

    def slice(self, first: int, stop: int) -> SegmentIndex:
        return SegmentIndex(self.keys[first:stop], self.mappings[first:stop])

    def __repr__(self) -> str:
        if len(self) == 0:
            return "SegmentIndex(0 entries)"
        mapped = int(self.length.sum())
        return (
            f"SegmentIndex({len(self)} entries, sectors [{int(self.offset[0])}, "
            f"{int(self.end[-1])}), {mapped} sectors mapped)"
        )

    def _repr_html_(self) -> str:
        from workbench.explore.html import card

        return card(repr(self), {"units": "512-byte sectors"}, self.to_frame())


def _u64_view(array: np.ndarray) -> memoryview:
    """`array` as a memoryview of native u64 Python ints (copied only if it is not one)."""
    if array.dtype != np.dtype("=u8") or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, np.dtype("=u8"))
    return memoryview(array).cast("B").cast("Q")
