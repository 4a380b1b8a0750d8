"""A persistent block cache for remote blobs: sparse local files, checked on read, size-capped.

The cache keeps the bytes of registry blobs on local disk so that a layer read twice is fetched
once, across restarts. It is OverlayBD's "file" cache rebuilt with an explicit record of what is
cached, a checksum per block, and statistics.

Layout of a cache directory (default `$WORKBENCH_CACHE_DIR`, else `~/.cache/workbench/blocks`):

    WORKBENCH-CACHE          marker file: says the directory is ours (`cache clear` needs it)
    <name>.data              one sparse file per blob, bytes stored at their blob offsets
    <name>.blocks            the block table of that blob (below)

`<name>` is the blob digest with `:` replaced by `-` (`sha256-<hex>`); other keys become
`key-<sha256 of the key>`. The blob is cut into refill-sized blocks (256 KiB by default, the
last one shorter); a block is the unit of fetching, checking and eviction.

The block table, little-endian:

    header (256 bytes)  magic b"WBBLOCKS" | version u32 | refill_size u32 | blob_size u64 |
                        key_length u32 | key utf-8 (at most 228 bytes) | zero padding
    record per block    crc32c u32 | state u32 (0 absent, 1 present) | last_use_ns u64

A record is 16 bytes at a 16-byte aligned offset, so it never straddles a 512-byte sector and
a torn write leaves each record either old or new. A table file was chosen over sqlite because
the record of a block is written in place with one `pwrite`, the whole table is read with one
`numpy.fromfile`, and no journal is needed to keep the rule below.

Crash safety. A block is marked present only after its bytes are durable: the fill writes the
data, `fdatasync`s the data file, then writes the record. A crash between the two loses the
block (it reads as absent and is fetched again), never marks wrong bytes present. Eviction goes
the other way: clear the record first, then punch the hole. Records whose bytes were lost
anyway (disk corruption, a torn data page) are caught by the CRC32C check: the block is evicted
and fetched again, never returned.

Concurrency protocol (one trio thread; only data writes run in worker threads):
- the block table, the counters and the eviction state change only in the trio thread, between
  awaits, so no locks are needed;
- hits are served by `os.pread` in the trio thread without an await between the presence check
  and the read, so eviction (which also runs in the trio thread) cannot punch a hole under a
  reader; reading page-cached data directly costs a few microseconds, a `trio.to_thread` hop
  about fifty;
- a missing block is fetched by one `Fill` at a time: a reader that finds a block in flight
  waits for that fill's event and takes its bytes from it, so N concurrent readers cost one
  fetch; adjacent missing blocks are coalesced into one fetch up to `max_fetch_size`;
- a fill reserves its bytes against the capacity before writing (evicting least-recently-used
  blocks of any blob), writes and syncs in a worker thread, then marks its blocks present; if
  the cache cannot make room (capacity smaller than the fill) the bytes are served but not kept.

Background work (readahead, downloads) runs in a nursery the cache owns while
`async with cache.running():` is open; without it, reads work and readahead is off.

Caveats:
- one process per cache directory: a second `BlockCache` on the same directory is refused
  (an flock on the marker), the read-only `inventory()` is not;
- recency is approximate: per-block last-use times are kept in memory and written back at
  close (or when a block is filled); after a crash the cache forgets recent uses, not data;
- by default a block's CRC is checked on its first read after the cache is opened (and
  trusted after a fill, whose CRC is computed from the bytes written); corruption that
  appears while the cache stays open is caught only with `verify="always"`, which reads and
  checks whole blocks on every read;
- if the filesystem cannot punch holes, evicted blocks are still forgotten but their disk
  space is reclaimed only when the blob is cleared;
- hits block the trio thread for the `os.pread`; on a cold page cache that is a disk read;
- blobs cached with another refill size are dropped when a cache opens the directory;
- readahead keeps up to `max_readahead` bytes (16 MiB) in flight per sequential reader, held
  in memory until written; a fetched extent is kept in memory until its write is synced.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import hashlib
import logging
import math
import os
import re
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import crc32c
import numpy as np
import trio

from workbench.errors import WorkbenchError
from workbench.tracing import core as trace

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_REFILL_SIZE",
    "MARKER_NAME",
    "BlobInventory",
    "BlobStatistics",
    "BlockCache",
    "BlockFetchError",
    "CacheDirectoryError",
    "CacheStatistics",
    "CachedBlob",
    "default_cache_dir",
    "inventory",
    "remove_blobs",
]

log = logging.getLogger(__name__)

Fetch = Callable[[int, int], Awaitable[bytes]]
"""Reads `length` bytes of the blob at `offset`, e.g. `partial(client.read_blob, ref, digest)`."""

DEFAULT_CAPACITY = 4 << 30
DEFAULT_REFILL_SIZE = 256 << 10
DEFAULT_MAX_FETCH = 4 << 20
# Measured on a 2-core VM against a simulated 500 MB/s, 2 ms link: 4 MiB windows kept one
# 2 MiB fetch in flight (about 150 MB/s); 16 MiB keeps two 4 MiB fetches queued on the link.
DEFAULT_MAX_READAHEAD = 16 << 20
READAHEAD_TRIGGER = 0.75
"""Readahead starts when less than this fraction of the window ahead is present or in flight."""

MARKER_NAME = "WORKBENCH-CACHE"
MARKER_TEXT = b"workbench block cache, format 1\n"

TABLE_MAGIC = b"WBBLOCKS"
TABLE_VERSION = 1
TABLE_HEADER = struct.Struct("<8sIIQI")
"""magic, version, refill_size, blob_size, key_length; the key follows, then padding."""
TABLE_HEADER_SIZE = 256
MAX_KEY_BYTES = TABLE_HEADER_SIZE - TABLE_HEADER.size

RECORD = np.dtype([("crc", "<u4"), ("state", "<u4"), ("last_use", "<u8")])
"""One block: CRC32C of its bytes, 0 absent / 1 present, last use in time.time_ns()."""
ABSENT: int = 0
PRESENT: int = 1

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class CacheDirectoryError(WorkbenchError, OSError):
    """Raised when a directory is not a block cache, or is in use by another process."""


class BlockFetchError(WorkbenchError, OSError):
    """Raised when fetching missing blocks fails; `__cause__` is the fetch function's error."""


def default_cache_dir() -> Path:
    """`$WORKBENCH_CACHE_DIR` if set, else `~/.cache/workbench/blocks`."""
    configured = os.environ.get("WORKBENCH_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "workbench" / "blocks"


def file_stem(key: str) -> str:
    """The file name (without suffix) that holds blob `key`: digests stay readable."""
    if re.fullmatch(r"[a-z0-9]+:[0-9a-f]{16,128}", key):
        return key.replace(":", "-")
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:32]


# Statistics -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlobStatistics:
    """Counters of one blob since the cache was opened, and what it holds on disk now.

    A read is a hit when every block it touched was present when it started; `bytes_from_cache`
    counts read bytes taken from blocks that were present, `bytes_fetched` the bytes returned
    by the fetch function (readahead and downloads included).
    """

    key: str
    size: int
    present_bytes: int
    hits: int
    misses: int
    bytes_from_cache: int
    bytes_fetched: int
    fetches: int
    fetch_seconds_total: float
    fetch_seconds_max: float
    evictions: int
    crc_failures: int


@dataclasses.dataclass(frozen=True)
class CacheStatistics:
    """Totals over every blob of the cache, and the per-blob figures."""

    directory: str
    capacity_bytes: int
    present_bytes: int
    hits: int
    misses: int
    bytes_from_cache: int
    bytes_fetched: int
    fetches: int
    fetch_seconds_total: float
    fetch_seconds_max: float
    evictions: int
    crc_failures: int
    blobs: tuple[BlobStatistics, ...]

    def _repr_html_(self) -> str:
        import pandas as pd

        from workbench.explore.html import card, human_bytes

        fields = {
            "present": f"{human_bytes(self.present_bytes)} of {human_bytes(self.capacity_bytes)}",
            "hits / misses": f"{self.hits} / {self.misses}",
            "fetched": f"{human_bytes(self.bytes_fetched)} in {self.fetches} fetches",
            "evictions, crc failures": f"{self.evictions}, {self.crc_failures}",
        }
        blobs = pd.DataFrame([dataclasses.asdict(blob) for blob in self.blobs])
        return card(f"CacheStatistics {self.directory}", fields, blobs)


@dataclasses.dataclass(frozen=True)
class BlobInventory:
    """What a cache directory holds for one blob, read without opening the cache."""

    key: str
    stem: str
    size: int
    refill_size: int
    present_bytes: int
    present_blocks: int
    blocks: int
    last_use_ns: int

    @property
    def fraction_cached(self) -> float:
        return self.present_bytes / self.size if self.size else 1.0


@dataclasses.dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    bytes_from_cache: int = 0
    bytes_fetched: int = 0
    fetches: int = 0
    fetch_seconds_total: float = 0.0
    fetch_seconds_max: float = 0.0
    evictions: int = 0
    crc_failures: int = 0


# The block table on disk ------------------------------------------------------------------


def _pack_header(key: str, blob_size: int, refill_size: int) -> bytes:
    encoded = key.encode()
    header = TABLE_HEADER.pack(TABLE_MAGIC, TABLE_VERSION, refill_size, blob_size, len(encoded))
    return (header + encoded).ljust(TABLE_HEADER_SIZE, b"\0")


def _read_table(path: Path) -> tuple[str, int, int, np.ndarray] | None:
    """(key, blob_size, refill_size, records) of a block table, or None if it is unusable."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if len(raw) < TABLE_HEADER_SIZE:
        return None
    magic, version, refill_size, blob_size, key_length = TABLE_HEADER.unpack_from(raw)
    if magic != TABLE_MAGIC or version != TABLE_VERSION or key_length > MAX_KEY_BYTES:
        return None
    if refill_size == 0:
        return None
    key = raw[TABLE_HEADER.size : TABLE_HEADER.size + key_length].decode(errors="replace")

    # A table cut short (crash while it grew) just lacks the last records: they read absent.
    blocks = math.ceil(blob_size / refill_size)
    records = np.zeros(blocks, dtype=RECORD)
    stored = np.frombuffer(
        raw,
        dtype=RECORD,
        offset=TABLE_HEADER_SIZE,
        count=min(blocks, (len(raw) - TABLE_HEADER_SIZE) // RECORD.itemsize),
    )
    records[: len(stored)] = stored
    records["state"][records["state"] != PRESENT] = ABSENT
    return key, blob_size, refill_size, records


def _block_lengths(blob_size: int, refill_size: int) -> np.ndarray:
    blocks = math.ceil(blob_size / refill_size)
    lengths = np.full(blocks, refill_size, dtype=np.int64)
    if blocks:
        lengths[-1] = blob_size - (blocks - 1) * refill_size
    return lengths


def inventory(directory: str | os.PathLike[str]) -> list[BlobInventory]:
    """The blobs a cache directory holds, read-only and without the lock (for `cache stats`)."""
    root = Path(directory)
    _require_marker(root)
    found = []
    for table_path in sorted(root.glob("*.blocks")):
        table = _read_table(table_path)
        if table is None:
            continue
        key, blob_size, refill_size, records = table
        present = records["state"] == PRESENT
        lengths = _block_lengths(blob_size, refill_size)
        found.append(
            BlobInventory(
                key=key,
                stem=table_path.stem,
                size=blob_size,
                refill_size=refill_size,
                present_bytes=int(lengths[present].sum()),
                present_blocks=int(present.sum()),
                blocks=len(records),
                last_use_ns=int(records["last_use"].max()) if len(records) else 0,
            )
        )
    return found


def remove_blobs(directory: str | os.PathLike[str], key: str | None = None) -> int:
    """Delete the files of every cached blob (or of blob `key`); returns the bytes freed.

    Only files the cache owns are touched: the directory must carry the marker, and the cache
    must not be open in another process (the same lock as `BlockCache`).
    """
    root = Path(directory)
    entries = [entry for entry in inventory(root) if key is None or entry.key == key]
    if key is not None and not entries:
        raise CacheDirectoryError(f"{root}: blob {key} is not in the cache; nothing to clear")

    lock_fd = _lock_directory(root)
    try:
        for entry in entries:
            for suffix in (".blocks", ".data"):
                try:
                    (root / f"{entry.stem}{suffix}").unlink()
                except FileNotFoundError:
                    pass
    finally:
        os.close(lock_fd)
    log.info(
        "cleared %d blobs (%d bytes) from %s",
        len(entries),
        sum(entry.present_bytes for entry in entries),
        root,
    )
    return sum(entry.present_bytes for entry in entries)


def _lock_directory(root: Path) -> int:
    """Take the cache's lock (an flock on the marker) or raise if another process holds it."""
    fd = os.open(root / MARKER_NAME, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CacheDirectoryError(
            f"{root}: the block cache is in use by another process; close it first or use "
            "another --cache-dir"
        ) from None
    return fd


def _require_marker(root: Path) -> None:
    if not (root / MARKER_NAME).is_file():
        raise CacheDirectoryError(
            f"{root}: not a workbench block cache (no {MARKER_NAME} marker file); refusing to "
            "touch it; point --cache-dir at a directory the cache created"
        )


# Hole punching ----------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_punch_supported = True


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Give the disk space of a range back (the file keeps its size); best effort."""
    global _punch_supported

    if not _punch_supported:
        return
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        if code in (errno.EOPNOTSUPP, errno.ENOSYS):
            _punch_supported = False
            log.warning("this filesystem cannot punch holes; evicted space is kept until clear")
        else:
            log.warning("punching a hole at %d+%d failed: %s", offset, length, os.strerror(code))


# One blob's cached state ------------------------------------------------------------------


class _Fill:
    """One fetch in flight: the blocks it covers, and (when done) their bytes or the error."""

    def __init__(self, first: int, stop: int) -> None:
        self.first = first
        self.stop = stop
        self.done = trio.Event()  # bytes (or the error) are known
        self.released = trio.Event()  # stored or given up: the blocks are no longer in flight
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.discarded = False  # a reader found its bytes wrong (`CachedBlob.evict`)


class _BlobState:
    """The files, block table and counters of one blob; shared by every handle on it."""

    def __init__(self, cache: BlockCache, key: str, size: int, records: np.ndarray) -> None:
        self.cache = cache
        self.key = key
        self.size = size
        self.refill = cache.refill_size
        self.stem = file_stem(key)
        self.data_path = cache.directory / f"{self.stem}.data"
        self.table_path = cache.directory / f"{self.stem}.blocks"
        self.records = records
        self.lengths = _block_lengths(size, self.refill)
        # Hot-path mirrors of the table: `ready` is 1 for a block present and CRC-checked in
        # this session (bytearray.find scans it in C), `last_use` the recency in memory.
        self.ready = bytearray(len(records))
        self.last_use = records["last_use"].astype(np.int64)
        self.present_bytes = int(self.lengths[records["state"] == PRESENT].sum())
        self.in_flight: dict[int, _Fill] = {}
        self.counters = _Counters()
        self.handles = 0
        self.dirty_recency = False
        # A sequence count for readers outside the trio thread: odd while a block stops being
        # readable (eviction) and for good once closed. A reader that saw the same even value
        # before and after its read read intact blocks.
        self.generation = 0

        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self.data_fd = os.open(self.data_path, flags, 0o644)
        self.table_fd = os.open(self.table_path, flags, 0o644)
        if os.fstat(self.data_fd).st_size != size:
            os.ftruncate(self.data_fd, size)

    @classmethod
    def create(cls, cache: BlockCache, key: str, size: int) -> _BlobState:
        """A fresh, empty state; replaces whatever the files held."""
        records = np.zeros(math.ceil(size / cache.refill_size), dtype=RECORD)
        state = cls(cache, key, size, records)
        os.ftruncate(state.data_fd, 0)
        os.ftruncate(state.data_fd, size)
        os.ftruncate(state.table_fd, 0)
        os.pwrite(state.table_fd, _pack_header(key, size, cache.refill_size), 0)
        os.pwrite(state.table_fd, records.tobytes(), TABLE_HEADER_SIZE)
        return state

    def block_range(self, offset: int, length: int) -> tuple[int, int]:
        return offset // self.refill, (offset + length + self.refill - 1) // self.refill

    def is_present(self, block: int) -> bool:
        return bool(self.records["state"][block] == PRESENT)

    def write_record(self, block: int) -> None:
        os.pwrite(
            self.table_fd,
            self.records[block : block + 1].tobytes(),
            TABLE_HEADER_SIZE + block * RECORD.itemsize,
        )

    def evict(self, block: int) -> None:
        """Forget a block: record first, then the hole (see the crash rule)."""
        if not self.is_present(block):
            return
        self.generation += 1
        self.records[block] = (0, ABSENT, 0)
        self.ready[block] = 0
        self.last_use[block] = 0
        self.write_record(block)
        _punch_hole(self.data_fd, block * self.refill, int(self.lengths[block]))
        self.present_bytes -= int(self.lengths[block])
        self.cache.present_bytes -= int(self.lengths[block])
        self.generation += 1
        self.counters.evictions += 1

    def flush_recency(self) -> None:
        """Write the in-memory last-use times back (state and CRCs are already on disk)."""
        if self.dirty_recency:
            self.records["last_use"] = self.last_use
            os.pwrite(self.table_fd, self.records.tobytes(), TABLE_HEADER_SIZE)
            self.dirty_recency = False

    def close(self) -> None:
        self.generation |= 1
        self.ready = bytearray(len(self.records))
        self.flush_recency()
        os.close(self.data_fd)
        os.close(self.table_fd)

    def statistics(self) -> BlobStatistics:
        return BlobStatistics(
            key=self.key,
            size=self.size,
            present_bytes=self.present_bytes,
            **dataclasses.asdict(self.counters),
        )


# The cache --------------------------------------------------------------------------------


class BlockCache:
    """A size-capped, persistent cache of remote blobs in refill-sized blocks.

    Parameters
    ----------
    directory
        Where the cache lives (created if missing); default `default_cache_dir()`. An existing,
        non-empty directory without the marker file is refused.
    capacity_bytes
        Upper bound on the bytes of present blocks, over all blobs; least recently used blocks
        are evicted to stay below it.
    refill_size
        The block size: misses are fetched as whole, aligned blocks.
    max_fetch_size
        Adjacent missing blocks are coalesced into one fetch up to this many bytes.
    verify
        "first": check a block's CRC32C on its first read after opening; "always": on every read.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        capacity_bytes: int = DEFAULT_CAPACITY,
        refill_size: int = DEFAULT_REFILL_SIZE,
        max_fetch_size: int = DEFAULT_MAX_FETCH,
        verify: Literal["first", "always"] = "first",
    ) -> None:
        if refill_size <= 0 or refill_size % 4096:
            raise ValueError(f"refill_size must be a positive multiple of 4096, not {refill_size}")
        if capacity_bytes < refill_size:
            raise ValueError(
                f"capacity_bytes ({capacity_bytes}) must hold at least one block ({refill_size})"
            )
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.capacity_bytes = capacity_bytes
        self.refill_size = refill_size
        self.max_fetch_blocks = max(1, max_fetch_size // refill_size)
        self.verify = verify
        self.present_bytes = 0
        self._states: dict[str, _BlobState] = {}
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self.fetch_observer: Callable[[float], None] | None = None
        """Called with the seconds of every fetch (metrics' latency histogram), if set."""

        self._lock_fd = self._claim_directory()
        self._load()
        log.info(
            "block cache %s: %d blobs, %d of %d bytes present",
            self.directory,
            len(self._states),
            self.present_bytes,
            capacity_bytes,
        )

    # Opening, loading and closing

    def _claim_directory(self) -> int:
        """Create or recognise the directory, and lock it against a second process."""
        self.directory.mkdir(parents=True, exist_ok=True)
        marker = self.directory / MARKER_NAME
        if not marker.exists():
            if any(self.directory.iterdir()):
                raise CacheDirectoryError(
                    f"{self.directory}: not empty and not a workbench block cache (no "
                    f"{MARKER_NAME} marker file); pick an empty or new directory"
                )
            marker.write_bytes(MARKER_TEXT)
        return _lock_directory(self.directory)

    def _load(self) -> None:
        """Open the state of every blob already cached, so eviction sees all of them."""
        for table_path in sorted(self.directory.glob("*.blocks")):
            table = _read_table(table_path)
            if (
                table is None
                or table[2] != self.refill_size
                or file_stem(table[0]) != table_path.stem
            ):
                log.warning(
                    "discarding cache files %s (unreadable or other block size)", table_path.stem
                )
                self._remove_files(table_path.stem)
                continue
            key, size, _, records = table
            state = _BlobState(self, key, size, records)
            self._states[key] = state
            self.present_bytes += state.present_bytes

    def _remove_files(self, stem: str) -> None:
        for suffix in (".blocks", ".data"):
            try:
                (self.directory / f"{stem}{suffix}").unlink()
            except FileNotFoundError:
                pass

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait until no fill is in flight (fetches done, their blocks stored or dropped).

        Call it in the loop before `close()` when background stores may still be running,
        so that closing does not pull the files from under them.
        """
        with trio.move_on_after(timeout_s):
            while any(state.in_flight for state in self._states.values()):
                await trio.sleep(0.005)

    def close(self) -> None:
        """Write recency back and close every file; handles stop working."""
        if self._closed:
            return
        self._closed = True
        for state in self._states.values():
            state.close()
        self._states.clear()
        os.close(self._lock_fd)

    def __enter__(self) -> BlockCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[BlockCache]:
        """Run the background work (readahead, downloads) while the block is open.

        On exit every background task is cancelled and the cache is closed.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    yield self
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self.close()

    @classmethod
    async def create(cls, *args: object, nursery: trio.Nursery, **kwargs: object) -> BlockCache:
        """A cache whose background work runs in `nursery` (close it yourself)."""
        cache = cls(*args, **kwargs)  # type: ignore[arg-type]
        cache._nursery = nursery
        return cache

    # Blobs

    def open_blob(
        self,
        key: str,
        size: int,
        fetch: Fetch,
        readahead: bool = True,
        max_readahead: int = DEFAULT_MAX_READAHEAD,
    ) -> CachedBlob:
        """A handle that reads blob `key` (of `size` bytes) through the cache.

        Blocks cached by an earlier run are reused if the size matches; otherwise they are
        dropped. Readahead works only while the cache is `running()`.
        """
        if self._closed:
            raise ValueError(f"{self.directory}: the block cache is closed")
        state = self._states.get(key)
        if state is not None and state.size != size:
            log.warning(
                "blob %s: cached size %d differs from %d; dropping its blocks",
                key,
                state.size,
                size,
            )
            self._drop_state(state)
            state = None
        if state is None:
            if len(key.encode()) > MAX_KEY_BYTES:
                raise ValueError(f"blob key longer than {MAX_KEY_BYTES} bytes: {key[:40]}...")
            state = _BlobState.create(self, key, size)
            self._states[key] = state
        state.handles += 1
        return CachedBlob(self, state, fetch, readahead, max_readahead)

    def _drop_state(self, state: _BlobState) -> None:
        self.present_bytes -= state.present_bytes
        state.present_bytes = 0
        state.records[:] = 0
        state.dirty_recency = False
        state.close()
        del self._states[state.key]
        self._remove_files(state.stem)

    def clear(self, key: str | None = None) -> int:
        """Forget every blob (or blob `key`); returns the bytes freed.

        Blobs with open handles are emptied in place (their handles fetch again); the files of
        the others are removed.
        """
        freed = 0
        for state in list(self._states.values()):
            if key is not None and state.key != key:
                continue
            freed += state.present_bytes
            if state.handles:
                for block in np.flatnonzero(state.records["state"] == PRESENT):
                    state.evict(int(block))
            else:
                self._drop_state(state)
        return freed

    # Capacity

    def _make_room(self, nbytes: int, keep: _BlobState, keep_blocks: range) -> bool:
        """Evict least-recently-used blocks until `nbytes` more fit; False if they cannot."""
        if nbytes > self.capacity_bytes:
            return False
        excess = self.present_bytes + nbytes - self.capacity_bytes
        if excess <= 0:
            return True

        # Gather every present block with its last use; evict the oldest first.
        candidates = []
        for state in self._states.values():
            present = np.flatnonzero(state.records["state"] == PRESENT)
            if state is keep:
                present = present[(present < keep_blocks.start) | (present >= keep_blocks.stop)]
            for block, last_use in zip(present, state.last_use[present], strict=True):
                candidates.append((int(last_use), state, int(block)))
        candidates.sort(key=lambda candidate: candidate[0])
        for _, state, block in candidates:
            if excess <= 0:
                break
            excess -= int(state.lengths[block])
            state.evict(block)
        return excess <= 0

    # Statistics

    def block_states(self, key: str) -> np.ndarray | None:
        """One byte per block of blob `key`: 0 absent, 1 present, 2 being fetched; None if
        the cache has no such blob. Call it in the cache's trio thread (a snapshot)."""
        state = self._states.get(key)
        if state is None:
            return None
        states = (state.records["state"] == PRESENT).astype(np.uint8)
        for block in state.in_flight:
            states[block] = 2
        return states

    def statistics(self) -> CacheStatistics:
        blobs = tuple(state.statistics() for state in self._states.values())
        totals = {
            field: sum(getattr(blob, field) for blob in blobs)
            for field in (
                "hits",
                "misses",
                "bytes_from_cache",
                "bytes_fetched",
                "fetches",
                "fetch_seconds_total",
                "evictions",
                "crc_failures",
            )
        }
        return CacheStatistics(
            directory=str(self.directory),
            capacity_bytes=self.capacity_bytes,
            present_bytes=self.present_bytes,
            fetch_seconds_max=max((blob.fetch_seconds_max for blob in blobs), default=0.0),
            blobs=blobs,
            **totals,
        )


class CachedBlob:
    """Reads of one blob through a `BlockCache`; see the module docstring for the protocol."""

    def __init__(
        self,
        cache: BlockCache,
        state: _BlobState,
        fetch: Fetch,
        readahead: bool,
        max_readahead: int,
    ) -> None:
        self.cache = cache
        self._state = state
        self._fetch = fetch
        self.key = state.key
        self.name = state.key
        self.size = state.size
        self._trust_checked = cache.verify == "first"
        self.readahead = readahead
        self.max_readahead = max(max_readahead, cache.refill_size)
        self._next_sequential = -1
        self._window = 0
        self._download_scope: trio.CancelScope | None = None
        self._closed = False
        self._last_touched = -1

    def statistics(self) -> BlobStatistics:
        return self._state.statistics()

    @property
    def refill_size(self) -> int:
        """Bytes per block (the last block of the blob may be shorter)."""
        return self._state.refill

    def presence(self) -> np.ndarray:
        """One boolean per block, True where the block is present: a copy, taken now.

        The table changes in the cache's trio thread; a copy read from another thread is a
        snapshot that may miss a fill finishing at the same moment, never a torn record.
        """
        return self._state.records["state"] == PRESENT

    def block_lengths(self) -> np.ndarray:
        """Bytes of each block (refill size, the last one shorter)."""
        return self._state.lengths.copy()

    def close(self) -> None:
        """Stop this handle's background download; the cached blocks stay."""
        if self._closed:
            return
        self._closed = True
        if self._download_scope is not None:
            self._download_scope.cancel()
        self._state.handles -= 1

    # Reading

    async def pread(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` (fewer only at the end of the blob), through the cache.

        Raises `BlockFetchError` (with the fetch function's error as cause) when a missing
        block cannot be fetched; no block is marked present by a failed fetch.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"offset and length must be >= 0, not {offset} and {length}")
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""

        recorder = trace.recorder
        if recorder is not None:
            start_ns = time.perf_counter_ns()

        state = self._state
        first, stop = state.block_range(offset, length)
        counters = state.counters
        if self._trust_checked and state.ready.find(0, first, stop) < 0:
            # The hot path: every block present and already checked in this session.
            hit = True
            data = os.pread(state.data_fd, length, offset)
        else:
            hit = bool((state.records["state"][first:stop] == PRESENT).all())
            data = self._read_present(offset, length, first, stop) if hit else None
        if data is not None:
            counters.hits += 1
            counters.bytes_from_cache += length
        else:
            counters.misses += 1
            data = await self._read_missing(offset, length, first, stop)
            hit = False

        self._note_access(offset, length, first, stop)
        if recorder is not None:
            recorder.emit("cache", "read", self.key, offset, length, start_ns, len(data), hit=hit)
        return data

    def _read_present(self, offset: int, length: int, first: int, stop: int) -> bytes | None:
        """The bytes of present blocks, checked; None if a block failed its check (evicted)."""
        state = self._state
        if not self._trust_checked:
            check = np.arange(first, stop)
        elif state.ready.find(0, first, stop) < 0:
            return os.pread(state.data_fd, length, offset)
        else:
            check = [block for block in range(first, stop) if not state.ready[block]]

        # Read whole blocks so that each can be checked against its CRC.
        start = first * state.refill
        end = min(stop * state.refill, state.size)
        blocks = os.pread(state.data_fd, end - start, start)
        view = memoryview(blocks)
        intact = True
        for block in check:
            begin = (int(block) - first) * state.refill
            piece = view[begin : begin + int(state.lengths[block])]
            if len(piece) == state.lengths[block] and crc32c.crc32c(piece) == int(
                state.records["crc"][block]
            ):
                state.ready[block] = 1
                continue
            log.warning(
                "blob %s: block %d at %d failed its crc32c check; fetching it again",
                self.key,
                block,
                int(block) * state.refill,
            )
            state.counters.crc_failures += 1
            state.evict(int(block))
            intact = False
        if not intact:
            return None
        return bytes(view[offset - start : offset - start + length])

    async def _read_missing(self, offset: int, length: int, first: int, stop: int) -> bytes:
        """Assemble a read that needs fetches: fetched bytes come from the fills themselves.

        Each block contributes only its part of [offset, offset+length), as a view where it
        can, so the read costs one copy of `length` bytes.
        """
        state = self._state
        refill = state.refill
        end = offset + length
        pieces: dict[int, bytes | memoryview] = {}
        for fill in await self._fill_blocks(first, stop):
            if fill.data is None:
                continue  # cancelled before it fetched: its blocks are read or fetched below
            view = memoryview(fill.data)
            base = fill.first * refill
            low = max(offset, base)
            high = min(end, base + len(fill.data))
            pieces[max(first, fill.first)] = view[low - base : high - base]
            for block in range(max(first, fill.first) + 1, min(stop, fill.stop)):
                pieces[block] = b""

        # Blocks that were present (or filled and since evicted) are read from the file, one
        # by one; a block evicted meanwhile by another task is fetched again.
        for block in range(first, stop):
            if block in pieces:
                continue
            low = max(offset, block * refill)
            high = min(end, block * refill + int(state.lengths[block]))
            data = (
                self._read_present(low, high - low, block, block + 1)
                if state.is_present(block)
                else None
            )
            if data is None:
                data = await self._read_missing(low, high - low, block, block + 1)
            else:
                state.counters.bytes_from_cache += high - low
            pieces[block] = data
        return b"".join(pieces[block] for block in range(first, stop))

    async def _fill_blocks(self, first: int, stop: int) -> list[_Fill]:
        """Fetch the missing blocks of [first, stop) (or wait for fills in flight)."""
        state = self._state

        # A fill whose bytes were evicted as wrong must not serve them again: wait until it
        # has let go of its blocks, then fetch them afresh.
        while discarded := [
            fill for fill in map(state.in_flight.get, range(first, stop)) if fill and fill.discarded
        ]:
            await discarded[0].released.wait()

        fills: list[_Fill] = []
        mine: list[_Fill] = []
        block = first
        while block < stop:
            if block in state.in_flight:
                fill = state.in_flight[block]
                fills.append(fill)
                block = fill.stop
                continue
            if state.is_present(block):
                block += 1
                continue
            end = block + 1
            while (
                end < stop
                and end - block < self.cache.max_fetch_blocks
                and not state.is_present(end)
                and end not in state.in_flight
            ):
                end += 1
            mine.append(self._start_fill(block, end))
            fills.append(mine[-1])
            block = end

        # Our own fills run here, concurrently; fills of other tasks are only waited for.
        if len(mine) == 1:
            await self._run_fill(mine[0])
        elif mine:
            async with trio.open_nursery() as nursery:
                for fill in mine:
                    nursery.start_soon(self._run_fill, fill)
        for fill in fills:
            await fill.done.wait()
            if fill.error is not None:
                raise BlockFetchError(
                    f"blob {self.key}: fetching bytes {fill.first * state.refill}"
                    f"+{self._fill_length(fill)} failed: {fill.error}"
                ) from fill.error
        return fills

    def _start_fill(self, first: int, stop: int) -> _Fill:
        fill = _Fill(first, stop)
        for block in range(first, stop):
            self._state.in_flight[block] = fill
        return fill

    def _fill_length(self, fill: _Fill) -> int:
        return int(self._state.lengths[fill.first : fill.stop].sum())

    async def _run_fill(self, fill: _Fill) -> None:
        """Fetch a fill's blocks and wake its waiters, then store them (in the background when
        the cache is running, so a reader does not wait for the disk sync)."""
        offset = fill.first * self._state.refill
        try:
            fill.data = await self._fetch_checked(offset, self._fill_length(fill))
        except Exception as exc:
            fill.error = exc
            self._release(fill)
            return
        except BaseException:
            # Cancelled: waiters find neither bytes nor an error and fetch for themselves.
            self._release(fill)
            raise

        fill.done.set()
        if self.cache._nursery is not None:
            self.cache._nursery.start_soon(self._store_and_release, fill)
        else:
            await self._store_and_release(fill)

    async def _store_and_release(self, fill: _Fill) -> None:
        try:
            await self._store(fill)
        except OSError as exc:
            # The bytes are right, only keeping them failed (disk full...): they were served.
            log.warning(
                "blob %s: storing block %d in the cache failed: %s", self.key, fill.first, exc
            )
        finally:
            self._release(fill)

    def _release(self, fill: _Fill) -> None:
        """The fill is over: its blocks are present or absent again; wake any waiter."""
        for block in range(fill.first, fill.stop):
            if self._state.in_flight.get(block) is fill:
                del self._state.in_flight[block]
        fill.done.set()
        fill.released.set()

    async def _fetch_checked(self, offset: int, length: int) -> bytes:
        recorder = trace.recorder
        start_ns = time.perf_counter_ns()
        data = bytes(await self._fetch(offset, length))
        seconds = (time.perf_counter_ns() - start_ns) / 1e9

        counters = self._state.counters
        counters.fetches += 1
        counters.bytes_fetched += len(data)
        counters.fetch_seconds_total += seconds
        counters.fetch_seconds_max = max(counters.fetch_seconds_max, seconds)
        if self.cache.fetch_observer is not None:
            self.cache.fetch_observer(seconds)
        if recorder is not None:
            recorder.emit("cache", "fetch", self.key, offset, length, start_ns, len(data))
        log.debug("blob %s: fetched %d+%d in %.1f ms", self.key, offset, length, seconds * 1e3)
        if len(data) != length:
            raise ValueError(
                f"fetch returned {len(data)} bytes at {offset}, expected {length}; the blob is "
                f"shorter than the size {self.size} it was opened with"
            )
        return data

    async def _store(self, fill: _Fill) -> None:
        """Write a fill's bytes durably, then mark its blocks present (the crash rule)."""
        state = self._state
        cache = self.cache
        assert fill.data is not None
        length = len(fill.data)
        if cache._closed:
            return
        if not cache._make_room(length, state, range(fill.first, fill.stop)):
            log.debug("blob %s: %d bytes do not fit the cache; served, not kept", self.key, length)
            return
        cache.present_bytes += length
        state.present_bytes += length
        try:
            crcs = await trio.to_thread.run_sync(
                _write_blocks, state.data_fd, fill.first * state.refill, fill.data, state.refill
            )
        except BaseException:
            cache.present_bytes -= length
            state.present_bytes -= length
            raise
        if fill.discarded:
            # Evicted while being written: the bytes were wrong, so they are not kept.
            cache.present_bytes -= length
            state.present_bytes -= length
            _punch_hole(state.data_fd, fill.first * state.refill, length)
            return
        now = time.time_ns()
        for index, crc in enumerate(crcs):
            block = fill.first + index
            state.records[block] = (crc, PRESENT, now)
            state.last_use[block] = now
            state.ready[block] = 1
            state.write_record(block)

    # Eviction on request

    def evict(self, offset: int, length: int) -> None:
        """Forget the blocks covering [offset, offset + length): the next read fetches them.

        For bytes a reader above found wrong (a ZFile block failing its CRC): the cache's own
        CRC only proves a block holds what its fill received. Present blocks are evicted with
        the crash rule (record first, then the hole); a block still being fetched is left
        alone, its bytes are not known yet; a block fetched but not yet stored is dropped with
        its whole fill, which then keeps nothing. Runs in the cache's trio thread.
        """
        length = min(length, self.size - offset)
        if offset < 0 or length <= 0:
            return
        state = self._state
        first, stop = state.block_range(offset, length)
        for block in range(first, stop):
            fill = state.in_flight.get(block)
            if fill is not None:
                if fill.data is not None and not fill.discarded:
                    log.debug("blob %s: dropping fill of block %d, not stored yet", self.key, block)
                    fill.discarded = True
            elif state.is_present(block):
                log.debug("blob %s: evicting block %d on request", self.key, block)
                state.evict(block)

    def read_ready(self, offset: int, length: int) -> bytes | None:
        """The bytes of [offset, offset+length) if every block is present and checked, else None.

        The synchronous fast path for `RemoteBlobFile`: safe from any thread, it reads the
        data file directly (no hop into the trio thread). It answers only when no await is
        needed: every block `ready` (present, and CRC-checked or filled in this session, so the
        crash and CRC rules hold), `verify="first"`, and, for a sequential reader with
        readahead, the window ahead already present (otherwise None, and the trio path starts
        the readahead). An eviction or close between the check and the read bumps the state's
        generation and the answer is dropped (None). Counters and recency are updated without
        the trio thread, so under concurrent readers they may miss a count.
        """
        state = self._state
        if not self._trust_checked or self._closed or offset < 0 or length <= 0:
            return None
        size = self.size
        if offset + length > size:
            length = size - offset
            if length <= 0:
                return None
        generation = state.generation
        refill = state.refill
        first = offset // refill
        stop = (offset + length + refill - 1) // refill
        if generation & 1 or state.ready.find(0, first, stop) >= 0:
            return None

        sequential = offset == self._next_sequential
        window = self._window
        if sequential and window and self.readahead:
            # The trio path would grow the window and start readahead: leave it to it unless
            # everything the grown window covers is already here.
            window = min(max(2 * window, 2 * refill), self.max_readahead)
            if self._readahead_due(offset + length, window):
                return None

        recorder = trace.recorder
        if recorder is not None:
            start_ns = time.perf_counter_ns()
        try:
            data = os.pread(state.data_fd, length, offset)
        except OSError:
            return None  # closed under us; the trio path reports it
        if state.generation != generation or len(data) != length:
            return None

        self._next_sequential = offset + length
        self._window = window if sequential else 0
        # Recency is approximate anyway: small reads inside the blocks touched last time skip
        # the numpy write, which costs as much as the read itself.
        if first != self._last_touched:
            self._last_touched = first
            state.last_use[first:stop] = time.time_ns()
            state.dirty_recency = True
        counters = state.counters
        counters.hits += 1
        counters.bytes_from_cache += length
        if recorder is not None:
            recorder.emit("cache", "read", self.key, offset, length, start_ns, length, hit=True)
        return data

    def _readahead_due(self, offset: int, length: int) -> bool:
        """Whether `_start_readahead(offset, length)` would start a fetch (same trigger)."""
        state = self._state
        length = min(length, self.size - offset)
        if length <= 0:
            return False
        first, stop = state.block_range(offset, length)
        block = state.ready.find(0, first, stop)
        if block < 0:
            return False
        while block < stop and (state.ready[block] or block in state.in_flight):
            block += 1
        return block < stop and (block - first) * state.refill <= length * READAHEAD_TRIGGER

    # Recency and readahead

    def _note_access(self, offset: int, length: int, first: int, stop: int) -> None:
        state = self._state
        state.last_use[first:stop] = time.time_ns()
        state.dirty_recency = True

        if not self.readahead or self.cache._nursery is None:
            return
        if offset == self._next_sequential:
            self._window = min(max(2 * self._window, 2 * state.refill), self.max_readahead)
        else:
            self._window = 0
        self._next_sequential = offset + length
        if self._window:
            self._start_readahead(offset + length, self._window)

    def _start_readahead(self, offset: int, length: int) -> None:
        """Fill the missing blocks of [offset, offset+length) in the background.

        Like the kernel's readahead, nothing is started while the first missing block lies in
        the far half of the window: the next batch then goes out as one large fetch instead of
        a trickle of single blocks.
        """
        state = self._state
        length = min(length, self.size - offset)
        if length <= 0:
            return
        first, stop = state.block_range(offset, length)
        block = first
        while block < stop and (state.is_present(block) or block in state.in_flight):
            block += 1
        if block >= stop or (block - first) * state.refill > length * READAHEAD_TRIGGER:
            return

        while block < stop:
            if state.is_present(block) or block in state.in_flight:
                block += 1
                continue
            end = block + 1
            while (
                end < stop
                and end - block < self.cache.max_fetch_blocks
                and not state.is_present(end)
                and end not in state.in_flight
            ):
                end += 1
            fill = self._start_fill(block, end)
            assert self.cache._nursery is not None
            self.cache._nursery.start_soon(self._run_background_fill, fill)
            block = end

    async def _run_background_fill(self, fill: _Fill) -> None:
        await self._run_fill(fill)
        if fill.error is not None:
            log.debug("blob %s: readahead of block %d failed: %r", self.key, fill.first, fill.error)

    # Background download

    def start_download(self, rate_bytes_per_s: float | None = None) -> None:
        """Fetch every missing block in the background, at most `rate_bytes_per_s` on average.

        Needs `cache.running()`; stops when this handle or the cache closes.
        """
        if self.cache._nursery is None:
            raise RuntimeError(
                "background download needs the cache running: use `async with cache.running():`"
            )
        self.cache._nursery.start_soon(self.download, rate_bytes_per_s)

    async def download(self, rate_bytes_per_s: float | None = None) -> None:
        """Fetch every missing block now, rate-capped by a token bucket; returns when all are in.

        The bucket holds one fetch (`max_fetch_size`) of tokens and refills at the rate, so over
        any stretch the download moves at most rate * time + one fetch of bytes.
        """
        state = self._state
        with trio.CancelScope() as scope:
            self._download_scope = scope
            allowed_at = trio.current_time()
            block = 0
            while block < len(state.records):
                stop = min(block + self.cache.max_fetch_blocks, len(state.records))
                missing = state.records["state"][block:stop] != PRESENT
                nbytes = int(state.lengths[block:stop][missing].sum())
                if nbytes:
                    for fill in await self._fill_blocks(block, stop):
                        await fill.released.wait()
                if nbytes and rate_bytes_per_s:
                    # Pay for the bytes after moving them: the average never exceeds the rate.
                    allowed_at = max(allowed_at, trio.current_time() - 1.0)
                    allowed_at += nbytes / rate_bytes_per_s
                    await trio.sleep_until(allowed_at)
                block = stop
            log.info("blob %s: download complete (%d bytes)", self.key, self.size)
        self._download_scope = None


def _write_blocks(fd: int, offset: int, data: bytes, refill: int) -> list[int]:
    """Write `data` at `offset`, make it durable, and return the CRC32C of each block."""
    view = memoryview(data)
    written = 0
    while written < len(data):
        written += os.pwrite(fd, view[written:], offset + written)
    os.fdatasync(fd)
    return [crc32c.crc32c(view[start : start + refill]) for start in range(0, len(data), refill)]
