"""Recording and replaying block accesses inside the FUSE server.

`TraceRecording` records every successful read of each lower layer's LSMT file (the file as
seen after tar and ZFile decoding, spec section 5) while it is active: the lowers' ``file``
is wrapped by a `_RecordingFile` that appends one `(layer_index, offset, count)` per read, and
unwrapped again when recording stops. ACI's protocol is kept: ``TRACE.lock`` exists while
recording; deleting it (or unmounting) stops the recording, writes the trace file, removes
the lock and creates ``TRACE.ok``.

`Prefetcher` reads a list of `Job`s with `concurrency` threads (default 16, OverlayBD's
``prefetchConfig.concurrency``), each read at most `MAX_PREFETCH_READ` bytes, to warm the
block cache while the application runs. `trace_jobs` plans the jobs of a trace file,
`range_jobs` those of disk ranges (the priority-list mode). A job reads the compressed bytes
below a ZFile layer (`ZFileReader.stored_range`): the cache keeps compressed blocks, so
decompressing them during prefetch would only cost CPU. `coalesce` joins reads that follow
each other in one file into one (a registry round trip each otherwise). While a replay runs
the FUSE server turns the block cache's readahead off (`cached_blobs`): the trace knows what
the start reads, and readahead windows beside it only compete for the link.

Caveats:
- recording wraps the lowers of a stack already open: the header and index reads made when
  the image was opened are not recorded (they are made again, cached, on every mount);
- prefetch threads are daemon threads: at unmount they are asked to stop and waited for a
  few seconds; a read stuck in the registry is abandoned;
- a record naming a layer the image does not have is skipped with a warning.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.blobs.common import FileWrapper
from workbench.prefetch.tracefile import TraceFile, TraceRecord

__all__ = [
    "DEFAULT_CONCURRENCY",
    "MAX_PREFETCH_READ",
    "Job",
    "Prefetcher",
    "TraceRecording",
    "cached_blobs",
    "coalesce",
    "range_jobs",
    "trace_jobs",
]

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 16
"""Reads in flight at once during prefetch (OverlayBD's prefetchConfig.concurrency)."""

MAX_PREFETCH_READ = 1 << 20
"""Longest single read of a prefetch job (OverlayBD replays with a 1 MiB buffer)."""

LOCK_POLL_SECONDS = 0.5


class _RecordingFile(FileWrapper):
    """A layer file whose successful reads are appended to `records`."""

    def __init__(self, inner: Any, layer_index: int, records: list[tuple[int, int, int]]) -> None:
        super().__init__(inner)
        self.layer_index = layer_index
        self.records = records

    def pread(self, offset: int, length: int) -> bytes:
        data = self.inner.pread(offset, length)
        if data:
            self.records.append((self.layer_index, offset, len(data)))
        return data


class TraceRecording:
    """Records the reads of every lower of `stack` into the trace file at `path`."""

    def __init__(self, stack: Any, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.ok_path = self.path.with_name(self.path.name + ".ok")
        self.records: list[tuple[int, int, int]] = []
        self.started = time.monotonic()
        self.finished = False
        self._stack = stack
        self._lock = threading.Lock()

        self.ok_path.unlink(missing_ok=True)
        self.lock_path.write_text(f"{os.getpid()}\n")
        for position, layer in enumerate(stack.lowers):
            if not hasattr(layer, "file"):
                log.warning("lower %d (%s) has no layer file: not recorded", position, layer.name)
                continue
            layer.file = _RecordingFile(layer.file, position, self.records)
        log.info("recording the reads of %d lowers to %s", len(stack.lowers), self.path)

    def lock_removed(self) -> bool:
        return not self.lock_path.exists()

    def stop(self) -> TraceFile | None:
        """Stop recording and write the trace file (once; later calls return None)."""
        with self._lock:
            if self.finished:
                return None
            self.finished = True
        for layer in self._stack.lowers:
            if isinstance(getattr(layer, "file", None), _RecordingFile):
                layer.file = layer.file.inner
        trace = TraceFile([TraceRecord(*record) for record in list(self.records)])
        trace.dump(self.path)
        self.lock_path.unlink(missing_ok=True)
        self.ok_path.touch()
        log.info(
            "recorded %d reads (%d bytes) in %.1f s to %s",
            len(trace),
            trace.total_bytes,
            time.monotonic() - self.started,
            self.path,
        )
        return trace

    def status(self) -> dict[str, Any]:
        return {
            "mode": "record",
            "path": str(self.path),
            "records": len(self.records),
            "bytes": sum(record[2] for record in list(self.records)),
            "seconds": round(time.monotonic() - self.started, 3),
            "finished": self.finished,
        }

    async def watch_lock(self) -> None:
        """Stop recording when the lock file is deleted (ACI's way to end a recording)."""
        import trio

        while not self.finished:
            await trio.sleep(LOCK_POLL_SECONDS)
            if self.lock_removed() and not self.finished:
                await trio.to_thread.run_sync(self.stop)


@dataclass(frozen=True)
class Job:
    """Read `length` bytes at `offset` of `file`, for what it leaves in the cache."""

    file: Any
    offset: int
    length: int


def _layer_job(layer: Any, offset: int, length: int) -> Job:
    """The read that warms the cache for [offset, offset+length) of a layer's LSMT file."""
    from workbench.formats.zfile import ZFileReader

    file = layer.file
    if isinstance(file, _RecordingFile):
        file = file.inner
    if isinstance(file, ZFileReader):
        start, stored = file.stored_range(offset, length)
        return Job(file.source, start, stored)
    return Job(file, offset, length)


def trace_jobs(stack: Any, trace: TraceFile) -> list[Job]:
    """The jobs of a trace's read records, in their order, each distinct read once."""
    jobs: list[Job] = []
    seen: set[tuple[int, int, int]] = set()
    skipped = 0
    for record in trace.records:
        if record.op != b"R":
            continue
        if not 0 <= record.layer_index < len(stack.lowers):
            skipped += 1
            continue
        job = _layer_job(stack.lowers[record.layer_index], record.offset, record.count)
        key = (id(job.file), job.offset, job.length)
        if job.length > 0 and key not in seen:
            seen.add(key)
            jobs.append(job)
    if skipped:
        log.warning(
            "skipped %d trace records naming a layer beyond the image's %d lowers; was the "
            "trace recorded on another image?",
            skipped,
            len(stack.lowers),
        )
    return jobs


def range_jobs(stack: Any, ranges: Iterable[tuple[int, int]]) -> list[Job]:
    """The jobs that warm the layers serving the disk ranges (offset, length) given."""
    jobs: list[Job] = []
    lowers = len(stack.lowers)
    for offset, length in ranges:
        segments = stack.segments(offset, length)
        data = segments[(segments["kind"] == "data") & (segments["tag"] < lowers)]
        for row in data.itertuples(index=False):
            layer = stack.layer_for_tag(int(row.tag))
            jobs.append(_layer_job(layer, int(row.moffset), int(row.length)))
    return jobs


class Prefetcher:
    """Reads `jobs` with `concurrency` daemon threads, in order, until done or stopped."""

    def __init__(
        self,
        jobs: list[Job],
        concurrency: int = DEFAULT_CONCURRENCY,
        mode: str = "replay",
        source: str = "",
        on_finish: Any = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"prefetch concurrency must be >= 1, not {concurrency}")
        self.concurrency = concurrency
        self.mode = mode
        self.source = source
        self._pieces = [piece for job in jobs for piece in _split(job)]
        self.jobs = len(jobs)
        self.done = 0
        self.failed = 0
        self.bytes = 0
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._active = 0
        self.started = 0.0
        self.finished_at: float | None = None
        self.on_finish = on_finish
        """Called (in a prefetch thread) once every queued read is done."""

    def start(self) -> Prefetcher:
        self.started = self.started or time.monotonic()
        count = min(self.concurrency, max(1, len(self._pieces) - self._next))
        self._active = count
        self._threads = [
            threading.Thread(target=self._work, name=f"prefetch-{n}", daemon=True)
            for n in range(count)
        ]
        for thread in self._threads:
            thread.start()
        log.info(
            "prefetching %d reads (%d bytes) with %d threads (%s %s)",
            len(self._pieces),
            sum(piece.length for piece in self._pieces),
            count,
            self.mode,
            self.source,
        )
        return self

    def add(self, jobs: list[Job]) -> None:
        """Queue more jobs (they are read after those already queued)."""
        with self._lock:
            self._pieces += [piece for job in jobs for piece in _split(job)]
            self.jobs += len(jobs)
            self.finished_at = None
            idle = self._active == 0
        if idle:
            self.start()

    def _take(self) -> Job | None:
        with self._lock:
            if self._stop.is_set() or self._next >= len(self._pieces):
                return None
            piece = self._pieces[self._next]
            self._next += 1
            return piece

    def _work(self) -> None:
        while (piece := self._take()) is not None:
            try:
                data = piece.file.pread(piece.offset, piece.length)
            except Exception as exc:
                with self._lock:
                    self.failed += 1
                log.debug("prefetch of %d+%d failed: %s", piece.offset, piece.length, exc)
                continue
            with self._lock:
                self.done += 1
                self.bytes += len(data)
        with self._lock:
            self._active -= 1
            if self._active == 0 and self._next >= len(self._pieces):
                self.finished_at = time.monotonic()
                log.info(
                    "prefetch done: %d reads, %d bytes, %d failed in %.2f s",
                    self.done,
                    self.bytes,
                    self.failed,
                    self.finished_at - self.started,
                )
                finished = True
            else:
                finished = False
        if finished and self.on_finish is not None:
            self.on_finish()

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for every thread to end; True if they all did in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(left)
        return not any(thread.is_alive() for thread in self._threads)

    def stop(self, timeout: float = 5.0) -> None:
        """Let no new read start; wait up to `timeout` seconds for those running."""
        self._stop.set()
        if not self.wait(timeout):
            log.warning("prefetch threads still reading after %.1f s: abandoned", timeout)

    def status(self) -> dict[str, Any]:
        with self._lock:
            end = self.finished_at if self.finished_at is not None else time.monotonic()
            return {
                "mode": self.mode,
                "source": self.source,
                "concurrency": self.concurrency,
                "jobs": self.jobs,
                "reads": len(self._pieces),
                "done": self.done,
                "failed": self.failed,
                "bytes": self.bytes,
                "seconds": round(end - self.started, 3) if self.started else 0.0,
                "finished": self.finished_at is not None,
            }


def cached_blobs(stack: Any) -> list[Any]:
    """The block-cache handles (`CachedBlob`) under the stack's lowers, found by walking
    each layer file's wrappers (``source``, ``inner``, ``_blob``)."""
    from workbench.blobs.cache import CachedBlob

    found: list[Any] = []
    for layer in stack.lowers:
        node, seen = getattr(layer, "file", None), 0
        while node is not None and seen < 16:
            if isinstance(node, CachedBlob):
                if node not in found:
                    found.append(node)
                break
            node = next(
                (
                    getattr(node, name)
                    for name in ("source", "inner", "_blob")
                    if hasattr(node, name)
                ),
                None,
            )
            seen += 1
    return found


def coalesce(jobs: list[Job], gap: int = 0, limit: int = 1 << 20) -> list[Job]:
    """Join each job to the one before it when it reads the same file just after it (within
    `gap` bytes, overlaps included) and the joined read stays under `limit`: one request
    where the trace has many small ones (a registry round trip each), order kept."""
    joined: list[Job] = []
    for job in jobs:
        last = joined[-1] if joined else None
        if (
            last is not None
            and job.file is last.file
            and last.offset <= job.offset <= last.offset + last.length + gap
            and max(last.offset + last.length, job.offset + job.length) - last.offset <= limit
        ):
            end = max(last.offset + last.length, job.offset + job.length)
            joined[-1] = Job(last.file, last.offset, end - last.offset)
        else:
            joined.append(job)
    return joined


def _split(job: Job) -> list[Job]:
    return [
        Job(job.file, offset, min(MAX_PREFETCH_READ, job.offset + job.length - offset))
        for offset in range(job.offset, job.offset + job.length, MAX_PREFETCH_READ)
    ]
