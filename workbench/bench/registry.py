"""Benchmark of lazy registry reads: the miss path, the hit path and small random reads.

Every figure is a ratio against a baseline measured in the same run, with the same client:

- misses: a cold, sequential read of a blob through a `RegistrySession` (client, block cache,
  readahead) in `read_size` requests from a synchronous thread, as the LSMT stack reads a
  `RemoteBlobFile`, against one plain GET of the whole blob (`read_blob(0, size)`: one
  request, no digest check) through the same client and portal; target >= 0.8. Measured on
  loopback and through the shaping proxy (default 100 Mbit/s, 10 ms RTT), where the depth of
  readahead decides whether the link idles;
- hits: the same blob, now cached, read through `RemoteBlobFile` (the portal hop included)
  against `LocalFile.pread` of the same bytes in a plain local file; target >= 0.7;
- random: 4 KiB reads at random blocks of a cold blob (each one a miss, which fetches a whole
  256 KiB block) against the floor of an empty request (`GET /v2/`) to the same registry with
  the same client; median and p99 latency, and their ratio to the floor's median.

Peers: the embedded registry (in this process, so it shares the GIL with the client) and
Debian's docker-registry (a separate process) when it is installed.

Caveats:
- the cache lives in a temporary directory on the same disk as the local file, so both read
  from the page cache; cold-disk reads are not measured;
- the embedded registry serves from Python threads in this process: its own costs slow the
  client down, which docker-registry does not; both are printed;
- through the shaping proxy both the baseline and the lazy read share the proxy's one trio
  thread, which costs some CPU on loopback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from workbench.bench.formats import Table
from workbench.blobs.common import LocalFile, RandomAccessFile
from workbench.net.shape import ShapingProxy
from workbench.registry import peer
from workbench.registry.reference import ImageReference
from workbench.registry.server import EmbeddedRegistry
from workbench.registry.session import RegistrySession

__all__ = ["RegistryBenchmark", "bench_registry"]

log = logging.getLogger(__name__)

REPOSITORY = "bench/blob"
PEERS = ("embedded", "docker-registry")


@dataclasses.dataclass
class RegistryBenchmark:
    """Sizes, link settings and peers; `quick()` is a smoke run of a few seconds."""

    blob_size: int = 256 << 20
    read_sizes: tuple[int, ...] = (128 << 10, 1 << 20)
    shaped_blob_size: int = 32 << 20
    shaped_mbps: float = 100.0
    shaped_rtt_ms: float = 10.0
    hit_read_sizes: tuple[int, ...] = (4 << 10, 128 << 10, 1 << 20)
    hit_span: int = 64 << 20
    random_reads: int = 200
    random_read_size: int = 4 << 10
    repeats: int = 2
    peers: tuple[str, ...] = PEERS
    refill_size: int = 256 << 10

    @classmethod
    def quick(cls) -> RegistryBenchmark:
        return cls(
            blob_size=64 << 20,
            shaped_blob_size=8 << 20,
            hit_span=16 << 20,
            random_reads=50,
            repeats=1,
            peers=("embedded",),
        )


@dataclasses.dataclass
class _Blobs:
    """What the peer under test serves: a blob for loopback runs and a smaller one to shape."""

    url: str
    data: bytes
    digest: str
    shaped: bytes
    shaped_digest: str


def bench_registry(
    settings: RegistryBenchmark | None = None,
    out: TextIO | None = None,
    workdir: str | os.PathLike[str] | None = None,
) -> list[Table]:
    """Run every measurement against every available peer; print and return the tables."""
    settings = settings or RegistryBenchmark()
    out = out or sys.stdout
    misses = Table(
        "registry misses: cold sequential read through the cache vs one GET of the whole blob",
        ["peer", "link", "read size", "GET MB/s", "lazy MB/s", "requests", "ratio", "target"],
    )
    hits = Table(
        "registry hits: cached reads through RemoteBlobFile vs LocalFile of the same bytes",
        ["peer", "read size", "local MB/s", "cached MB/s", "ratio", "target"],
    )
    randoms = Table(
        "registry random reads: 4 KiB misses vs the floor of an empty request (GET /v2/)",
        ["peer", "link", "request", "median ms", "p99 ms", "ratio to floor"],
    )

    data = os.urandom(settings.blob_size)
    shaped = data[: settings.shaped_blob_size]
    with tempfile.TemporaryDirectory(dir=workdir, prefix="bench-registry-") as scratch_name:
        scratch = Path(scratch_name)
        local = scratch / "local.bin"
        local.write_bytes(data)
        for name in settings.peers:
            if name == "docker-registry" and not peer.available():
                misses.notes.append("docker-registry is not installed: that peer was skipped")
                continue
            with _serve(name, scratch / name) as url:
                blobs = _seed(url, data, shaped, scratch / f"seed-{name}")
                _bench_peer(name, settings, blobs, scratch, local, misses, hits, randoms)

    misses.notes.append(
        f"{_size(settings.blob_size)} blob on loopback, {_size(settings.shaped_blob_size)} "
        f"through the shaping proxy; {_size(settings.refill_size)} blocks; best of "
        f"{settings.repeats}; the GET is one read_blob(0, size) with the same client"
    )
    hits.notes.append(
        f"first {_size(min(settings.hit_span, settings.blob_size))} of the blob, sequentially; "
        "both sides from the page cache"
    )
    randoms.notes.append(
        f"{settings.random_reads} reads at distinct random blocks; a cache miss fetches a whole "
        "block; the ratio compares medians"
    )
    tables = [misses, hits, randoms]
    for table in tables:
        out.write(table.render() + "\n\n")
    return tables


@contextlib.contextmanager
def _serve(name: str, workdir: Path) -> Iterator[str]:
    if name == "embedded":
        with EmbeddedRegistry(workdir) as registry:
            yield registry.url
    elif name == "docker-registry":
        with peer.docker_registry(workdir) as url:
            yield url
    else:
        raise ValueError(f"unknown registry peer {name!r}; choose from {', '.join(PEERS)}")


def _seed(url: str, data: bytes, shaped: bytes, cache_dir: Path) -> _Blobs:
    reference = _reference(url)
    with RegistrySession(cache_dir, use_cache=False) as session:
        digest = session.run(session.client.push_blob, reference, data)
        shaped_digest = session.run(session.client.push_blob, reference, shaped)
    return _Blobs(url, data, digest, shaped, shaped_digest)


def _reference(url: str) -> ImageReference:
    return ImageReference.parse(f"{url.split('://', 1)[1]}/{REPOSITORY}")


def _bench_peer(
    name: str,
    settings: RegistryBenchmark,
    blobs: _Blobs,
    scratch: Path,
    local: Path,
    misses: Table,
    hits: Table,
    randoms: Table,
) -> None:
    port = int(blobs.url.rsplit(":", 1)[1])
    loopback = _reference(blobs.url)
    for read_size in settings.read_sizes:
        row = _bench_misses(settings, scratch, loopback, blobs.digest, blobs.data, read_size)
        misses.rows.append([name, "loopback", *row])
    _bench_hits(settings, scratch, loopback, blobs, local, name, hits)
    randoms.rows.extend(
        [name, "loopback", *row] for row in _bench_random(settings, scratch, loopback, blobs)
    )

    proxy = ShapingProxy(
        upstream=("127.0.0.1", port), rtt_ms=settings.shaped_rtt_ms, mbps=settings.shaped_mbps
    )
    link = f"{settings.shaped_mbps:g} Mbit/s, {settings.shaped_rtt_ms:g} ms"
    with proxy.run_in_thread() as shaped_port:
        shaped_ref = _reference(f"http://127.0.0.1:{shaped_port}")
        for read_size in settings.read_sizes:
            row = _bench_misses(
                settings, scratch, shaped_ref, blobs.shaped_digest, blobs.shaped, read_size
            )
            misses.rows.append([name, link, *row])
        shaped_blobs = dataclasses.replace(blobs, data=blobs.shaped, digest=blobs.shaped_digest)
        randoms.rows.extend(
            [name, link, *row] for row in _bench_random(settings, scratch, shaped_ref, shaped_blobs)
        )


def _bench_misses(
    settings: RegistryBenchmark,
    scratch: Path,
    reference: ImageReference,
    digest: str,
    data: bytes,
    read_size: int,
) -> list[object]:
    """[read size, GET MB/s, lazy MB/s, requests, ratio, target] for one read size."""
    size = len(data)
    get_s = lazy_s = float("inf")
    requests = 0
    for _ in range(settings.repeats):
        with _session(settings, scratch) as session:
            client = session.client
            session.run(client.ping, reference)  # connect before timing
            start = time.perf_counter()
            whole = session.run(client.read_blob, reference, digest, 0, size)
            get_s = min(get_s, time.perf_counter() - start)
            _check(whole == data, "the plain GET")
            del whole

            before = client.statistics().requests
            chunks = []
            with session.open_blob(reference, digest, size) as blob:
                start = time.perf_counter()
                for offset in range(0, size, read_size):
                    chunks.append(blob.pread(offset, read_size))
                seconds = time.perf_counter() - start
            if seconds < lazy_s:
                lazy_s, requests = seconds, client.statistics().requests - before
            _check(b"".join(chunks) == data, "the lazy read")
    return [
        _size(read_size),
        size / get_s / 1e6,
        size / lazy_s / 1e6,
        requests,
        get_s / lazy_s,
        ">= 0.8",
    ]


def _bench_hits(
    settings: RegistryBenchmark,
    scratch: Path,
    reference: ImageReference,
    blobs: _Blobs,
    local: Path,
    name: str,
    hits: Table,
) -> None:
    span = min(settings.hit_span, len(blobs.data))
    with (
        _session(settings, scratch) as session,
        session.open_blob(reference, blobs.digest, len(blobs.data)) as blob,
        LocalFile(local) as plain,
    ):
        _check(blob.pread(0, span) == blobs.data[:span], "the cache fill")
        session.run(session.cache.drain)
        blob.pread(0, span)  # every block checked once
        for read_size in settings.hit_read_sizes:
            local_s = _best_sequential(settings.repeats, plain, span, read_size)
            cached_s = _best_sequential(settings.repeats, blob, span, read_size)
            hits.rows.append(
                [
                    name,
                    _size(read_size),
                    span / local_s / 1e6,
                    span / cached_s / 1e6,
                    local_s / cached_s,
                    ">= 0.7",
                ]
            )


def _best_sequential(repeats: int, file: RandomAccessFile, span: int, read_size: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for offset in range(0, span, read_size):
            file.pread(offset, read_size)
        best = min(best, time.perf_counter() - start)
    return best


def _bench_random(
    settings: RegistryBenchmark, scratch: Path, reference: ImageReference, blobs: _Blobs
) -> list[list[object]]:
    """Rows [request, median ms, p99 ms, ratio] for the floor, a bare range GET, a miss."""
    size = len(blobs.data)
    refill = settings.refill_size
    blocks = random.Random(3).sample(
        range(size // refill), min(settings.random_reads, size // refill)
    )
    offsets = [block * refill + random.Random(block).randrange(0, refill, 4096) for block in blocks]
    length = settings.random_read_size

    with _session(settings, scratch) as session:
        client = session.client
        session.run(client.ping, reference)
        floor = _timed(lambda _offset: session.run(client.ping, reference), offsets)
        bare = _timed(
            lambda offset: session.run(client.read_blob, reference, blobs.digest, offset, length),
            offsets,
        )
        with session.open_blob(reference, blobs.digest, size) as blob:
            through_cache = _timed(lambda offset: blob.pread(offset, length), offsets)
            for offset in offsets[:8]:
                _check(blob.pread(offset, length) == blobs.data[offset : offset + length], "a miss")

    floor_median = statistics.median(floor)
    rows = []
    for label, samples in (
        ("empty GET /v2/ (floor)", floor),
        (f"{_size(length)} range GET, no cache", bare),
        (f"{_size(length)} read, cache miss", through_cache),
    ):
        median = statistics.median(samples)
        rows.append([label, median * 1e3, _percentile(samples, 0.99) * 1e3, median / floor_median])
    return rows


def _timed(read: object, offsets: list[int]) -> list[float]:
    samples = []
    for offset in offsets:
        start = time.perf_counter()
        read(offset)  # type: ignore[operator]
        samples.append(time.perf_counter() - start)
    return samples


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@contextlib.contextmanager
def _session(settings: RegistryBenchmark, scratch: Path) -> Iterator[RegistrySession]:
    """A session with a fresh, empty cache directory (so every read starts cold)."""
    cache_dir = Path(tempfile.mkdtemp(dir=scratch, prefix="cache-"))
    with RegistrySession(cache_dir, refill_size=settings.refill_size) as session:
        yield session


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(f"registry benchmark: {what} returned wrong bytes")


def _size(nbytes: int) -> str:
    if nbytes >= 1 << 20:
        return f"{nbytes >> 20} MiB"
    return f"{nbytes >> 10} KiB"
