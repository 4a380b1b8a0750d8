"""BlockCache: counters, alignment, coalescing, persistence, crash safety, eviction, readahead."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.blobs import cache as cache_module
from workbench.blobs.cache import (
    MARKER_NAME,
    BlockCache,
    BlockFetchError,
    CachedBlob,
    CacheDirectoryError,
    default_cache_dir,
    file_stem,
    inventory,
)
from workbench.tracing import core as trace

KIB = 1 << 10
REFILL = 64 * KIB
KEY = "sha256:" + "ab" * 32
T = TypeVar("T")


class FakeFetcher:
    """Serves a bytes object as a remote blob; counts calls, can be slow or fail."""

    def __init__(self, data: bytes, delay: float = 0.0) -> None:
        self.data = data
        self.delay = delay
        self.calls: list[tuple[int, int]] = []
        self.fail: Exception | None = None

    async def __call__(self, offset: int, length: int) -> bytes:
        self.calls.append((offset, length))
        if self.delay:
            await trio.sleep(self.delay)
        else:
            await trio.lowlevel.checkpoint()
        if self.fail is not None:
            raise self.fail
        return self.data[offset : offset + length]


def blob_bytes(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def run(async_fn: Callable[..., Awaitable[T]], *args: object) -> T:
    return trio.run(async_fn, *args)


# ---------------------------------------------------------------- counters and alignment


def test_counters_after_each_read(tmp_path: Path) -> None:
    data = blob_bytes(10 * REFILL + 123)
    fetcher = FakeFetcher(data)

    async def main() -> None:
        with BlockCache(tmp_path, refill_size=REFILL) as cache:
            blob = cache.open_blob(KEY, len(data), fetcher)

            assert await blob.pread(100, 1000) == data[100:1100]
            stats = blob.statistics()
            assert (stats.hits, stats.misses, stats.fetches) == (0, 1, 1)
            assert stats.bytes_fetched == REFILL and stats.bytes_from_cache == 0
            assert stats.present_bytes == REFILL

            assert await blob.pread(2000, 500) == data[2000:2500]
            stats = blob.statistics()
            assert (stats.hits, stats.misses, stats.fetches) == (1, 1, 1)
            assert stats.bytes_from_cache == 500

            # Straddles the cached block and the next one: one fetch, a miss.
            assert await blob.pread(REFILL - 10, 20) == data[REFILL - 10 : REFILL + 10]
            stats = blob.statistics()
            assert (stats.hits, stats.misses, stats.fetches) == (1, 2, 2)
            assert stats.bytes_from_cache == 510
            assert stats.bytes_fetched == 2 * REFILL

            # The short last block, and a read past the end.
            assert await blob.pread(len(data) - 50, 100) == data[-50:]
            assert await blob.pread(len(data), 10) == b""
            assert cache.statistics().present_bytes == 2 * REFILL + 123

    run(main)
    assert fetcher.calls == [(0, REFILL), (REFILL, REFILL), (10 * REFILL, 123)]


def test_misses_are_fetched_as_aligned_coalesced_extents(tmp_path: Path) -> None:
    data = blob_bytes(64 * REFILL)
    fetcher = FakeFetcher(data)

    async def main() -> None:
        with BlockCache(tmp_path, refill_size=REFILL, max_fetch_size=8 * REFILL) as cache:
            blob = cache.open_blob(KEY, len(data), fetcher, readahead=False)
            await blob.pread(3 * REFILL + 5, 1)
            # Missing blocks 2..13 (3 present): [2,3) then [4,12) capped at 8 blocks, [12,14).
            assert (
                await blob.pread(2 * REFILL + 7, 12 * REFILL - 9)
                == data[2 * REFILL + 7 : 14 * REFILL - 2]
            )

    run(main)
    # The three fetches of the second read run concurrently, in any order.
    assert fetcher.calls[0] == (3 * REFILL, REFILL)
    assert sorted(fetcher.calls[1:]) == [
        (2 * REFILL, REFILL),
        (4 * REFILL, 8 * REFILL),
        (12 * REFILL, 2 * REFILL),
    ]
    for offset, length in fetcher.calls:
        assert offset % REFILL == 0 and length % REFILL == 0


def test_concurrent_readers_of_a_missing_block_share_one_fetch(tmp_path: Path) -> None:
    data = blob_bytes(4 * REFILL)
    fetcher = FakeFetcher(data, delay=0.05)
    results: dict[int, bytes] = {}

    async def reader(blob: CachedBlob, index: int) -> None:
        results[index] = await blob.pread(index * 100, 4000)

    async def main() -> None:
        with BlockCache(tmp_path, refill_size=REFILL) as cache:
            blob = cache.open_blob(KEY, len(data), fetcher)
            async with trio.open_nursery() as nursery:
                for index in range(16):
                    nursery.start_soon(reader, blob, index)
            assert blob.statistics().misses == 16

    run(main)
    assert fetcher.calls == [(0, REFILL)]
    assert all(results[index] == data[index * 100 : index * 100 + 4000] for index in range(16))


def test_reads_emit_tracing_events(tmp_path: Path) -> None:
    data = blob_bytes(2 * REFILL)

    async def main() -> None:
        with BlockCache(tmp_path, refill_size=REFILL) as cache:
            blob = cache.open_blob(KEY, len(data), FakeFetcher(data))
            await blob.pread(0, 10)
            await blob.pread(10, 10)

    with trace.recording() as recorder:
        run(main)
    events = [(e.layer, e.op, e.offset, e.length, e.nbytes, e.hit) for e in recorder.events]
    assert events == [
        ("cache", "fetch", 0, REFILL, REFILL, None),
        ("cache", "read", 0, 10, 10, False),
        ("cache", "read", 10, 10, 10, True),
    ]


# ---------------------------------------------------------------- persistence and crash safety


def test_cached_blocks_survive_a_restart(tmp_path: Path) -> None:
    data = blob_bytes(5 * REFILL)
    fetcher = FakeFetcher(data)

    async def read_all() -> bytes:
        with BlockCache(tmp_path, refill_size=REFILL) as cache:
            blob = cache.open_blob(KEY, len(data), fetcher)
            return await blob.pread(0, len(data))

    assert run(read_all) == data
    assert len(fetcher.calls) == 1
    assert run(read_all) == data
    assert len(fetcher.calls) == 1  # the second run read only the disk

    [entry] = inventory(tmp_path)
    assert (entry.key, entry.size, entry.present_bytes) == (KEY, len(data), len(data))
    assert entry.stem == "sha256-" + "ab" * 32


def test_a_crash_between_data_and_record_loses_the_block_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = blob_bytes(3 * REFILL)
    fetcher = FakeFetcher(data)
    real_write_blocks = cache_module._write_blocks

    def write_then_die(*args: object) -> list[int]:
        real_write_blocks(*args)
        raise KeyboardInterrupt("simulated crash after the data write")

    async def crash() -> None:
        cache = BlockCache(tmp_path, refill_size=REFILL)
        blob = cache.open_blob(KEY, len(data), fetcher)
        monkeypatch.setattr(cache_module, "_write_blocks", write_then_die)
        with pytest.raises(KeyboardInterrupt):
            await blob.pread(0, 10)
        # The process "dies": no close, files left as they are; release the lock only.
        os.close(cache._lock_fd)

    run(crash)
    monkeypatch.setattr(cache_module, "_write_blocks", real_write_blocks)
    assert inventory(tmp_path)[0].present_bytes == 0

    async def reopen() -> None:
        with BlockCache(tmp_path, refill_size=REFILL) as cache:
            blob = cache.open_blob(KEY, len(data), fetcher)
            assert await blob.pread(0, 10) == data[:10]
            assert blob.statistics().misses == 1

    run(reopen)
    assert fetcher.calls == [(0, REFILL), (0, REFILL)]


@pytest.mark.parametrize("verify", ["first", "always"])
def test_a_corrupt_block_fails_its_crc_and_is_fetched_again(tmp_path: Path, verify: str) -> None:
    data = blob_bytes(3 * REFILL)
    fetcher = FakeFetcher(data)
    data_path = tmp_path / f"{file_stem(KEY)}.data"

    def corrupt() -> None:
        with open(data_path, "r+b") as file:
            file.seek(REFILL + 77)
            byte = file.read(1)
            file.seek(REFILL + 77)
            file.write(bytes([byte[0] ^ 0xFF]))

    async def main() -> None:
        with BlockCache(tmp_path, refill_size=REFILL, verify=verify) as cache:  # type: ignore
            blob = cache.open_blob(KEY, len(data), fetcher)
            assert await blob.pread(0, len(data)) == data
        corrupt()

        with BlockCache(tmp_path, refill_size=REFILL, verify=verify) as cache:  # type: ignore
            blob = cache.open_blob(KEY, len(data), fetcher)
            assert await blob.pread(REFILL + 70, 20) == data[REFILL + 70 : REFILL + 90]
            stats = blob.statistics()
            assert (stats.crc_failures, stats.evictions, stats.fetches) == (1, 1, 1)
            if verify == "always":
                # Corrupted while open: caught too, since every read is checked.
                corrupt()
                assert await blob.pread(REFILL, 100) == data[REFILL : REFILL + 100]
                assert blob.statistics().crc_failures == 2

    run(main)
    assert fetcher.calls[-1] == (REFILL, REFILL)


def test_fetch_errors_propagate_with_the_cause_and_mark_nothing(tmp_path: Path) -> None:
    data = blob_bytes(2 * REFILL)
    fetcher = FakeFetcher(data, delay=0.01)
    fetcher.fail = ConnectionResetError("peer went away")

    async def waiter(blob: CachedBlob, errors: list[BlockFetchError]) -> None:
        try:
            await blob.pread(5, 5)
        except BlockFetchError as exc:
            errors.append(exc)

    async def main() -> None:
        with BlockCache(tmp_path, refill_size=REFILL) as cache:
            blob = cache.open_blob(KEY, len(data), fetcher)
            with pytest.raises(BlockFetchError, match=r"fetching bytes 0\+65536 failed") as info:
                await blob.pread(0, 10)
            assert isinstance(info.value.__cause__, ConnectionResetError)
            assert blob.statistics().present_bytes == 0

            # Concurrent waiters of the failing fetch all see the error; one fetch was made.
            errors: list[BlockFetchError] = []
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(waiter, blob, errors)
            assert len(errors) == 4 and len(fetcher.calls) == 2

            fetcher.fail = None
            assert await blob.pread(0, 10) == data[:10]

    run(main)
    assert inventory(tmp_path)[0].present_bytes == REFILL


def test_a_short_fetch_is_an_error(tmp_path: Path) -> None:
    data = blob_bytes(REFILL)

    async def main() -> None:
        with BlockCache(tmp_path, refill_size=REFILL) as cache:
            blob = cache.open_blob(KEY, 2 * REFILL, FakeFetcher(data))
            with pytest.raises(BlockFetchError, match="fetch returned 0 bytes at 65536"):
                await blob.pread(REFILL, 10)
            assert blob.statistics().present_bytes == 0

    run(main)


# ---------------------------------------------------------------- eviction


def test_eviction_keeps_the_total_under_capacity(tmp_path: Path) -> None:
    blobs = {
        f"sha256:{index:064x}": blob_bytes(10 * REFILL + 999, seed=index) for index in range(3)
    }
    fetchers = {key: FakeFetcher(data) for key, data in blobs.items()}
    capacity = 6 * REFILL
    rng = random.Random(7)

    async def main() -> None:
        with BlockCache(tmp_path, capacity_bytes=capacity, refill_size=REFILL) as cache:
            handles = {
                key: cache.open_blob(key, len(data), fetchers[key]) for key, data in blobs.items()
            }
            for _ in range(200):
                key = rng.choice(list(blobs))
                offset = rng.randrange(len(blobs[key]))
                length = rng.randrange(1, 3 * REFILL)
                assert (
                    await handles[key].pread(offset, length) == blobs[key][offset : offset + length]
                )
                assert cache.statistics().present_bytes <= capacity
            assert cache.statistics().evictions > 0

    run(main)
    assert sum(entry.present_bytes for entry in inventory(tmp_path)) <= capacity


def test_eviction_takes_the_least_recently_used_block(tmp_path: Path) -> None:
    data = blob_bytes(4 * REFILL)
    fetcher = FakeFetcher(data)

    async def main() -> None:
        with BlockCache(tmp_path, capacity_bytes=2 * REFILL, refill_size=REFILL) as cache:
            blob = cache.open_blob(KEY, len(data), fetcher, readahead=False)
            await blob.pread(0, 1)
            await blob.pread(REFILL, 1)
            await blob.pread(0, 1)  # block 0 is now the most recent
            await blob.pread(2 * REFILL, 1)  # evicts block 1
            fetcher.calls.clear()
            await blob.pread(0, 1)
            assert fetcher.calls == []
            await blob.pread(REFILL, 1)
            assert fetcher.calls == [(REFILL, REFILL)]

    run(main)


def test_a_read_larger_than_the_cache_is_served_not_kept(tmp_path: Path) -> None:
    data = blob_bytes(8 * REFILL)

    async def main() -> None:
        with BlockCache(tmp_path, capacity_bytes=2 * REFILL, refill_size=REFILL) as cache:
            blob = cache.open_blob(KEY, len(data), FakeFetcher(data), readahead=False)
            assert await blob.pread(0, len(data)) == data
            assert cache.statistics().present_bytes <= 2 * REFILL

    run(main)


def test_clear_removes_one_blob_or_all(tmp_path: Path) -> None:
    data = blob_bytes(2 * REFILL)
    other = "sha256:" + "cd" * 32

    async def main() -> None:
        with BlockCache(tmp_path, refill_size=REFILL) as cache:
            for key in (KEY, other):
                blob = cache.open_blob(key, len(data), FakeFetcher(data))
                await blob.pread(0, len(data))
                blob.close()
            assert cache.clear(other) == len(data)
            assert [blob.key for blob in cache.statistics().blobs] == [KEY]
            assert cache.clear() == len(data)
            assert cache.statistics().present_bytes == 0

    run(main)
    assert sorted(os.listdir(tmp_path)) == [MARKER_NAME]


# ---------------------------------------------------------------- directory rules


def test_a_foreign_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("not a cache")
    with pytest.raises(CacheDirectoryError, match="not empty and not a workbench block cache"):
        BlockCache(tmp_path)
    with pytest.raises(CacheDirectoryError, match="no WORKBENCH-CACHE marker file"):
        inventory(tmp_path)


def test_a_second_cache_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    with BlockCache(tmp_path), pytest.raises(CacheDirectoryError, match="in use by another"):
        BlockCache(tmp_path)


def test_default_directory_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("WORKBENCH_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "workbench" / "blocks"


def test_a_blob_reopened_with_another_size_starts_empty(tmp_path: Path) -> None:
    data = blob_bytes(2 * REFILL)

    async def main() -> None:
        with BlockCache(tmp_path, refill_size=REFILL) as cache:
            blob = cache.open_blob(KEY, len(data), FakeFetcher(data))
            await blob.pread(0, len(data))
            blob.close()
            fetcher = FakeFetcher(data[:REFILL])
            blob = cache.open_blob(KEY, REFILL, fetcher)
            assert await blob.pread(0, REFILL) == data[:REFILL]
            assert fetcher.calls == [(0, REFILL)]

    run(main)


# ---------------------------------------------------------------- background work


def test_readahead_reduces_fetches_of_sequential_reads(tmp_path: Path) -> None:
    data = blob_bytes(64 * REFILL)
    counts = {}

    async def read_sequentially(readahead: bool) -> None:
        fetcher = FakeFetcher(data, delay=0.002)
        directory = tmp_path / str(readahead)
        async with BlockCache(directory, refill_size=REFILL).running() as cache:
            blob = cache.open_blob(KEY, len(data), fetcher, readahead=readahead)
            chunks = [
                await blob.pread(offset, 16 * KIB) for offset in range(0, len(data), 16 * KIB)
            ]
            assert b"".join(chunks) == data
        counts[readahead] = len(fetcher.calls)

    run(read_sequentially, False)
    run(read_sequentially, True)
    assert counts[False] == 64
    assert counts[True] <= 64 // 4


def test_background_download_is_rate_capped_and_fills_every_block(tmp_path: Path) -> None:
    data = blob_bytes(20 * REFILL + 5)
    fetcher = FakeFetcher(data)
    rate = 20 * REFILL / 0.5  # the whole blob in about half a second

    async def main() -> float:
        async with BlockCache(
            tmp_path, refill_size=REFILL, max_fetch_size=2 * REFILL
        ).running() as cache:
            blob = cache.open_blob(KEY, len(data), fetcher)
            started = time.monotonic()
            await blob.download(rate)
            elapsed = time.monotonic() - started
            assert blob.statistics().present_bytes == len(data)
            return elapsed

    elapsed = run(main)
    assert elapsed >= 0.9 * len(data) / rate
    assert elapsed < 5
    assert sum(length for _, length in fetcher.calls) == len(data)


def test_background_download_stops_when_the_blob_closes(tmp_path: Path) -> None:
    data = blob_bytes(20 * REFILL)
    fetcher = FakeFetcher(data)

    async def main() -> None:
        async with BlockCache(
            tmp_path, refill_size=REFILL, max_fetch_size=REFILL
        ).running() as cache:
            blob = cache.open_blob(KEY, len(data), fetcher)
            blob.start_download(rate_bytes_per_s=REFILL / 0.02)
            await trio.sleep(0.1)
            blob.close()
            fetched = len(fetcher.calls)
            await trio.sleep(0.1)
            assert len(fetcher.calls) == fetched < 20

    run(main)


def test_start_download_needs_a_running_cache(tmp_path: Path) -> None:
    with BlockCache(tmp_path) as cache:
        blob = cache.open_blob(KEY, 10, FakeFetcher(b"0123456789"))
        with pytest.raises(RuntimeError, match="needs the cache running"):
            blob.start_download()


# ---------------------------------------------------------------- property


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(1, 12 * 4096),
    reads=st.lists(st.tuples(st.integers(0, 13 * 4096), st.integers(0, 5 * 4096)), max_size=30),
    seed=st.integers(0, 1000),
)
def test_random_reads_through_a_tiny_cache_equal_the_blob(
    tmp_path_factory: pytest.TempPathFactory, size: int, reads: list[tuple[int, int]], seed: int
) -> None:
    data = blob_bytes(size, seed)
    directory = tmp_path_factory.mktemp("cache")

    async def main() -> None:
        cache = BlockCache(
            directory, capacity_bytes=3 * 4096, refill_size=4096, max_fetch_size=2 * 4096
        )
        async with cache.running():
            blob = cache.open_blob(KEY, size, FakeFetcher(data))
            for offset, length in reads:
                assert await blob.pread(offset, length) == data[offset : offset + length]
                assert cache.statistics().present_bytes <= 3 * 4096

    run(main)


# ---------------------------------------------------------------- synchronous fast path


def test_read_ready_serves_only_present_checked_blocks(tmp_path: Path) -> None:
    data = blob_bytes(8 * REFILL)
    fetcher = FakeFetcher(data)

    async def main() -> None:
        with BlockCache(tmp_path, refill_size=REFILL) as cache:
            blob = cache.open_blob(KEY, len(data), fetcher, readahead=False)
            assert blob.read_ready(0, 100) is None  # nothing cached yet

            await blob.pread(0, 2 * REFILL)
            hits = blob.statistics().hits
            assert blob.read_ready(10, REFILL) == data[10 : 10 + REFILL]
            assert blob.statistics().hits == hits + 1
            assert blob.read_ready(REFILL, 2 * REFILL) is None  # block 2 is absent
            assert blob.read_ready(len(data) - 1, 1) is None

    run(main)


def test_read_ready_waits_for_the_crc_check_after_a_restart(tmp_path: Path) -> None:
    data = blob_bytes(4 * REFILL)

    async def fill() -> None:
        with BlockCache(tmp_path, refill_size=REFILL) as cache:
            await cache.open_blob(KEY, len(data), FakeFetcher(data)).pread(0, len(data))

    async def reopen() -> None:
        with BlockCache(tmp_path, refill_size=REFILL) as cache:
            blob = cache.open_blob(KEY, len(data), FakeFetcher(data), readahead=False)
            assert blob.read_ready(0, REFILL) is None  # present, but not checked yet
            assert await blob.pread(0, REFILL) == data[:REFILL]
            assert blob.read_ready(0, REFILL) == data[:REFILL]

    run(fill)
    run(reopen)


def test_read_ready_is_off_when_every_read_is_verified(tmp_path: Path) -> None:
    data = blob_bytes(2 * REFILL)

    async def main() -> None:
        with BlockCache(tmp_path, refill_size=REFILL, verify="always") as cache:
            blob = cache.open_blob(KEY, len(data), FakeFetcher(data), readahead=False)
            await blob.pread(0, len(data))
            assert blob.read_ready(0, REFILL) is None

    run(main)


def test_read_ready_never_returns_evicted_bytes(tmp_path: Path) -> None:
    data = blob_bytes(4 * REFILL)

    async def main() -> None:
        with BlockCache(tmp_path, refill_size=REFILL) as cache:
            blob = cache.open_blob(KEY, len(data), FakeFetcher(data), readahead=False)
            await blob.pread(0, len(data))
            assert blob.read_ready(0, REFILL) == data[:REFILL]

            cache.clear(KEY)
            assert blob.read_ready(0, REFILL) is None
            assert await blob.pread(0, REFILL) == data[:REFILL]  # fetched again
            assert blob.read_ready(0, REFILL) == data[:REFILL]

    run(main)


def test_read_ready_drops_a_read_raced_by_an_eviction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = blob_bytes(2 * REFILL)

    async def main() -> None:
        with BlockCache(tmp_path, refill_size=REFILL) as cache:
            blob = cache.open_blob(KEY, len(data), FakeFetcher(data), readahead=False)
            await blob.pread(0, len(data))
            state = blob._state
            real_pread = os.pread

            def pread_then_evict(fd: int, length: int, offset: int) -> bytes:
                # The eviction lands between the presence check and the read's end.
                state.evict(0)
                return real_pread(fd, length, offset)

            monkeypatch.setattr(cache_module.os, "pread", pread_then_evict)
            assert blob.read_ready(0, REFILL) is None

    run(main)


def test_read_ready_leaves_readahead_to_the_trio_path(tmp_path: Path) -> None:
    data = blob_bytes(32 * REFILL)
    fetcher = FakeFetcher(data)

    async def main() -> None:
        async with BlockCache(tmp_path, refill_size=REFILL).running() as cache:
            blob = cache.open_blob(KEY, len(data), fetcher, max_readahead=8 * REFILL)
            await blob.pread(0, REFILL)
            await blob.pread(REFILL, REFILL)
            await cache.drain()
            # Sequential, and the window ahead is not cached: the caller must go through pread,
            # which starts the readahead.
            assert blob.read_ready(2 * REFILL, REFILL) is None
            await blob.pread(2 * REFILL, REFILL)
            await cache.drain()
            assert fetcher.calls[-1][0] > 2 * REFILL  # the readahead went out

            # With every block in, sequential reads stay on the fast path to the end.
            await blob.download()
            for offset in range(3 * REFILL, len(data), REFILL):
                assert blob.read_ready(offset, REFILL) == data[offset : offset + REFILL]

    run(main)
