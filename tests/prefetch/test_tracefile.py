"""OverlayBD's trace file: the layout of spec section 5, byte by byte, and its checks."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from workbench.errors import ChecksumError, CorruptFileError
from workbench.formats.checksum import crc32c_raw
from workbench.prefetch.tracefile import TRACE_MAGIC, TraceFile, TraceRecord, classify

RECORDS = [TraceRecord(0, 4096, 16384), TraceRecord(2, 1 << 40, 512), TraceRecord(1, 0, 1 << 20)]


def test_a_trace_round_trips_and_reads_by_the_layout_of_the_spec(tmp_path: Path) -> None:
    path = tmp_path / "app.trace"
    TraceFile(RECORDS).dump(path)
    data = path.read_bytes()

    # Header: u32 magic @0, 4 pad, u64 data_size @8, u32 checksum @16, 4 pad; 24 bytes.
    assert len(data) == 24 + 24 * len(RECORDS)
    assert struct.unpack_from("<I", data, 0)[0] == TRACE_MAGIC == 3270449184
    assert data[4:8] == bytes(4) and data[20:24] == bytes(4)
    assert struct.unpack_from("<Q", data, 8)[0] == 24 * len(RECORDS)
    body = data[24:]
    assert struct.unpack_from("<I", data, 16)[0] == crc32c_raw(body)

    # Record: u8 op @0, 3 pad, u32 layer_index @4, u64 count @8, i64 offset @16.
    for number, record in enumerate(RECORDS):
        raw = body[24 * number : 24 * (number + 1)]
        assert raw[0:1] == b"R" and raw[1:4] == bytes(3)
        assert struct.unpack_from("<I", raw, 4)[0] == record.layer_index
        assert struct.unpack_from("<Q", raw, 8)[0] == record.count
        assert struct.unpack_from("<q", raw, 16)[0] == record.offset

    assert TraceFile.load(path).records == RECORDS


def test_the_checksum_is_the_chained_raw_crc_of_each_record() -> None:
    data = TraceFile(RECORDS).to_bytes()
    chained = 0
    for start in range(24, len(data), 24):
        chained = crc32c_raw(data[start : start + 24], chained)
    assert struct.unpack_from("<I", data, 16)[0] == chained


def test_padding_written_by_another_tool_is_kept_under_the_checksum() -> None:
    # OverlayBD leaves padding uninitialised: a reader checks the bytes as they are.
    record = bytearray(struct.pack("<c3xIQq", b"R", 0, 4096, 8192))
    record[1:4] = b"\xaa\xbb\xcc"
    data = struct.pack("<I4xQI4x", TRACE_MAGIC, 24, crc32c_raw(record)) + bytes(record)
    assert TraceFile.from_bytes(data).records == [TraceRecord(0, 8192, 4096)]


def test_a_damaged_record_fails_the_checksum_with_both_values() -> None:
    data = bytearray(TraceFile(RECORDS).to_bytes())
    data[30] ^= 1
    with pytest.raises(ChecksumError, match=r"checksum stored 0x[0-9a-f]{8}, computed 0x"):
        TraceFile.from_bytes(bytes(data))


@pytest.mark.parametrize(
    ("data", "rule"),
    [
        (b"\x20\x18\xef", "shorter than the 24-byte trace header"),
        (struct.pack("<I4xQI4x", 0x12345678, 0, 0), "not an OverlayBD trace file"),
        (TraceFile(RECORDS).to_bytes()[:-1], "cut short"),
        (struct.pack("<I4xQI4x", TRACE_MAGIC, 25, 0) + bytes(25), "multiple of 24"),
    ],
)
def test_a_file_breaking_a_rule_is_refused_naming_it(data: bytes, rule: str) -> None:
    with pytest.raises(CorruptFileError, match=rule):
        TraceFile.from_bytes(data)


def test_a_path_is_recorded_when_absent_or_empty_replayed_with_magic_else_a_list(
    tmp_path: Path,
) -> None:
    assert classify(tmp_path / "missing") == "record"
    (tmp_path / "empty").write_bytes(b"")
    assert classify(tmp_path / "empty") == "record"
    TraceFile(RECORDS).dump(tmp_path / "trace")
    assert classify(tmp_path / "trace") == "replay"
    (tmp_path / "list").write_text("/usr/bin/python3\n/etc/\n")
    assert classify(tmp_path / "list") == "list"
