"""The writable LSMT layer: OverlayBD's files, write/trim semantics, crashes, sparse, seal."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from workbench.errors import AlignmentError, CorruptFileError, FormatError, ReadOnlyError
from workbench.formats.lsmt import HT_SPACE, INVALID_OFFSET, LsmtHeader
from workbench.image.layer import ReadOnlyLayer
from workbench.image.writable import WritableLayer
from workbench.tracing import recording

TESTDATA = Path(__file__).resolve().parents[2].parent / "shared" / "testdata" / "overlaybd"
KiB, MiB = 1 << 10, 1 << 20

needs_testdata = pytest.mark.skipif(
    not (TESTDATA / "manifest.json").exists(), reason=f"OverlayBD testdata absent at {TESTDATA}"
)


def expected_disk(layer_number: int) -> tuple[bytearray, np.ndarray]:
    """The disk one layer alone reads as (its manifest ops on zeros) and its mapped sectors."""
    info = json.loads((TESTDATA / "manifest.json").read_text())
    disk = bytearray(info["virtual_size"])
    mapped = np.zeros(info["virtual_size"] // 512, bool)
    for op in info["layers"][layer_number - 1]["ops"]:
        start, length = op["offset"], op["length"]
        if op["op"] == "write":
            with open(TESTDATA / op["src"], "rb") as src:
                src.seek(op["src_offset"])
                disk[start : start + length] = src.read(length)
        else:
            disk[start : start + length] = bytes(length)
        mapped[start // 512 : (start + length) // 512] = True
    return disk, mapped


def copy_rw(tmp_path: Path, number: int) -> tuple[Path, Path]:
    """Writable copies of a testdata layer (the testdata itself is read-only)."""
    paths = []
    for suffix in ("data", "index"):
        target = tmp_path / f"layer{number}.rw.{suffix}"
        shutil.copyfile(TESTDATA / f"layer{number}.rw.{suffix}", target)
        paths.append(target)
    return paths[0], paths[1]


def pattern(length: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, length, np.uint8).tobytes()


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "writable_data", tmp_path / "writable_index"


@pytest.fixture
def layer(paths: tuple[Path, Path]):
    with WritableLayer.create(*paths, 64 * MiB, uuid="aaaaaaaa-0000-4000-8000-00000000000a") as rw:
        yield rw


# ---------------------------------------------------------------------------------------------
# OverlayBD's files


@needs_testdata
@pytest.mark.parametrize("number", [1, 2])
def test_overlaybd_writable_layers_read_back_their_writes(tmp_path: Path, number: int) -> None:
    disk, mapped = expected_disk(number)

    with WritableLayer.open(*copy_rw(tmp_path, number)) as rw:
        assert rw.pread(0, len(disk)) == disk
        index = rw.index
        covered = np.zeros(len(mapped), bool)
        for offset, length in zip(index.offset.tolist(), index.length.tolist(), strict=True):
            covered[offset : offset + length] = True
        assert (covered == mapped).all()


@needs_testdata
def test_overlaybd_trims_replay_as_zeroed_entries_at_the_data_end(tmp_path: Path) -> None:
    with WritableLayer.open(*copy_rw(tmp_path, 2)) as rw:
        frame = rw.index.to_frame()

    zeroed = frame[frame.zeroed]
    assert zeroed.offset.tolist() == [24576, 81920, 129026]
    assert zeroed.length.tolist() == [1024, 2048, 4]


def test_create_writes_overlaybd_headers(paths: tuple[Path, Path]) -> None:
    data_path, index_path = paths
    WritableLayer.create(data_path, index_path, 64 * MiB, parent_uuid=None, uuid=None).close()

    data = data_path.read_bytes()
    index = index_path.read_bytes()
    assert len(data) == len(index) == HT_SPACE
    header = LsmtHeader.unpack(data)
    index_header = LsmtHeader.unpack(index)
    assert (header.flags, header.index_offset, header.virtual_size) == (0x03, 0, 64 * MiB)
    assert (index_header.flags, index_header.index_offset) == (0x01, HT_SPACE)
    assert index_header.uuid == header.uuid != "00000000-0000-0000-0000-000000000000"
    assert header.parent_uuid == "00000000-0000-0000-0000-000000000000"


def test_create_refuses_existing_files_and_bad_sizes(paths: tuple[Path, Path]) -> None:
    WritableLayer.create(*paths, MiB).close()

    with pytest.raises(FileExistsError):
        WritableLayer.create(*paths, MiB)
    with pytest.raises(AlignmentError, match="virtual size 1000 is not a positive multiple"):
        WritableLayer.create(paths[0].with_name("other"), None, 1000, sparse=True)


# ---------------------------------------------------------------------------------------------
# Writes and trims


def test_a_write_appends_data_and_one_entry_per_4_mib_piece(layer: WritableLayer) -> None:
    data = pattern(5 * MiB, 1)

    layer.pwrite(MiB, data)

    assert os.path.getsize(layer.data_path) == HT_SPACE + 5 * MiB
    entries = np.frombuffer(layer.index_path.read_bytes()[HT_SPACE:], "<u8").reshape(-1, 2)
    assert entries[:, 0].tolist() == [2048 | 8192 << 50, 2048 + 8192 | 2048 << 50]
    assert entries[:, 1].tolist() == [8, 8 + 8192]
    assert layer.pread(MiB, 5 * MiB) == data


def test_a_trim_appends_zeroed_entries_of_at_most_16383_sectors(layer: WritableLayer) -> None:
    layer.pwrite(0, pattern(64 * KiB, 2))

    layer.trim(0, 20000 * 512)

    entries = np.frombuffer(layer.index_path.read_bytes()[HT_SPACE:], "<u8").reshape(-1, 2)
    zeroed_entries = entries[1:]
    assert (zeroed_entries[:, 0] >> 50).tolist() == [16383, 20000 - 16383]
    # moffset = the data end (sector 8 + 128), zeroed bit set
    assert zeroed_entries[:, 1].tolist() == [136 | 1 << 55] * 2
    assert os.path.getsize(layer.data_path) == HT_SPACE + 64 * KiB
    assert layer.pread(0, 64 * KiB) == bytes(64 * KiB)


def test_later_writes_split_and_hide_older_ones(layer: WritableLayer) -> None:
    old = pattern(64 * KiB, 3)
    new = pattern(8 * KiB, 4)
    layer.pwrite(0, old)

    layer.pwrite(16 * KiB, new)

    frame = layer.index.to_frame()
    assert frame.offset.tolist() == [0, 32, 48]
    assert frame.length.tolist() == [32, 16, 80]
    assert frame.moffset.tolist() == [8, 136, 8 + 48]
    assert layer.pread(0, 64 * KiB) == old[: 16 * KiB] + new + old[24 * KiB :]


def test_the_index_is_cached_until_the_next_write(layer: WritableLayer) -> None:
    layer.pwrite(0, pattern(4096, 5))
    first = layer.index

    assert layer.index is first
    layer.trim(0, 512)
    assert layer.index is not first


def test_writes_must_be_aligned_and_inside_the_disk(layer: WritableLayer) -> None:
    with pytest.raises(AlignmentError, match="write at offset 100, length 512 is not aligned"):
        layer.pwrite(100, bytes(512))
    with pytest.raises(AlignmentError, match="trim at offset 0, length 100 is not aligned"):
        layer.trim(0, 100)
    with pytest.raises(AlignmentError, match=r"ends past the virtual disk \(67108864 bytes\)"):
        layer.pwrite(64 * MiB - 512, bytes(1024))


def test_writes_and_trims_are_traced(layer: WritableLayer) -> None:
    with recording() as recorder:
        layer.pwrite(4096, bytes(4096))
        layer.trim(0, 512)
        layer.pread(0, 8192)

    ops = [(e.op, e.offset, e.length) for e in recorder.events if e.layer == "lsmt"]
    assert ops == [("write", 4096, 4096), ("trim", 0, 512), ("read", HT_SPACE, 4096)]


# ---------------------------------------------------------------------------------------------
# Reopening and crashes


def test_reopen_replays_the_index_in_file_order(paths: tuple[Path, Path]) -> None:
    model = bytearray(MiB)
    with WritableLayer.create(*paths, MiB) as rw:
        for seed, (offset, length) in enumerate([(0, 64), (8, 16), (4, 8), (60, 10)]):
            data = pattern(length * 512, seed)
            rw.pwrite(offset * 512, data)
            model[offset * 512 : (offset + length) * 512] = data
        rw.trim(10 * 512, 4 * 512)
        model[10 * 512 : 14 * 512] = bytes(4 * 512)
        before = rw.index.to_frame()

    with WritableLayer.open(*paths) as rw:
        assert rw.pread(0, MiB) == model
        assert rw.index.to_frame().equals(before)


def test_padding_entries_are_skipped_on_replay(paths: tuple[Path, Path]) -> None:
    data = pattern(4096, 6)
    with WritableLayer.create(*paths, MiB) as rw:
        rw.pwrite(0, data)
    with open(paths[1], "ab") as index_file:
        index_file.write(struct.pack("<QQ", INVALID_OFFSET, 0))

    with WritableLayer.open(*paths) as rw:
        assert len(rw.index) == 1
        assert rw.pread(0, 4096) == data


def test_a_torn_last_entry_is_dropped_and_flushed_writes_survive(
    paths: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    first, second = pattern(8192, 7), pattern(4096, 8)
    with WritableLayer.create(*paths, MiB) as rw:
        rw.pwrite(0, first)
        rw.flush()
        rw.pwrite(4096, second)
    # The crash tore the second entry: only 9 of its 16 bytes reached the disk.
    os.truncate(paths[1], HT_SPACE + 16 + 9)

    with caplog.at_level(logging.WARNING), WritableLayer.open(*paths) as rw:
        assert rw.pread(0, 8192) == first
        assert os.path.getsize(paths[1]) == HT_SPACE + 16
        rw.pwrite(0, second)  # appends stay aligned after the cut
    assert "dropped a partial index entry of 9 bytes" in caplog.text

    with WritableLayer.open(*paths) as rw:
        assert rw.pread(0, 8192) == second + first[4096:]


def test_a_torn_tail_after_complete_entries_loses_nothing(
    paths: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    data = pattern(16384, 9)
    with WritableLayer.create(*paths, MiB) as rw:
        rw.pwrite(0, data)
        rw.flush()
    with open(paths[1], "ab") as index_file:
        index_file.write(b"\x07" * 5)

    with caplog.at_level(logging.WARNING), WritableLayer.open(*paths) as rw:
        assert rw.pread(0, 16384) == data
    assert caplog.records[0].levelno == logging.WARNING


def test_an_entry_naming_missing_data_is_refused(paths: tuple[Path, Path]) -> None:
    with WritableLayer.create(*paths, MiB) as rw:
        rw.pwrite(0, bytes(8192))
    os.truncate(paths[0], HT_SPACE + 4096)

    with pytest.raises(CorruptFileError, match=r"maps data sectors \[8, 24\), outside"):
        WritableLayer.open(*paths)


def test_a_non_sparse_layer_needs_its_index_file(paths: tuple[Path, Path]) -> None:
    WritableLayer.create(*paths, MiB).close()

    with pytest.raises(FormatError, match="needs its index file"):
        WritableLayer.open(paths[0])


# ---------------------------------------------------------------------------------------------
# Sparse layers


def test_a_sparse_layer_stores_data_at_its_disk_offset(tmp_path: Path) -> None:
    data_path = tmp_path / "sparse_data"
    data = pattern(64 * KiB, 10)
    with WritableLayer.create(data_path, None, 16 * MiB, sparse=True) as rw:
        assert rw.sparse
        rw.pwrite(MiB, data)
        rw.trim(MiB, 16 * KiB)

        assert rw.pread(MiB, 64 * KiB) == bytes(16 * KiB) + data[16 * KiB :]

    raw = data_path.read_bytes()
    assert len(raw) == HT_SPACE + 16 * MiB
    assert LsmtHeader.unpack(raw).flags == 0x13
    assert raw[HT_SPACE + MiB + 16 * KiB : HT_SPACE + MiB + 64 * KiB] == data[16 * KiB :]


def test_a_sparse_layer_rebuilds_its_index_from_data_extents(tmp_path: Path) -> None:
    data_path = tmp_path / "sparse_data"
    data = pattern(64 * KiB, 11)
    with WritableLayer.create(data_path, None, 16 * MiB, sparse=True) as rw:
        rw.pwrite(MiB, data)
        rw.trim(MiB, 16 * KiB)

    with WritableLayer.open(data_path) as rw:
        frame = rw.index.to_frame()
        assert rw.pread(MiB, 64 * KiB) == bytes(16 * KiB) + data[16 * KiB :]

    # The trimmed range became a hole (unless the filesystem cannot punch holes).
    mapped = set(range(2048 + 32, 2048 + 128))
    covered = {s for o, n in zip(frame.offset, frame.length, strict=True) for s in range(o, o + n)}
    assert mapped <= covered
    assert (frame.moffset == frame.offset + 8).all()


# ---------------------------------------------------------------------------------------------
# Sealing


@pytest.mark.parametrize("sparse", [False, True])
def test_a_sealed_layer_opens_read_only_with_the_same_content(tmp_path: Path, sparse: bool) -> None:
    data_path, index_path = tmp_path / "data", tmp_path / "index"
    with WritableLayer.create(data_path, index_path, 4 * MiB, sparse=sparse) as rw:
        rw.pwrite(0, pattern(12 * KiB, 12))
        rw.pwrite(MiB, pattern(4 * KiB, 13))
        rw.trim(4 * KiB, 4 * KiB)
        before = rw.pread(0, 4 * MiB)
        entries = len(rw.index)
        rw.seal()
        with pytest.raises(ReadOnlyError, match="sealed"):
            rw.pwrite(0, bytes(512))

    with ReadOnlyLayer.open(data_path) as sealed:
        assert sealed.pread(0, 4 * MiB) == before
        assert sealed.header.flags == (0x13 if sparse else 0x03)
        assert sealed.trailer.flags == (0x16 if sparse else 0x06)
        assert sealed.trailer.index_size == entries == len(sealed.index)
        # The index is padded to 32 entries (512 bytes) before the trailer.
        assert sealed.file.size - HT_SPACE - sealed.trailer.index_offset == 512

    with pytest.raises(FormatError, match="the layer is sealed; open it with ReadOnlyLayer"):
        WritableLayer.open(data_path, index_path)
