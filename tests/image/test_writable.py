"""The writable LSMT layer: OverlayBD's files, write/trim semantics, crashes, sparse, seal."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from reference import TESTDATA, expected_disk, needs_testdata

from workbench.errors import AlignmentError, CorruptFileError, FormatError, ReadOnlyError
from workbench.formats.lsmt import HT_SPACE, INVALID_OFFSET, LsmtHeader
from workbench.image.layer import ReadOnlyLayer
from workbench.image.writable import WritableLayer
from workbench.tracing import recording

KiB, MiB = 1 << 10, 1 << 20


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


def index_entries(path: Path) -> list[tuple[int, int]]:
    raw = np.frombuffer(path.read_bytes()[HT_SPACE:], "<u8").reshape(-1, 2)
    return [(int(w0), int(w1)) for w0, w1 in raw]


def append_entry(path: Path, offset: int, length: int, moffset: int, zeroed: bool = False) -> None:
    with open(path, "ab") as index_file:
        index_file.write(struct.pack("<QQ", offset | length << 50, moffset | zeroed << 55))


def test_writes_whose_data_was_lost_are_dropped_and_older_content_shows(
    paths: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    acked, lost, lost_too = pattern(8192, 20), pattern(4096, 21), pattern(4096, 22)
    with WritableLayer.create(*paths, MiB) as rw:
        rw.pwrite(0, acked)
        rw.flush()
        rw.pwrite(4096, lost)
        rw.trim(0, 512)
        rw.pwrite(65536, lost_too)
    # The crash: the index entries reached the disk, the data appends after the flush did not.
    os.truncate(paths[0], HT_SPACE + 8192)

    with caplog.at_level(logging.WARNING), WritableLayer.open(*paths) as rw:
        assert rw.pread(0, 8192) == acked
        assert rw.pread(65536, 4096) == bytes(4096)
        # The index file is cut back to the acknowledged entry, so new data appended at the
        # data file's end cannot be named by the dropped entries at the next open.
        assert os.path.getsize(paths[1]) == HT_SPACE + 16
        rw.pwrite(65536, acked[:4096])
        rw.flush()

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "dropped 3 index entries from offset 4112 on (2 naming data past" in warnings[0].message
    assert "maps data sectors [24, 32), the data file has 24" in warnings[0].message

    with WritableLayer.open(*paths) as rw:
        assert rw.pread(0, 8192) == acked
        assert rw.pread(65536, 4096) == acked[:4096]


def test_hand_written_entries_past_the_data_end_are_dropped(
    paths: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    old = pattern(16384, 23)
    with WritableLayer.create(*paths, MiB) as rw:
        rw.pwrite(0, old)
        rw.flush()
    append_entry(paths[1], offset=8, length=8, moffset=8 + 32)  # data sectors [40, 48)
    append_entry(paths[1], offset=0, length=4, moffset=48, zeroed=True)

    with caplog.at_level(logging.WARNING), WritableLayer.open(*paths) as rw:
        assert rw.pread(0, 16384) == old
        assert rw.index.to_frame().offset.tolist() == [0]
    assert "dropped 2 index entries from offset 4112 on (1 naming data past" in caplog.text


def test_a_partial_last_sector_of_data_counts_as_lost(paths: tuple[Path, Path]) -> None:
    with WritableLayer.create(*paths, MiB) as rw:
        rw.pwrite(0, pattern(1024, 24))
    os.truncate(paths[0], HT_SPACE + 1000)

    # The write's one entry names sectors [8, 10), the file holds 8 and a fraction: dropped.
    with WritableLayer.open(*paths) as rw:
        assert rw.lookup(0, 2) == []
        rw.pwrite(0, bytes(512))
    assert os.path.getsize(paths[0]) == HT_SPACE + 1024 + 512  # after the partial sector


def test_entries_no_crash_can_produce_are_still_refused(paths: tuple[Path, Path]) -> None:
    WritableLayer.create(*paths, MiB).close()
    append_entry(paths[1], offset=0, length=8, moffset=4)

    with pytest.raises(CorruptFileError, match=r"offset 4096 .* data sectors \[4, 12\); data"):
        WritableLayer.open(*paths)

    os.truncate(paths[1], HT_SPACE)
    append_entry(paths[1], offset=2040, length=16, moffset=8, zeroed=True)
    with pytest.raises(CorruptFileError, match="the virtual disk has 2048 sectors"):
        WritableLayer.open(*paths)


# A writer killed at a random moment: it prints "acked N" once writes 0..N-1 are flushed.
# Write i fills slot SLOTS[i] (64 KiB slots, distinct) with (i % 15 + 1) * 4 KiB of a
# pattern of i + 1 (never zeros), so every write can be checked on its own after the kill.
KILL_WRITER = """
import sys
import numpy as np
from workbench.image.writable import WritableLayer

slots = np.random.default_rng(int(sys.argv[3])).permutation(1024).tolist()
rng = np.random.default_rng(int(sys.argv[3]) + 1)
layer = WritableLayer.create(sys.argv[1], sys.argv[2], 64 << 20)
done = 0
while done < len(slots):
    for _ in range(int(rng.integers(1, 5))):
        if done == len(slots):
            break
        size = (done % 15 + 1) * 4096
        layer.pwrite(slots[done] * 65536, (done + 1).to_bytes(4, "little") * (size // 4))
        done += 1
    layer.flush()
    print("acked", done, flush=True)
"""


def test_every_acknowledged_write_survives_kill_9(tmp_path: Path) -> None:
    rng = np.random.default_rng(25)
    for round_number in range(4):
        data_path, index_path = tmp_path / f"data{round_number}", tmp_path / f"index{round_number}"
        seed = int(rng.integers(1 << 30))
        child = subprocess.Popen(
            [sys.executable, "-c", KILL_WRITER, str(data_path), str(index_path), str(seed)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None

        # Let it acknowledge a random number of batches, then kill it mid-flight.
        wait_for = int(rng.integers(1, 60))
        lines = []
        while len(lines) < wait_for:
            line = child.stdout.readline()
            if not line:
                break
            lines.append(line)
        time.sleep(float(rng.uniform(0, 0.01)))
        child.send_signal(signal.SIGKILL)
        lines += child.stdout.readlines()  # acks already in the pipe count too
        child.wait()
        child.stdout.close()
        assert child.returncode == -signal.SIGKILL  # killed mid-run, not finished
        acked = max(int(line.split()[1]) for line in lines)

        slots = np.random.default_rng(seed).permutation(1024).tolist()
        with WritableLayer.open(data_path, index_path) as rw:
            present = []
            for i, slot in enumerate(slots):
                size = (i % 15 + 1) * 4096
                got = rw.pread(slot * 65536, size)
                assert got in ((i + 1).to_bytes(4, "little") * (size // 4), bytes(size)), i
                present.append(got != bytes(size))
        # Acknowledged writes are all there, and what survived is a prefix of the writes.
        assert all(present[:acked]), (round_number, acked)
        survived = sum(present)
        assert survived >= acked
        assert not any(present[survived:])


# ---------------------------------------------------------------------------------------------
# Opening read-only


def file_state(*paths: Path) -> list[tuple[bytes, int]]:
    return [(path.read_bytes(), path.stat().st_mtime_ns) for path in paths]


def test_a_read_only_open_modifies_nothing_even_with_a_torn_tail(
    paths: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    acked = pattern(8192, 26)
    with WritableLayer.create(*paths, MiB) as rw:
        rw.pwrite(0, acked)
        rw.flush()
        rw.pwrite(0, pattern(4096, 27))
    os.truncate(paths[0], HT_SPACE + 8192)  # the second write's data was lost
    with open(paths[1], "ab") as index_file:
        index_file.write(b"\x07" * 5)  # and a torn entry after it
    before = file_state(*paths)

    with caplog.at_level(logging.WARNING), WritableLayer.open(*paths, readonly=True) as rw:
        assert rw.readonly
        assert rw.pread(0, 8192) == acked
        rw.flush()  # nothing to make durable; must not fail either
        with pytest.raises(ReadOnlyError, match="opened read-only; write refused; open it with"):
            rw.pwrite(0, bytes(512))
        with pytest.raises(ReadOnlyError, match="opened read-only; trim refused"):
            rw.trim(0, 512)
        with pytest.raises(ReadOnlyError, match="opened read-only; seal refused"):
            rw.seal()

    assert file_state(*paths) == before
    assert "read-only, the file is left as it is" in caplog.text
    assert "dropped 1 index entries from offset 4112" in caplog.text


def test_a_read_only_layer_opens_files_without_write_permission(
    paths: tuple[Path, Path],
) -> None:
    data = pattern(4096, 28)
    with WritableLayer.create(*paths, MiB) as rw:
        rw.pwrite(4096, data)
    for path in paths:
        path.chmod(0o444)

    with WritableLayer.open(*paths, readonly=True) as rw:
        assert rw.pread(4096, 4096) == data


def test_a_read_only_sparse_layer_is_not_extended(tmp_path: Path) -> None:
    data_path = tmp_path / "sparse_data"
    data = pattern(4096, 29)
    with WritableLayer.create(data_path, None, 4 * MiB, sparse=True) as rw:
        rw.pwrite(0, data)
    os.truncate(data_path, HT_SPACE + MiB)  # shorter than the virtual disk
    before = file_state(data_path)

    with WritableLayer.open(data_path, readonly=True) as rw:
        assert rw.pread(0, 8192) == data + bytes(4096)
        assert rw.pread(2 * MiB, 4096) == bytes(4096)
    assert file_state(data_path) == before


# ---------------------------------------------------------------------------------------------
# Looking up a range


def test_lookup_gives_the_whole_mappings_over_a_range(layer: WritableLayer) -> None:
    layer.pwrite(0, pattern(64 * KiB, 30))  # sectors [0, 128) at data sector 8
    layer.pwrite(16 * KiB, pattern(8 * KiB, 31))  # sectors [32, 48) at data sector 136
    layer.trim(MiB, 4 * KiB)  # sectors [2048, 2056), zeroed

    assert layer.lookup(40, 100) == [(32, 16, 136, False), (48, 80, 56, False)]
    assert layer.lookup(0, 1) == [(0, 32, 8, False)]
    assert layer.lookup(128, 1920) == []
    assert layer.lookup(2050, 1) == [(2048, 8, 152, True)]


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
