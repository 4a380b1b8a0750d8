"""Synchronous random-access files over asynchronous sources: the bridge to trio.

The read path (LSMT, ZFile, tar) is synchronous and runs in worker threads; the registry client
and the block cache are asynchronous and run on trio. A `TrioPortal` runs one trio event loop in
a background thread, and a `RemoteBlobFile` is a `RandomAccessFile` whose `pread` hands the read
to that loop and waits for the answer. Many threads may wait at once: the loop serves all their
reads concurrently (over one connection pool, with one cache).

Callers that must not wait (an event loop serving other requests, such as the FUSE server's)
read inside `nonblocking()`: there a `RemoteBlobFile.pread` that would go to the loop raises
`WouldBlockError` at once instead, before anything is fetched, and the caller retries the
whole read where waiting is fine (a worker thread). A cached read never gets that far
(`CachedBlobFile` serves it first), so cached data costs no thread hop.

Caveats:
- `pread` must not be called from the portal's own thread (trio would deadlock on itself; it
  raises `RuntimeError` instead);
- a read blocked in the loop is not cancelled when its calling thread gives up; it finishes
  and fills the cache for the next reader;
- `RemoteBlobFile.evict` forwards to the cache; without one it does nothing, which keeps its
  promise: every read of an uncached file goes to the source again.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import trio

from workbench.errors import WorkbenchError

log = logging.getLogger(__name__)

__all__ = ["RemoteBlobFile", "TrioPortal", "WouldBlockError", "call_nonblocking", "nonblocking"]

T = TypeVar("T")

_may_block: contextvars.ContextVar[bool] = contextvars.ContextVar("may_block", default=True)


class WouldBlockError(WorkbenchError):
    """Raised inside `nonblocking()` by a read that would have to wait for its source."""


def call_nonblocking(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` inside `nonblocking()`; a plain call, for hot paths (the FUSE
    server tries every request this way: a generator context manager costs ~1.5 us more)."""
    token = _may_block.set(False)
    try:
        return function(*args)
    finally:
        _may_block.reset(token)


@contextlib.contextmanager
def nonblocking() -> Iterator[None]:
    """Reads inside the block raise `WouldBlockError` rather than wait on the portal.

    A context variable, so it holds for the current thread or trio task only; worker threads
    started from inside (trio.to_thread copies the context) would inherit it.
    """
    token = _may_block.set(False)
    try:
        yield
    finally:
        _may_block.reset(token)


class TrioPortal:
    """A trio event loop in a daemon thread, callable from synchronous code.

    `run(fn, *args)` runs the coroutine function `fn` in the loop and returns its result
    (or raises its exception); `start_soon(fn, *args)` starts a background task in the
    loop's nursery. Use as a context manager, or call `start()` and `close()`.
    """

    def __init__(self, name: str = "workbench-trio") -> None:
        self.name = name
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def start(self) -> TrioPortal:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._thread_main, name=self.name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise RuntimeError(f"{self.name}: the trio loop failed to start") from self._failure
        log.debug("%s: trio loop running", self.name)
        return self

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to start() or logged; the thread must end
            self._failure = exc
            if self._ready.is_set():
                log.exception("%s: the trio loop stopped with an error", self.name)
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            await trio.sleep_forever()

    @property
    def nursery(self) -> trio.Nursery:
        """The loop's nursery, for code running in the loop that starts background tasks."""
        if self._nursery is None:
            raise RuntimeError(f"{self.name}: the portal is not running; call start() first")
        return self._nursery

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `await fn(*args)` in the loop and return its result."""
        if self._token is None:
            raise RuntimeError(f"{self.name}: the portal is not running; call start() first")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Call `fn(*args)` in the loop's thread (for state only that thread may touch)."""
        if self._token is None:
            raise RuntimeError(f"{self.name}: the portal is not running; call start() first")
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start `fn(*args)` as a background task of the loop."""
        if self._token is None or self._nursery is None:
            raise RuntimeError(f"{self.name}: the portal is not running; call start() first")
        trio.from_thread.run_sync(self._nursery.start_soon, fn, *args, trio_token=self._token)

    def close(self) -> None:
        """Cancel every task of the loop, stop it and wait for its thread."""
        if self._thread is None:
            return
        if self._token is not None and self._nursery is not None:
            try:
                trio.from_thread.run_sync(self._nursery.cancel_scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join()
        self._thread = None
        self._token = None
        self._nursery = None

    def __enter__(self) -> TrioPortal:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteBlobFile:
    """A `RandomAccessFile` whose reads run as `await read(offset, length)` on a portal.

    `read` must return exactly `length` bytes for a range inside the blob (the registry client
    and the block cache do); this class clips requests at `size` as the file contract says.
    `evict`, if given, forgets the cached bytes of a range (`CachedBlob.evict`); it runs in the
    loop's thread.
    """

    def __init__(
        self,
        name: str,
        size: int,
        read: Callable[[int, int], Awaitable[bytes]],
        portal: TrioPortal,
        on_close: Callable[[], None] | None = None,
        evict: Callable[[int, int], None] | None = None,
    ) -> None:
        self.name = name
        self._size = size
        self._read = read
        self._portal = portal
        self._on_close = on_close
        self._evict = evict

    @property
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self._size:
            return b""
        if not _may_block.get():
            raise WouldBlockError(f"{self.name}: [{offset}, +{length}) is not cached")
        return self._portal.run(self._read, offset, min(length, self._size - offset))

    def evict(self, offset: int, length: int) -> None:
        """Forget the cached bytes of [offset, offset + length); the next read fetches them."""
        if self._evict is not None and length > 0 and offset < self._size:
            self._portal.run_sync(self._evict, offset, min(length, self._size - offset))

    def close(self) -> None:
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()

    def __enter__(self) -> RemoteBlobFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteBlobFile({self.name!r}, size={self._size})"
