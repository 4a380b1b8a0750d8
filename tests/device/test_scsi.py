"""SCSI commands against the block handler, with CDBs synthesized here field by field (SBC-3)."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from reference import TESTDATA

from workbench.device.handler import BlockHandler
from workbench.device.scsi import ScsiResult, execute
from workbench.errors import RegistryError
from workbench.image.layer import ReadOnlyLayer
from workbench.image.stack import LayerStack
from workbench.image.writable import WritableLayer

MiB = 1 << 20
DISK = 4 * MiB
BLOCKS = DISK // 512
UUID = "aaaaaaaa-0000-4000-8000-00000000000a"


def pattern(length: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, length, np.uint8).tobytes()


# ---------------------------------------------------------------------------------------------
# CDBs, built from the tables of SBC-3 and SPC-4 (not from the module under test)


def inquiry(evpd: int = 0, page: int = 0, allocation: int = 255, control: int = 0) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd, page, allocation, control)


def read10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x28, flags, lba, 0, blocks, 0)


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def write10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, flags, lba, 0, blocks, 0)


def write16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, flags, lba, blocks, 0, 0)


def sync10(lba: int = 0, blocks: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x35, 0, lba, 0, blocks, 0)


def sync16(lba: int = 0, blocks: int = 0) -> bytes:
    return struct.pack(">BBQIBB", 0x91, 0, lba, blocks, 0, 0)


def write_same10(lba: int, blocks: int, unmap: bool = False, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x41, flags | (0x08 if unmap else 0), lba, 0, blocks, 0)


def write_same16(lba: int, blocks: int, unmap: bool = False, ndob: bool = False) -> bytes:
    flags = (0x08 if unmap else 0) | (0x01 if ndob else 0)
    return struct.pack(">BBQIBB", 0x93, flags, lba, blocks, 0, 0)


def unmap_cdb(list_length: int, anchor: bool = False) -> bytes:
    return struct.pack(">BB4xBHB", 0x42, 0x01 if anchor else 0, 0, list_length, 0)


def unmap_list(ranges: list[tuple[int, int]]) -> bytes:
    descriptors = b"".join(struct.pack(">QI4x", lba, blocks) for lba, blocks in ranges)
    return struct.pack(">HH4x", 6 + len(descriptors), len(descriptors)) + descriptors


def read_capacity10() -> bytes:
    return bytes([0x25]) + bytes(9)


def read_capacity16(allocation: int = 32, action: int = 0x10) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, action, 0, allocation, 0, 0)


def mode_sense6(page: int, pc: int = 0, dbd: bool = False, allocation: int = 255) -> bytes:
    return struct.pack(">BBBBBB", 0x1A, 0x08 if dbd else 0, pc << 6 | page, 0, allocation, 0)


def mode_sense10(page: int, llbaa: bool = False, allocation: int = 1024) -> bytes:
    return struct.pack(">BBBB3xHB", 0x5A, 0x10 if llbaa else 0, page, 0, allocation, 0)


class Sense(NamedTuple):
    valid: bool
    key: int
    information: int
    asc: int
    ascq: int
    sksv: bool
    in_cdb: bool
    field: int


def sense_of(result: ScsiResult) -> Sense:
    """Decode fixed-format sense data (SPC-4 4.5.3)."""
    assert result.status == 0x02, "expected CHECK CONDITION"
    raw = result.sense
    assert raw[0] & 0x7F == 0x70 and len(raw) == 8 + raw[7] == 18
    return Sense(
        bool(raw[0] & 0x80),
        raw[2] & 0x0F,
        struct.unpack_from(">I", raw, 3)[0],
        raw[12],
        raw[13],
        bool(raw[15] & 0x80),
        bool(raw[15] & 0x40),
        struct.unpack_from(">H", raw, 16)[0],
    )


def good(result: ScsiResult) -> bytes:
    assert (result.status, result.sense) == (0x00, b""), sense_of(result)
    return result.data_in


# ---------------------------------------------------------------------------------------------
# Devices


def writable_stack(directory: Path, size: int = DISK, lowers: list | None = None) -> LayerStack:
    upper = WritableLayer.create(
        directory / "upper.data", directory / "upper.index", size, uuid=UUID
    )
    return LayerStack(lowers or [], upper)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[BlockHandler]:
    with writable_stack(tmp_path) as stack:
        yield BlockHandler(stack)


@pytest.fixture
def read_only() -> Iterator[BlockHandler]:
    if not (TESTDATA / "layer1.lsmt").is_file():
        pytest.skip(f"OverlayBD reference files not found at {TESTDATA}")
    with LayerStack([ReadOnlyLayer.open(TESTDATA / "layer1.lsmt")]) as stack:
        yield BlockHandler(stack)


@pytest.fixture
def layered(tmp_path: Path) -> Iterator[BlockHandler]:
    if not (TESTDATA / "layer1.lsmt").is_file():
        pytest.skip(f"OverlayBD reference files not found at {TESTDATA}")
    lower = ReadOnlyLayer.open(TESTDATA / "layer1.lsmt")
    with writable_stack(tmp_path, lower.virtual_size, [lower]) as stack:
        yield BlockHandler(stack)


ILLEGAL_REQUEST, MEDIUM_ERROR, DATA_PROTECT = 0x5, 0x3, 0x7


def assert_sense(result: ScsiResult, key: int, asc: int, ascq: int = 0) -> Sense:
    sense = sense_of(result)
    assert (sense.key, sense.asc, sense.ascq) == (key, asc, ascq)
    return sense


# ---------------------------------------------------------------------------------------------
# Dispatch


def test_test_unit_ready_is_good(disk: BlockHandler) -> None:
    assert good(execute(disk, bytes(6))) == b""


@pytest.mark.parametrize("opcode", [0x08, 0x0A, 0x03, 0xA0, 0x89, 0xFF])
def test_unsupported_opcodes_are_invalid_command_operation_code(
    disk: BlockHandler, opcode: int
) -> None:
    assert_sense(execute(disk, bytes([opcode]) + bytes(15)), ILLEGAL_REQUEST, 0x20)


def test_malformed_cdbs_point_at_the_bad_byte(disk: BlockHandler) -> None:
    short = assert_sense(execute(disk, read10(0, 1)[:6]), ILLEGAL_REQUEST, 0x24)
    assert short.sksv and short.in_cdb
    naca = assert_sense(execute(disk, read10(0, 1)[:9] + b"\x04"), ILLEGAL_REQUEST, 0x24)
    assert naca.field == 9
    assert_sense(execute(disk, b""), ILLEGAL_REQUEST, 0x24)


# ---------------------------------------------------------------------------------------------
# INQUIRY


def test_standard_inquiry_describes_a_direct_access_spc4_device(disk: BlockHandler) -> None:
    data = good(execute(disk, inquiry()))
    assert len(data) == 36
    device_type, rmb, version, response_format, additional = struct.unpack_from(">5B", data)
    assert (device_type, rmb, version, response_format & 0x0F) == (0x00, 0, 0x06, 2)
    assert additional == len(data) - 5
    assert data[7] & 0x02  # CMDQUE
    assert data[8:16] == b"DADI    "
    assert data[16:32].decode("ascii").strip() == "workbench image"
    assert good(execute(disk, inquiry(allocation=5))) == data[:5]


def test_inquiry_refuses_a_page_without_evpd_and_unknown_pages(disk: BlockHandler) -> None:
    sense = assert_sense(execute(disk, inquiry(page=0x80)), ILLEGAL_REQUEST, 0x24)
    assert (sense.sksv, sense.field) == (True, 2)
    assert_sense(execute(disk, inquiry(evpd=1, page=0x99)), ILLEGAL_REQUEST, 0x24)


def vpd(handler: BlockHandler, page: int) -> bytes:
    data = good(execute(handler, inquiry(evpd=1, page=page)))
    qualifier_type, code, length = struct.unpack_from(">BBH", data)
    assert (qualifier_type, code, len(data)) == (0x00, page, 4 + length)
    return data[4:]


def test_vpd_supported_pages_list_every_page(disk: BlockHandler) -> None:
    assert list(vpd(disk, 0x00)) == [0x00, 0x80, 0x83, 0xB0, 0xB2]


def test_vpd_serial_is_the_writable_layer_uuid(disk: BlockHandler) -> None:
    assert vpd(disk, 0x80) == UUID.replace("-", "").upper().encode()


def test_vpd_device_identification_has_t10_and_naa_designators(disk: BlockHandler) -> None:
    body = vpd(disk, 0x83)
    designators = []
    while body:
        code_set, piv_assoc_type, _, length = struct.unpack_from(">4B", body)
        designators.append((code_set & 0x0F, (piv_assoc_type >> 4) & 3, piv_assoc_type & 0x0F))
        designator = body[4 : 4 + length]
        if piv_assoc_type & 0x0F == 0x01:
            assert designator == b"DADI    " + UUID.replace("-", "").upper().encode()
        else:
            assert length == 8 and designator[0] >> 4 == 0x3  # NAA locally assigned
        body = body[4 + length :]
    assert designators == [(2, 0, 0x01), (1, 0, 0x03)]


def test_vpd_block_limits_give_transfer_and_unmap_limits(disk: BlockHandler) -> None:
    body = vpd(disk, 0xB0)
    assert len(body) == 0x3C
    wsnz = body[0] & 0x01
    (granularity, max_transfer, _opt, _prefetch, max_unmap, max_descriptors, unmap_gran, _) = (
        struct.unpack_from(">HIIIIIII", body, 2)
    )
    (max_write_same,) = struct.unpack_from(">Q", body, 32)
    assert wsnz == 1
    assert granularity == 8 and max_transfer == 4 * MiB // 512
    assert (max_unmap, max_descriptors, unmap_gran) == (0xFFFFFFFF, 256, 8)
    assert max_write_same == 0xFFFFFFFF


def test_vpd_logical_block_provisioning_offers_unmap_and_write_same(disk: BlockHandler) -> None:
    body = vpd(disk, 0xB2)
    assert len(body) == 4
    flags = body[1]
    assert flags & 0x80 and flags & 0x40 and flags & 0x20  # LBPU, LBPWS, LBPWS10
    assert flags & 0x04  # LBPRZ: unmapped blocks read as zeros
    assert body[2] & 0x07 == 0x02  # thin provisioned


# ---------------------------------------------------------------------------------------------
# READ CAPACITY


def test_read_capacity_10_and_16(disk: BlockHandler) -> None:
    assert struct.unpack(">II", good(execute(disk, read_capacity10()))) == (BLOCKS - 1, 512)

    data = good(execute(disk, read_capacity16()))
    assert len(data) == 32
    last, block_length, protection, exponents, lbp = struct.unpack_from(">QIBBH", data)
    assert (last, block_length, protection) == (BLOCKS - 1, 512, 0)
    assert exponents & 0x0F == 3  # 8 logical blocks per 4 KiB physical block
    assert lbp & 0x8000 and lbp & 0x4000  # LBPME, LBPRZ
    assert lbp & 0x3FFF == 0  # lowest aligned LBA

    assert good(execute(disk, read_capacity16(allocation=12))) == data[:12]
    assert_sense(execute(disk, read_capacity16(action=0x11)), ILLEGAL_REQUEST, 0x20)
    bad_lba = bytes([0x25, 0, 0, 0, 0, 1]) + bytes(4)
    assert_sense(execute(disk, bad_lba), ILLEGAL_REQUEST, 0x24)


def test_read_capacity_10_saturates_on_a_disk_past_two_terabytes(tmp_path: Path) -> None:
    with writable_stack(tmp_path, 4 << 40) as stack:
        handler = BlockHandler(stack)
        assert good(execute(handler, read_capacity10()))[:4] == b"\xff\xff\xff\xff"
        (last,) = struct.unpack_from(">Q", good(execute(handler, read_capacity16())))
        assert last == (4 << 40) // 512 - 1


# ---------------------------------------------------------------------------------------------
# READ and WRITE


def test_write_10_and_read_16_round_trip(disk: BlockHandler) -> None:
    data = pattern(16 * 512, 1)
    assert good(execute(disk, write10(100, 16), data)) == b""
    assert good(execute(disk, read16(100, 16))) == data
    assert good(execute(disk, write16(BLOCKS - 2, 2), data[:1024])) == b""
    assert good(execute(disk, read10(BLOCKS - 2, 2))) == data[:1024]
    assert good(execute(disk, read10(0, 0))) == b""


def test_out_of_range_lbas_report_the_lba(disk: BlockHandler) -> None:
    for cdb, data in [
        (read10(BLOCKS - 1, 2), None),
        (read16(BLOCKS, 0), None),
        (write16(BLOCKS, 1), bytes(512)),
        (sync10(BLOCKS + 5, 1), None),
        (write_same16(BLOCKS - 1, 2), bytes(512)),
    ]:
        sense = assert_sense(execute(disk, cdb, data), ILLEGAL_REQUEST, 0x21)
        assert (
            sense.valid
            and sense.information == struct.unpack_from(">I" if cdb[0] < 0x80 else ">Q", cdb, 2)[0]
        )


def test_writes_to_a_read_only_image_are_write_protected(read_only: BlockHandler) -> None:
    for cdb, data in [
        (write10(0, 1), bytes(512)),
        (write_same10(0, 1, unmap=True), bytes(512)),
        (unmap_cdb(24), unmap_list([(0, 1)])),
    ]:
        assert_sense(execute(read_only, cdb, data), DATA_PROTECT, 0x27)
    assert good(execute(read_only, read10(0, 1))) != bytes(512)
    assert good(execute(read_only, sync16())) == b""


def count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The file descriptors os.fsync is called on (it still syncs)."""
    calls: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_fua_write_is_durable_without_a_separate_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pattern(4096, 2)
    fsyncs = count_fsyncs(monkeypatch)
    with writable_stack(tmp_path) as stack:
        handler = BlockHandler(stack)
        good(execute(handler, write10(0, 8), data))
        assert fsyncs == []
        good(execute(handler, write10(8, 8, flags=0x08), data))
        assert len(fsyncs) == 2  # data file, then index file
    upper = WritableLayer.open(tmp_path / "upper.data", tmp_path / "upper.index")
    with LayerStack([], upper) as again:
        assert good(execute(BlockHandler(again), read10(8, 8))) == data


def test_bad_write_fields_are_invalid(disk: BlockHandler) -> None:
    length = assert_sense(execute(disk, write10(0, 2), bytes(512)), ILLEGAL_REQUEST, 0x24)
    assert length.field == 7
    assert_sense(execute(disk, read10(0, 1, flags=0x20)), ILLEGAL_REQUEST, 0x24)  # RDPROTECT
    too_big = 4 * MiB // 512 + 1
    sense = assert_sense(execute(disk, read16(0, too_big)), ILLEGAL_REQUEST, 0x24)
    assert sense.field == 10


def test_image_failures_are_medium_errors_with_the_cause_logged(
    disk: BlockHandler, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(offset: int, length: int) -> bytes:
        raise RegistryError("registry.example: GET blob sha256:abc failed after 3 attempts")

    monkeypatch.setattr(disk.stack, "pread", broken)
    monkeypatch.setattr(disk.stack, "pwrite", broken)
    with caplog.at_level(logging.ERROR, logger="workbench.device.scsi"):
        read = assert_sense(execute(disk, read10(42, 1)), MEDIUM_ERROR, 0x11)
        write = assert_sense(execute(disk, write10(7, 1), bytes(512)), MEDIUM_ERROR, 0x0C)
    assert (read.valid, read.information, write.information) == (True, 42, 7)
    assert "read of blocks [42, 43) failed, reported as MEDIUM ERROR: RegistryError" in caplog.text
    assert "GET blob sha256:abc failed after 3 attempts" in caplog.text


# ---------------------------------------------------------------------------------------------
# SYNCHRONIZE CACHE, UNMAP, WRITE SAME


@pytest.mark.parametrize("sync", [sync10, sync16])
def test_synchronize_cache_makes_writes_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync
) -> None:
    data = pattern(8192, 3)
    fsyncs = count_fsyncs(monkeypatch)
    with writable_stack(tmp_path) as stack:
        handler = BlockHandler(stack)
        good(execute(handler, write16(64, 16), data))
        good(execute(handler, unmap_cdb(24), unmap_list([(0, 8)])))
        assert fsyncs == []
        good(execute(handler, sync(0, 0)))
        assert len(fsyncs) == 2

    upper = WritableLayer.open(tmp_path / "upper.data", tmp_path / "upper.index")
    with LayerStack([], upper) as again:
        assert good(execute(BlockHandler(again), read10(64, 16))) == data
        frame = upper.index.to_frame()
        assert frame[frame.zeroed].offset.tolist() == [0]


def test_unmap_zeroes_ranges_and_hides_the_lower_layer(layered: BlockHandler) -> None:
    lower = good(execute(layered, read10(0, 64)))
    assert lower != bytes(len(lower))

    ranges = [(0, 8), (32, 4), (60, 0)]
    parameters = unmap_list(ranges)
    assert good(execute(layered, unmap_cdb(len(parameters)), parameters)) == b""

    after = good(execute(layered, read10(0, 64)))
    expected = bytearray(lower)
    expected[0 : 8 * 512] = bytes(8 * 512)
    expected[32 * 512 : 36 * 512] = bytes(4 * 512)
    assert after == expected
    frame = layered.stack.upper.index.to_frame()
    assert frame.zeroed.all() and frame.offset.tolist() == [0, 32]


def test_unmap_parameter_list_errors(disk: BlockHandler) -> None:
    good(execute(disk, write10(0, 1), pattern(512, 4)))
    assert good(execute(disk, unmap_cdb(0))) == b""  # no list: nothing to do
    assert_sense(execute(disk, unmap_cdb(6), bytes(6)), ILLEGAL_REQUEST, 0x1A)
    assert_sense(execute(disk, unmap_cdb(24, anchor=True), unmap_list([])), ILLEGAL_REQUEST, 0x24)

    out_of_range = unmap_list([(0, 1), (BLOCKS - 1, 2)])
    sense = assert_sense(
        execute(disk, unmap_cdb(len(out_of_range)), out_of_range), ILLEGAL_REQUEST, 0x21
    )
    assert sense.information == BLOCKS - 1
    assert good(execute(disk, read10(0, 1))) == pattern(512, 4)  # nothing was trimmed

    too_many = unmap_list([(i, 1) for i in range(257)])
    sense = assert_sense(execute(disk, unmap_cdb(len(too_many)), too_many), ILLEGAL_REQUEST, 0x26)
    assert sense.sksv and not sense.in_cdb

    # A partial descriptor at the end of the list is ignored.
    partial = unmap_list([(0, 1)])[:-4]
    assert good(execute(disk, unmap_cdb(len(partial)), partial)) == b""
    assert good(execute(disk, read10(0, 1))) == pattern(512, 4)


@pytest.mark.parametrize("write_same", [write_same10, write_same16])
def test_write_same_with_unmap_trims(layered: BlockHandler, write_same) -> None:
    assert good(execute(layered, write_same(0, 64, unmap=True), bytes(512))) == b""
    assert good(execute(layered, read10(0, 64))) == bytes(64 * 512)
    frame = layered.stack.upper.index.to_frame()
    assert frame.zeroed.tolist() == [True] and frame.length.tolist() == [64]


def test_write_same_writes_a_pattern_and_ndob_writes_zeros(layered: BlockHandler) -> None:
    block = pattern(512, 5)
    good(execute(layered, write_same10(100, 10, unmap=True), block))  # non-zero: written
    assert good(execute(layered, read10(100, 10))) == block * 10

    good(execute(layered, write_same16(0, 8, ndob=True)))  # no data-out: zeros, written
    assert good(execute(layered, read10(0, 8))) == bytes(4096)
    assert not layered.stack.upper.index.to_frame().zeroed.any()

    good(execute(layered, write_same16(0, 8, unmap=True, ndob=True)))
    assert layered.stack.upper.index.to_frame().zeroed.any()


def test_write_same_field_errors(disk: BlockHandler) -> None:
    zero_count = assert_sense(execute(disk, write_same10(0, 0), bytes(512)), ILLEGAL_REQUEST, 0x24)
    assert zero_count.field == 7  # WSNZ: a count of zero is refused
    assert_sense(execute(disk, write_same10(0, 1, flags=0x10), bytes(512)), ILLEGAL_REQUEST, 0x24)
    assert_sense(execute(disk, write_same10(0, 1, flags=0x02), bytes(512)), ILLEGAL_REQUEST, 0x24)
    assert_sense(execute(disk, write_same10(0, 1), bytes(100)), ILLEGAL_REQUEST, 0x24)


# ---------------------------------------------------------------------------------------------
# MODE SENSE


def test_mode_sense_6_reports_write_protect_for_read_only_images(
    read_only: BlockHandler, disk: BlockHandler
) -> None:
    for handler, wp in [(read_only, 0x80), (disk, 0x00)]:
        data = good(execute(handler, mode_sense6(0x08)))
        length, medium, device_specific, descriptor_length = struct.unpack_from(">4B", data)
        assert length == len(data) - 1 and medium == 0
        assert device_specific & 0x80 == wp
        assert device_specific & 0x10  # DPOFUA
        assert descriptor_length == 8
        blocks, _, block_length_hi, block_length_lo = struct.unpack_from(">IBBH", data, 4)
        assert (blocks, block_length_hi << 16 | block_length_lo) == (handler.blocks, 512)
        caching = data[12:]
        assert (caching[0] & 0x3F, caching[1], len(caching)) == (0x08, 0x12, 20)
        assert caching[2] & 0x04  # WCE


def test_mode_sense_pages_and_descriptors(disk: BlockHandler) -> None:
    everything = good(execute(disk, mode_sense6(0x3F, dbd=True)))
    assert everything[3] == 0  # DBD: no block descriptor
    assert [everything[4], everything[4 + 20]] == [0x08, 0x0A]
    assert len(everything) == 4 + 20 + 12

    changeable = good(execute(disk, mode_sense6(0x08, pc=1, dbd=True)))
    assert changeable[4:] == bytes([0x08, 0x12]) + bytes(18)

    data = good(execute(disk, mode_sense10(0x0A, llbaa=True)))
    length, _, _, longlba, descriptor_length = struct.unpack_from(">HBBBxH", data)
    assert (length, longlba, descriptor_length) == (len(data) - 2, 1, 16)
    blocks, block_length = struct.unpack_from(">Q4xI", data, 8)
    assert (blocks, block_length) == (BLOCKS, 512)
    assert data[24] == 0x0A and len(data) == 8 + 16 + 12

    assert len(good(execute(disk, mode_sense6(0x3F, allocation=4)))) == 4
    assert_sense(execute(disk, mode_sense6(0x08, pc=3)), ILLEGAL_REQUEST, 0x39)
    assert_sense(execute(disk, mode_sense6(0x1C)), ILLEGAL_REQUEST, 0x24)
