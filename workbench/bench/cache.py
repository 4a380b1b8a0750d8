"""Benchmark of the block cache: hits against a local file, misses against one plain fetch.

Two ratios, each against a baseline measured in the same run:

- hit path: reading a fully cached blob through `CachedBlob.pread` against `os.pread` of the
  same bytes from a plain local file, sequentially in `read_size` pieces (target >= 0.7);
- miss path: a cold, sequential read of the blob through the cache with readahead against one
  whole-blob fetch through the same fetch function (target >= 0.8).

The fetch function is a simulated registry link: every request pays a round trip, then moves
its bytes over one shared link of fixed bandwidth (requests queue for it), so concurrent
readahead fetches cannot go faster than the link. The cache's own costs (writes, `fdatasync`,
CRC32C, bookkeeping) are real.

Caveats:
- the link is simulated with `trio.sleep`, not sockets: HTTP parsing and TLS are not counted;
- the hit baseline reads from the page cache, as the cache does, so both are memory copies.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import trio

from workbench.bench.formats import Table
from workbench.blobs.cache import BlockCache

__all__ = ["CacheBenchmark", "SimulatedLink", "bench_cache"]

KEY = "sha256:" + "5e" * 32


class SimulatedLink:
    """A fetch function over in-memory bytes: a round trip per request, then a shared link."""

    def __init__(self, data: bytes, round_trip_s: float, bandwidth: float) -> None:
        self.data = data
        self.round_trip_s = round_trip_s
        self.bandwidth = bandwidth
        self.requests = 0
        self._link = trio.Lock()

    async def __call__(self, offset: int, length: int) -> bytes:
        self.requests += 1
        await trio.sleep(self.round_trip_s)
        async with self._link:
            await trio.sleep(length / self.bandwidth)
        return self.data[offset : offset + length]


@dataclasses.dataclass
class CacheBenchmark:
    """Sizes and link parameters; `quick()` is a smoke run of about a second."""

    blob_size: int = 256 << 20
    read_sizes: tuple[int, ...] = (4 << 10, 128 << 10, 1 << 20)
    sequential_read_size: int = 128 << 10
    round_trip_s: float = 0.002
    bandwidth: float = 500e6
    repeats: int = 3

    @classmethod
    def quick(cls) -> CacheBenchmark:
        return cls(blob_size=32 << 20, read_sizes=(128 << 10,), repeats=1)


def bench_cache(
    settings: CacheBenchmark | None = None,
    workdir: str | os.PathLike[str] | None = None,
    out: TextIO | None = None,
) -> list[Table]:
    """Run both measurements, print their tables to `out` (stdout), and return them."""
    settings = settings or CacheBenchmark()
    out = out or sys.stdout
    data = os.urandom(settings.blob_size)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="bench-cache-") as scratch:
        tables = [
            _bench_hits(settings, data, Path(scratch)),
            _bench_misses(settings, data, Path(scratch)),
        ]
    for table in tables:
        out.write(table.render() + "\n\n")
    return tables


def _bench_hits(settings: CacheBenchmark, data: bytes, scratch: Path) -> Table:
    """Cached reads against `os.pread` of a local file, per read size."""
    local = scratch / "local.bin"
    local.write_bytes(data)
    link = SimulatedLink(data, 0.0, 10e9)
    table = Table(
        "cache hits: CachedBlob.pread vs os.pread of a local file (sequential)",
        ["read size", "local MB/s", "cached MB/s", "ratio", "target"],
    )

    async def read_cached(cache: BlockCache, read_size: int) -> float:
        blob = cache.open_blob(KEY, len(data), link, readahead=False)
        await blob.pread(0, len(data))  # fill, and verify every block once
        best = float("inf")
        for _ in range(settings.repeats):
            start = time.perf_counter()
            for offset in range(0, len(data), read_size):
                await blob.pread(offset, read_size)
            best = min(best, time.perf_counter() - start)
        return best

    fd = os.open(local, os.O_RDONLY)
    try:
        for read_size in settings.read_sizes:
            local_s = _best_of(
                settings.repeats, lambda size=read_size: _read_local(fd, len(data), size)
            )

            async def main(size: int = read_size) -> float:
                with BlockCache(scratch / "hits", refill_size=256 << 10) as cache:
                    seconds = await read_cached(cache, size)
                    cache.clear()
                    return seconds

            cached_s = trio.run(main)
            table.rows.append(
                [
                    _size(read_size),
                    len(data) / local_s / 1e6,
                    len(data) / cached_s / 1e6,
                    local_s / cached_s,
                    ">= 0.7" if read_size >= 128 << 10 else "-",
                ]
            )
    finally:
        os.close(fd)
    table.notes.append(
        "the cache checks each block's crc32c on its first read only; small reads pay the fixed "
        "cost of a trio call and the block bookkeeping"
    )
    return table


def _bench_misses(settings: CacheBenchmark, data: bytes, scratch: Path) -> Table:
    """A cold sequential read through the cache with readahead vs one whole-blob fetch."""
    table = Table(
        "cache misses: cold sequential read with readahead vs one whole-blob fetch",
        ["read size", "link MB/s", "fetch MB/s", "cached MB/s", "fetches", "ratio", "target"],
    )

    async def plain_fetch() -> float:
        link = SimulatedLink(data, settings.round_trip_s, settings.bandwidth)
        start = time.perf_counter()
        await link(0, len(data))
        return time.perf_counter() - start

    async def cold_read(run: int) -> tuple[float, int]:
        link = SimulatedLink(data, settings.round_trip_s, settings.bandwidth)
        cache = BlockCache(scratch / f"misses-{run}", refill_size=256 << 10)
        async with cache.running():
            blob = cache.open_blob(KEY, len(data), link)
            start = time.perf_counter()
            for offset in range(0, len(data), settings.sequential_read_size):
                await blob.pread(offset, settings.sequential_read_size)
            seconds = time.perf_counter() - start
            cache.clear()
        return seconds, link.requests

    fetch_s = min(trio.run(plain_fetch) for _ in range(settings.repeats))
    runs = [trio.run(cold_read, run) for run in range(settings.repeats)]
    cached_s, requests = min(runs)
    table.rows.append(
        [
            _size(settings.sequential_read_size),
            settings.bandwidth / 1e6,
            len(data) / fetch_s / 1e6,
            len(data) / cached_s / 1e6,
            requests,
            fetch_s / cached_s,
            ">= 0.8",
        ]
    )
    table.notes.append(
        f"simulated link: {settings.round_trip_s * 1e3:.1f} ms round trip per request, "
        f"{settings.bandwidth / 1e6:.0f} MB/s shared; blob {_size(len(data))}, 256 KiB blocks, "
        "readahead up to 16 MiB, data written and fdatasync'ed in the background"
    )
    return table


def _read_local(fd: int, size: int, read_size: int) -> None:
    for offset in range(0, size, read_size):
        os.pread(fd, read_size, offset)


def _best_of(repeats: int, work: object) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def _size(nbytes: int) -> str:
    if nbytes >= 1 << 20:
        return f"{nbytes >> 20} MiB"
    return f"{nbytes >> 10} KiB"
