"""OverlayBD's prefetch trace file: the block accesses of one container start.

Layout (shared/specs/overlaybd-formats.md section 5; native x86_64 layout, little-endian)::

    header, 24 bytes
      0   u32  magic            TRACE_MAGIC (0xC2EF1820)
      4   4 B  padding          zeros
      8   u64  data_size        24 x number of records
      16  u32  checksum         chained raw CRC32C (seed 0) over the records as written
      20  4 B  padding          zeros
    record, 24 bytes, `data_size / 24` of them
      0   u8   op               b"R" (0x52) read; b"W" is defined, never recorded
      1   3 B  padding          zeros
      4   u32  layer_index      index into the config's ``lowers`` (0 = bottom)
      8   u64  count            bytes read
      16  i64  offset           byte offset in that layer's LSMT file (after tar and ZFile)

A file is valid when its size is ``24 + data_size`` and the checksum matches; OverlayBD
silently disables replay otherwise, `TraceFile.from_bytes` raises `CorruptFileError` naming
the rule and the values. Padding is written as zeros (OverlayBD leaves it uninitialised, and
its checksum covers it, so a file of OverlayBD's is only self-consistent: `from_bytes` keeps
what it read and checks the checksum over the bytes as they are).

What a trace file means to a mount (`classify`): no file or an empty one asks to record, a
file starting with the magic is replayed, any other non-empty file is a priority list of
paths (one absolute path a line).

Caveats:
- records are kept in memory (24 bytes each on disk, a tuple each in Python): fine for a
  container start (thousands to a few hundred thousand reads), not for days of recording.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from workbench.errors import ChecksumError, CorruptFileError
from workbench.formats.checksum import crc32c_raw

__all__ = [
    "HEADER",
    "OP_READ",
    "OP_WRITE",
    "RECORD",
    "TRACE_MAGIC",
    "TraceFile",
    "TraceMode",
    "TraceRecord",
    "classify",
]

TRACE_MAGIC: Final = 0xC2EF1820
"""The u32 at offset 0 of a trace file (3270449184)."""

HEADER: Final = struct.Struct("<I4xQI4x")
"""magic, data_size, checksum: 24 bytes."""

RECORD: Final = struct.Struct("<c3xIQq")
"""op, layer_index, count, offset: 24 bytes."""

OP_READ: Final = b"R"
"""A read of a lower layer: the only op recorded and replayed."""
OP_WRITE: Final = b"W"
"""Defined by OverlayBD, never recorded."""

TraceMode = Literal["record", "replay", "list"]
"""What a trace file path asks of a mount: see `classify`."""


@dataclass(frozen=True)
class TraceRecord:
    """One read of one lower layer: `count` bytes at `offset` of its LSMT file."""

    layer_index: int
    offset: int
    count: int
    op: bytes = OP_READ


@dataclass
class TraceFile:
    """The records of a trace file, in the order they were recorded."""

    records: list[TraceRecord] = field(default_factory=list)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "trace") -> TraceFile:
        """Parse and check a trace file; `CorruptFileError`/`ChecksumError` if it breaks a rule."""
        if len(data) < HEADER.size:
            raise CorruptFileError(
                f"{name}: {len(data)} bytes, shorter than the {HEADER.size}-byte trace header; "
                "record the trace again"
            )
        magic, data_size, checksum = HEADER.unpack_from(data)
        if magic != TRACE_MAGIC:
            raise CorruptFileError(
                f"{name}: magic {magic:#010x} at offset 0, expected {TRACE_MAGIC:#010x}; not "
                "an OverlayBD trace file (a priority list is text, one path a line)"
            )
        if data_size % RECORD.size or len(data) != HEADER.size + data_size:
            raise CorruptFileError(
                f"{name}: data_size {data_size} with a file of {len(data)} bytes; expected "
                f"a multiple of {RECORD.size} and a file of {HEADER.size} + data_size bytes "
                "(the recording was cut short)"
            )

        body = memoryview(data)[HEADER.size :]
        actual = crc32c_raw(body)
        if actual != checksum:
            raise ChecksumError(
                f"{name}: checksum stored {checksum:#010x}, computed {actual:#010x} over "
                f"{data_size} bytes of records; the file is damaged, record it again"
            )
        records = [
            TraceRecord(layer, offset, count, op)
            for op, layer, count, offset in RECORD.iter_unpack(body)
        ]
        return cls(records)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TraceFile:
        return cls.from_bytes(Path(path).read_bytes(), os.fspath(path))

    def to_bytes(self) -> bytes:
        """The file: header (with the checksum) and records, padding zeroed."""
        body = b"".join(
            RECORD.pack(record.op, record.layer_index, record.count, record.offset)
            for record in self.records
        )
        return HEADER.pack(TRACE_MAGIC, len(body), crc32c_raw(body)) + body

    def dump(self, path: str | os.PathLike[str]) -> None:
        """Write the file atomically (a temporary file renamed over `path`)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(self.to_bytes())
        os.replace(tmp, path)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def total_bytes(self) -> int:
        return sum(record.count for record in self.records)


def classify(path: str | os.PathLike[str]) -> TraceMode:
    """What the file at `path` asks for: ``record`` (absent or empty), ``replay`` (it starts
    with the trace magic) or ``list`` (anything else: a priority list of paths)."""
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except FileNotFoundError:
        return "record"
    if not head:
        return "record"
    if len(head) == 4 and struct.unpack("<I", head)[0] == TRACE_MAGIC:
        return "replay"
    return "list"
