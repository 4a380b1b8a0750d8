"""Read-only LSMT layers: OverlayBD's files read back right, broken files are refused."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
from reference import TESTDATA, expected_disk, manifest, needs_testdata

from workbench.blobs.common import BytesFile
from workbench.errors import AlignmentError, CorruptFileError, FormatError
from workbench.formats.lsmt import HT_SPACE, SegmentIndex
from workbench.image.layer import ReadOnlyLayer
from workbench.tracing import recording

MiB = 1 << 20


def mapped_sectors(index: SegmentIndex, sectors: int) -> np.ndarray:
    mapped = np.zeros(sectors, bool)
    for offset, length in zip(index.offset.tolist(), index.length.tolist(), strict=True):
        mapped[offset : offset + length] = True
    return mapped


def layer_bytes(name: str = "layer1.lsmt") -> bytearray:
    return bytearray((TESTDATA / name).read_bytes())


def put_u64(data: bytearray, at: int, value: int) -> None:
    data[at : at + 8] = struct.pack("<Q", value)


# ---------------------------------------------------------------------------------------------
# Reading OverlayBD's files


@needs_testdata
@pytest.mark.parametrize(
    ("name", "wrapping"),
    [
        ("layer1.lsmt", ()),
        ("layer1.commit-z.lz4.zfile", ("zfile",)),
        ("layer1.commit-z.zstd.zfile", ("zfile",)),
        ("layer1.lz4.nocrc.zfile", ("zfile",)),
        ("layer1.lz4.bs64k.crc.zfile", ("zfile",)),
    ],
)
def test_layer1_reads_back_to_the_manifest_chunks(name: str, wrapping: tuple[str, ...]) -> None:
    chunks = manifest()["expected"]["layer1_only"]["chunk_sha256"]

    with ReadOnlyLayer.open(TESTDATA / name) as layer:
        assert layer.wrapping == wrapping
        got = [hashlib.sha256(layer.pread(i * MiB, MiB)).hexdigest() for i in range(len(chunks))]

    assert got == chunks


@needs_testdata
@pytest.mark.parametrize("number", [1, 2])
def test_layer_alone_maps_exactly_its_own_writes_and_trims(number: int) -> None:
    disk, mapped = expected_disk(number)

    with ReadOnlyLayer.open(TESTDATA / f"layer{number}.lsmt") as layer:
        assert layer.pread(0, len(disk)) == disk
        assert (mapped_sectors(layer.index, len(mapped)) == mapped).all()


@needs_testdata
def test_header_fields_come_from_the_file() -> None:
    info = manifest()["layers"][1]

    with ReadOnlyLayer.open(TESTDATA / "layer2.lsmt") as layer:
        assert layer.virtual_size == layer.size == 64 * MiB
        assert layer.uuid == info["uuid"].upper()
        assert layer.parent_uuid == info["parent_uuid"].upper()
        assert layer.message == "layer2"
        assert layer.header.flags == 0x07
        assert layer.trailer.flags == 0x06
        assert (layer.index.tag == 0).all()
        assert layer.index.zeroed.sum() == 3


@needs_testdata
def test_a_layer_opens_from_a_random_access_file_and_closes_it() -> None:
    source = BytesFile(layer_bytes(), "memory-layer")

    layer = ReadOnlyLayer.open(source)

    assert layer.name == "memory-layer"
    assert len(layer.index) == 6
    layer.close()


@needs_testdata
def test_pread_checks_alignment_and_stops_at_the_virtual_size() -> None:
    with ReadOnlyLayer.open(TESTDATA / "layer1.lsmt") as layer:
        with pytest.raises(AlignmentError, match=r"offset 100, length 512 is not aligned"):
            layer.pread(100, 512)
        with pytest.raises(AlignmentError, match="not aligned"):
            layer.pread(0, 513)

        assert len(layer.pread(64 * MiB - 1024, 4096)) == 1024
        assert layer.pread(64 * MiB, 512) == b""


@needs_testdata
def test_each_read_data_is_one_trace_event_in_layer_file_bytes() -> None:
    with ReadOnlyLayer.open(TESTDATA / "layer1.lsmt") as layer, recording() as recorder:
        layer.pread(0, 2 * MiB)  # one segment of 1 MiB, then a gap

    events = [event for event in recorder.events if event.layer == "lsmt"]
    assert [(e.op, e.offset, e.length, e.nbytes) for e in events] == [("read", 8 * 512, MiB, MiB)]
    assert events[0].target.endswith("layer1.lsmt")


@needs_testdata
def test_neighbouring_segments_are_read_in_one_call() -> None:
    # Sectors 8193..8217 are one segment; reading across its edges needs one data read.
    with ReadOnlyLayer.open(TESTDATA / "layer1.lsmt") as layer, recording() as recorder:
        layer.pread(8192 * 512, 64 * 512)

    assert len([e for e in recorder.events if e.layer == "lsmt"]) == 1


# ---------------------------------------------------------------------------------------------
# Refusing broken files


@needs_testdata
def test_a_file_without_lsmt_magic_is_refused() -> None:
    data = layer_bytes()
    data[0:8] = b"NOTLSMT!"

    with pytest.raises(FormatError, match=r"memory: no LSMT magic at offset 0"):
        ReadOnlyLayer.open(BytesFile(data, "memory"))


@needs_testdata
def test_a_trailer_without_the_sealed_bit_is_refused() -> None:
    data = layer_bytes()
    trailer_at = len(data) - HT_SPACE
    data[trailer_at + 28] = 0x02

    with pytest.raises(CorruptFileError, match=rf"trailer at offset {trailer_at} .*SEALED"):
        ReadOnlyLayer.open(BytesFile(data, "memory"))


@needs_testdata
def test_an_index_file_is_not_a_layer() -> None:
    data = (TESTDATA / "layer1.rw.index").read_bytes()

    with pytest.raises(FormatError, match="writable layer's index file"):
        ReadOnlyLayer.open(BytesFile(data, "memory"))


@needs_testdata
def test_an_unsealed_writable_data_file_is_sent_to_the_writable_layer() -> None:
    with pytest.raises(FormatError, match=r"without a trailer .*WritableLayer\.open"):
        ReadOnlyLayer.open(TESTDATA / "layer1.rw.data")


@needs_testdata
def test_an_index_larger_than_overlaybd_accepts_is_refused() -> None:
    data = layer_bytes()
    put_u64(data, len(data) - HT_SPACE + 40, 1_000_001)

    with pytest.raises(CorruptFileError, match="index_size 1000001 entries, more than"):
        ReadOnlyLayer.open(BytesFile(data, "memory"))


@needs_testdata
def test_an_index_that_runs_into_the_trailer_is_refused() -> None:
    data = layer_bytes()
    put_u64(data, len(data) - HT_SPACE + 40, 257)

    with pytest.raises(CorruptFileError, match=r"index of 257 entries .* does not fit"):
        ReadOnlyLayer.open(BytesFile(data, "memory"))


@needs_testdata
def test_overlapping_index_entries_are_refused() -> None:
    data = layer_bytes()
    index_at = struct.unpack_from("<Q", data, len(data) - HT_SPACE + 32)[0]
    # Entry 1 starts at sector 8193; move it into entry 0 (sectors 0..2048).
    w0 = struct.unpack_from("<Q", data, index_at + 16)[0]
    put_u64(data, index_at + 16, (w0 & ~((1 << 50) - 1)) | 100)

    with pytest.raises(CorruptFileError, match="overlap or are out of order"):
        ReadOnlyLayer.open(BytesFile(data, "memory"))


@needs_testdata
def test_data_outside_the_data_area_is_refused() -> None:
    data = layer_bytes()
    index_at = struct.unpack_from("<Q", data, len(data) - HT_SPACE + 32)[0]
    put_u64(data, index_at + 8, 2)  # entry 0 would read the header

    with pytest.raises(CorruptFileError, match=r"outside the data area \[8, "):
        ReadOnlyLayer.open(BytesFile(data, "memory"))


@needs_testdata
def test_a_truncated_file_is_refused() -> None:
    data = layer_bytes()[:6000]

    with pytest.raises(CorruptFileError, match="smaller than a header and a trailer"):
        ReadOnlyLayer.open(BytesFile(data, "memory"))
