"""The block handler: block reads and writes, trims, write-same, durability, byte-level RMW."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import TESTDATA, needs_testdata

from workbench.device.handler import BlockHandler, Capacity, LbaRangeError, SectorLocks
from workbench.errors import ReadOnlyError
from workbench.image.layer import ReadOnlyLayer
from workbench.image.stack import LayerStack
from workbench.image.writable import WritableLayer
from workbench.tracing import recording

KiB, MiB = 1 << 10, 1 << 20
DISK = 4 * MiB


def pattern(length: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, length, np.uint8).tobytes()


def writable_stack(directory: Path, size: int = DISK, lowers: list | None = None) -> LayerStack:
    upper = WritableLayer.create(directory / "upper.data", directory / "upper.index", size)
    return LayerStack(lowers or [], upper)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LayerStack]:
    with writable_stack(tmp_path) as stack:
        yield stack


@pytest.fixture
def handler(stack: LayerStack) -> BlockHandler:
    return BlockHandler(stack)


@pytest.fixture
def layered(tmp_path: Path) -> Iterator[BlockHandler]:
    """layer1 of the testdata under a writable layer: lower data to hide."""
    if not (TESTDATA / "layer1.lsmt").is_file():
        pytest.skip(f"OverlayBD reference files not found at {TESTDATA}")
    lower = ReadOnlyLayer.open(TESTDATA / "layer1.lsmt")
    with writable_stack(tmp_path, lower.virtual_size, [lower]) as stack:
        yield BlockHandler(stack)


# ---------------------------------------------------------------------------------------------
# Geometry and modes


def test_capacity_is_the_stack_size_in_blocks(stack: LayerStack) -> None:
    assert BlockHandler(stack).capacity() == Capacity(DISK // 512, 512)
    big = BlockHandler(stack, block_size=4096).capacity()
    assert (big.blocks, big.last_lba, big.bytes) == (DISK // 4096, DISK // 4096 - 1, DISK)


def test_block_size_must_be_whole_sectors(stack: LayerStack) -> None:
    with pytest.raises(ValueError, match="block size 1000 is not a positive multiple of 512"):
        BlockHandler(stack, block_size=1000)


@needs_testdata
def test_a_stack_without_writable_layer_is_read_only() -> None:
    with LayerStack([ReadOnlyLayer.open(TESTDATA / "layer1.lsmt")]) as stack:
        handler = BlockHandler(stack)
        assert handler.read_only
        with pytest.raises(ReadOnlyError, match="write refused: the device is read-only"):
            handler.write(0, bytes(512))
        with pytest.raises(ReadOnlyError, match="unmap refused"):
            handler.unmap([(0, 1)])
        with pytest.raises(ReadOnlyError, match="write refused"):
            handler.write_bytes(3, b"x")
        handler.synchronize_cache()  # nothing to make durable, and no error
        with pytest.raises(ReadOnlyError, match="needs a writable layer"):
            BlockHandler(stack, read_only=False)


def test_read_only_flag_protects_a_writable_stack(stack: LayerStack) -> None:
    handler = BlockHandler(stack, read_only=True)
    with pytest.raises(ReadOnlyError, match="write same refused"):
        handler.write_same(0, 4, bytes(512))
    assert stack.pread(0, 512) == bytes(512)


# ---------------------------------------------------------------------------------------------
# Blocks


def test_written_blocks_read_back_and_the_rest_is_zeros(handler: BlockHandler) -> None:
    data = pattern(8 * KiB, 1)
    handler.write(10, data)
    assert handler.read(10, 16) == data
    assert handler.read(0, 10) == bytes(10 * 512)
    assert handler.read(26, 2) == bytes(1024)
    assert handler.read(5, 0) == b""


def test_blocks_of_4k_address_by_4k(stack: LayerStack) -> None:
    handler = BlockHandler(stack, block_size=4096)
    data = pattern(4096, 2)
    handler.write(3, data)
    assert stack.pread(3 * 4096, 4096) == data
    assert handler.read(3, 1) == data
    with pytest.raises(ValueError, match="write of 512 bytes is not whole blocks of 4096"):
        handler.write(0, bytes(512))


def test_ranges_past_the_last_block_are_refused(handler: BlockHandler) -> None:
    last = handler.blocks - 1
    assert handler.read(last, 1) == bytes(512)
    with pytest.raises(LbaRangeError, match=r"blocks \[8191, 8193\) reaches past the last block"):
        handler.read(last, 2)
    with pytest.raises(LbaRangeError, match="past the last block 8191") as caught:
        handler.write(handler.blocks, bytes(512))
    assert caught.value.lba == handler.blocks
    with pytest.raises(LbaRangeError):
        handler.unmap([(0, 1), (last, 2)])
    with pytest.raises(ValueError, match="negative"):
        handler.read(-1, 1)


@needs_testdata
def test_unmap_reads_as_zeros_and_hides_the_lower_layer(layered: BlockHandler) -> None:
    assert layered.read(0, 8) != bytes(4096)  # layer1 wrote [0, 1 MiB)
    lower_after = layered.read(8, 8)

    layered.unmap([(0, 8), (100, 4)])

    assert layered.read(0, 8) == bytes(4096)
    assert layered.read(100, 4) == bytes(2048)
    assert layered.read(8, 8) == lower_after
    index = layered.stack.upper.index.to_frame()
    assert index.zeroed.all() and index.offset.tolist() == [0, 100]


def test_a_bad_unmap_range_changes_nothing(handler: BlockHandler) -> None:
    handler.write(0, pattern(512, 3))
    with pytest.raises(LbaRangeError):
        handler.unmap([(0, 1), (handler.blocks, 1)])
    assert handler.read(0, 1) == pattern(512, 3)


@needs_testdata
def test_write_same_of_zeros_with_unmap_trims(layered: BlockHandler) -> None:
    layered.write_same(0, 16, bytes(512), unmap=True)
    assert layered.read(0, 16) == bytes(8192)
    frame = layered.stack.upper.index.to_frame()
    assert frame.zeroed.tolist() == [True]
    assert (frame.offset.tolist(), frame.length.tolist()) == ([0], [16])


@needs_testdata
def test_write_same_without_unmap_writes_the_block(layered: BlockHandler) -> None:
    layered.write_same(0, 16, bytes(512))
    assert layered.read(0, 16) == bytes(8192)
    assert not layered.stack.upper.index.to_frame().zeroed.any()

    block = pattern(512, 4)
    layered.write_same(32, 3000, block, unmap=True)  # non-zero: written despite UNMAP
    assert layered.read(32, 3000) == block * 3000
    with pytest.raises(ValueError, match="one block of 512 bytes, got 1024"):
        layered.write_same(0, 1, bytes(1024))


def test_synchronize_cache_makes_writes_durable(tmp_path: Path) -> None:
    data = pattern(64 * KiB, 5)
    stack = writable_stack(tmp_path)
    handler = BlockHandler(stack)
    handler.write(40, data)
    handler.unmap([(0, 8)])
    handler.synchronize_cache()
    stack.close()

    with LayerStack(
        [], WritableLayer.open(tmp_path / "upper.data", tmp_path / "upper.index")
    ) as again:
        reopened = BlockHandler(again)
        assert reopened.read(40, len(data) // 512) == data
        frame = again.upper.index.to_frame()
        assert frame.zeroed.tolist()[0] and frame.offset.tolist()[0] == 0


def test_every_call_emits_a_device_event(handler: BlockHandler) -> None:
    with recording() as recorder:
        handler.write(0, bytes(1024))
        handler.read(0, 2)
        handler.unmap([(4, 2)])
        handler.write_same(8, 2, bytes(512), unmap=True)
        handler.synchronize_cache()
    device = [(e.op, e.offset, e.length) for e in recorder.events if e.layer == "device"]
    assert device == [
        ("write", 0, 1024),
        ("read", 0, 1024),
        ("unmap", 2048, 1024),
        ("write_same", 4096, 1024),
        ("sync", 0, DISK),
    ]


# ---------------------------------------------------------------------------------------------
# Bytes of any alignment


def test_unaligned_write_patches_partial_sectors(handler: BlockHandler) -> None:
    base = pattern(4096, 6)
    handler.write(0, base)
    handler.write_bytes(500, b"abcdefghijklmnopqrstuvwxyz")
    expected = bytearray(base)
    expected[500:526] = b"abcdefghijklmnopqrstuvwxyz"
    assert handler.read(0, 8) == expected
    assert handler.read_bytes(498, 30) == expected[498:528]


def test_byte_reads_are_short_at_the_end_and_writes_past_it_fail(handler: BlockHandler) -> None:
    assert len(handler.read_bytes(DISK - 10, 100)) == 10
    assert handler.read_bytes(DISK + 5, 10) == b""
    with pytest.raises(LbaRangeError, match=r"bytes \[4194300, 4194310\) reaches past the end"):
        handler.write_bytes(DISK - 4, bytes(10))


@needs_testdata
def test_discard_bytes_trims_whole_sectors_and_zeros_the_ends(layered: BlockHandler) -> None:
    before = layered.read_bytes(0, 10000)
    layered.discard_bytes(100, 5000)
    expected = bytearray(before)
    expected[100:5100] = bytes(5000)
    assert layered.read_bytes(0, 10000) == expected
    zeroed = layered.stack.upper.index.to_frame()
    assert zeroed[zeroed.zeroed].offset.tolist() == [1]  # sectors [1, 9) trimmed

    layered.discard_bytes(9000, 10)  # inside one sector: a patch, no trim
    expected[9000:9010] = bytes(10)
    assert layered.read_bytes(0, 10000) == expected


@needs_testdata
def test_detect_zeroes_stores_a_zero_write_as_a_trim(layered: BlockHandler) -> None:
    detecting = BlockHandler(layered.stack, detect_zeroes=True)
    detecting.write_bytes(0, bytes(8192))  # over layer1's data: must hide it
    detecting.write_bytes(MiB, bytes(3 * MiB))  # longer than the 1 MiB comparison window
    detecting.write_bytes(16384, bytes(1024))  # under ZERO_DETECT_MIN: written as data
    almost = bytearray(8192)
    almost[-1] = 1
    detecting.write_bytes(32768, almost)  # one byte set: written as data

    frame = detecting.stack.upper.index.to_frame()
    assert frame[frame.zeroed].offset.tolist() == [0, MiB // 512]
    assert frame[~frame.zeroed].offset.tolist() == [32, 64]
    assert detecting.read_bytes(0, 8192) == bytes(8192)
    assert detecting.read_bytes(32768, 8192) == almost


def test_zero_writes_are_data_without_detect_zeroes(handler: BlockHandler) -> None:
    handler.write_bytes(0, bytes(8192))
    assert not handler.stack.upper.index.to_frame().zeroed.any()


@given(
    writes=st.lists(
        st.tuples(st.integers(0, 16 * KiB - 1), st.binary(min_size=1, max_size=3000)),
        min_size=1,
        max_size=12,
    ),
    reads=st.lists(st.tuples(st.integers(0, 16 * KiB), st.integers(0, 5000)), max_size=6),
)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_byte_writes_match_a_bytearray_model(
    tmp_path_factory: pytest.TempPathFactory,
    writes: list[tuple[int, bytes]],
    reads: list[tuple[int, int]],
) -> None:
    size = 16 * KiB
    model = bytearray(size)
    with writable_stack(tmp_path_factory.mktemp("model"), size) as stack:
        handler = BlockHandler(stack)
        for offset, data in writes:
            data = data[: size - offset]
            assert handler.write_bytes(offset, data) == len(data)
            model[offset : offset + len(data)] = data
        for offset, length in reads:
            assert handler.read_bytes(offset, length) == bytes(model[offset : offset + length])
        assert handler.read(0, size // 512) == model


def test_concurrent_byte_writes_to_one_sector_lose_no_update(handler: BlockHandler) -> None:
    """Eight threads each own a few bytes of the same sectors; RMW must keep every byte."""
    threads_n, rounds = 8, 60

    def writer(slot: int) -> None:
        for round_ in range(rounds):
            value = bytes([slot * 16 + round_ % 16]) * 3
            handler.write_bytes(700 + slot * 3, value)  # sector 1, straddling nothing else

    threads = [threading.Thread(target=writer, args=(slot,)) for slot in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    got = handler.read_bytes(700, threads_n * 3)
    expected = b"".join(bytes([slot * 16 + (rounds - 1) % 16]) * 3 for slot in range(threads_n))
    assert got == expected
    assert handler.locks.held == []


def test_sector_locks_exclude_overlapping_ranges_only() -> None:
    locks = SectorLocks()
    locks.acquire(0, 4)
    locks.acquire(4, 8)  # adjacent: no wait

    entered = threading.Event()

    def overlapping() -> None:
        locks.acquire(3, 5)
        entered.set()
        locks.release(3, 5)

    thread = threading.Thread(target=overlapping)
    thread.start()
    assert not entered.wait(0.1)
    locks.release(0, 4)
    assert not entered.wait(0.1)  # still overlaps [4, 8)
    locks.release(4, 8)
    assert entered.wait(5)
    thread.join()
    assert locks.held == []
