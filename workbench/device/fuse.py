"""The FUSE transport: an image shown as one regular file, ``disk``, for a loop device.

Layout of the file system (pyfuse3 on trio)::

    /          a directory, read-only, holding one entry
    /disk      a regular file of `BlockHandler.size` bytes (the image's virtual size);
               mode 0644 for a writable image, 0444 for a read-only one

Requests map onto the handler's byte-level calls, any size and alignment:

    read(off, size)         -> handler.read_bytes      (short at the end of the disk)
    write(off, buf)         -> handler.write_bytes     (ENOSPC past the end, EROFS read-only)
    fsync / flush           -> handler.synchronize_cache
    open for write          -> EROFS on a read-only image
    setattr (truncate)      -> only to the current size; the disk cannot grow or shrink

A read or write is first tried in the trio task itself, inside `nonblocking()`: when every
byte it needs is in local files or the block cache it completes there, without a thread hop
(~0.4 ms on these 2-vCPU machines, fuse-ceiling.md). One that needs the registry stops before
fetching anything (`WouldBlockError`) and runs again in a worker thread
(`trio.to_thread.run_sync` under one `CapacityLimiter` of `MAX_IN_FLIGHT`), so many fetches
are in flight at once and a read waiting on the registry does not hold up reads the cache
answers. fsync always goes to a thread. Every request opens a tracing request
(`workbench.tracing.request`, kind ``fuse-<op>``), so the handler, LSMT, ZFile, cache and
registry events below it carry its id. ``max_in_flight=0`` (``--threads 0``) calls the
handler in the trio task for everything, registry reads included (Caveats).

Settings follow ../shared/specs/fuse-ceiling.md: no FOPEN_DIRECT_IO and ``keep_cache`` on
open (the FUSE page cache serves the loop device's re-reads), attributes and entries cached
for an hour (the size never changes), no ``max_read`` (libfuse 3.14 refuses it), and the
mount's bdi ``read_ahead_kb`` raised to 1024 after mounting (`raise_readahead`) so that
sequential reads arrive as 1 MiB requests.

`serve` runs one file system in the current process until it is unmounted or gets SIGTERM /
SIGINT; ``python -m workbench.device.fuse`` is its command line (what `workbench.device.mount`
starts as a child process). On the way out the writable layer is flushed and the stack closed.

Caveats:
- pyfuse3 has no fallocate hook, so PUNCH_HOLE (a loop device's discard) fails with
  EOPNOTSUPP and `BlockHandler.discard_bytes` is never reached through FUSE: ext4 is
  mounted without ``discard`` and `fstrim` on the mount fails. What stands in for it: the
  server's handler detects zeroes (``detect_zeroes``), so a range written with zeros (a
  file overwritten from /dev/zero; ``blkdiscard -z``, whose write-zeroes falls back to
  writing zero pages) becomes zeroed mappings in the writable layer, as a trim would;
- a call served in the trio task blocks the loop while it runs: a local layer on a cold
  disk makes other requests wait for that disk read (the page cache usually has it); and
  a read that needed the registry pays for the part of the stack it walked before
  stopping, twice;
- ``--threads 0`` serves registry reads in the trio task too: one slow fetch stalls every
  other request (for measurements of the hop, not for use);
- pyfuse3 keeps global state: one file system per process;
- ``--trace`` keeps every event in memory until the end (about 100 bytes each): for
  bounded experiments (an ``ls -R``, a benchmark), not for a long-lived mount.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pyfuse3
import trio

from workbench.blobs.remote import WouldBlockError, call_nonblocking
from workbench.device.handler import BlockHandler, LbaRangeError
from workbench.device.metrics import DeviceMetrics, InFlight
from workbench.device.mount import DISK_NAME
from workbench.errors import ReadOnlyError, WorkbenchError
from workbench.image.stack import LayerStack
from workbench.tracing import core as trace
from workbench.tracing import recording

__all__ = [
    "DISK_NAME",
    "MAX_IN_FLIGHT",
    "FuseDisk",
    "main",
    "open_stack",
    "raise_readahead",
    "serve",
]

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 32
"""Requests served at once (worker threads); the loop device queues up to 128."""

READAHEAD_KB = 1024
"""The FUSE bdi readahead set after mounting: 1 MiB requests for sequential reads."""

CACHE_SECONDS = 3600.0
"""How long the kernel may cache entries and attributes: nothing changes them but us."""

_DISK_INODE = pyfuse3.ROOT_INODE + 1
_T = TypeVar("_T")


class FuseDisk(pyfuse3.Operations):
    """A pyfuse3 file system holding one file, ``disk``, backed by `handler`.

    `max_in_flight` handler calls run at once in worker threads; 0 calls the handler in the
    trio task itself (one request at a time, no thread hop: faster for local, cached images,
    but one slow read stalls every other request).
    """

    def __init__(self, handler: BlockHandler, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        super().__init__()
        self.handler = handler
        self.read_only = handler.read_only
        self.threaded = max_in_flight > 0
        self.limiter = trio.CapacityLimiter(max(1, max_in_flight))
        self._mtime_ns = time.time_ns()
        self._uid, self._gid = os.getuid(), os.getgid()
        self.served_direct = 0
        """Calls served in the trio task: everything they read was local or cached."""
        self.served_in_threads = 0
        """Calls served in a worker thread: fsyncs, and reads that needed the registry."""
        self.in_flight: dict[int, InFlight] = {}
        """Calls waiting in worker threads now (the only ones that can wait: see `_serve`)."""
        self.metrics: DeviceMetrics | None = None
        """Per-op counters and latency, when metrics are on (`workbench.device.metrics`)."""
        self._tickets = itertools.count(1)

    # Attributes ------------------------------------------------------------------------

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode = stat.S_IFDIR | 0o555
            attrs.st_nlink = 2
        elif inode == _DISK_INODE:
            attrs.st_mode = stat.S_IFREG | (0o444 if self.read_only else 0o644)
            attrs.st_nlink = 1
            attrs.st_size = self.handler.size
            attrs.st_blocks = self.handler.size // 512
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs.st_blksize = 4096
        attrs.st_uid, attrs.st_gid = self._uid, self._gid
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self._mtime_ns
        attrs.entry_timeout = attrs.attr_timeout = CACHE_SECONDS
        return attrs

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != DISK_NAME.encode():
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(_DISK_INODE)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        # O_TRUNC-less opens may still send a size equal to ours; any other change is refused.
        if fields.update_size and attr.st_size != self.handler.size:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attributes(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, DISK_NAME.encode(), self._attributes(_DISK_INODE), 1)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = self.handler.size // 4096
        data.f_namemax = 255
        return data

    # Data ------------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != _DISK_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if self.read_only and flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        # Page cache kept across opens, no direct I/O: fuse-ceiling.md "Best settings" 1.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        read = self.handler.read_bytes
        return await self._call("read", read, off, size, span=(off, size), direct_first=True)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        span = (off, len(buf))
        write = self.handler.write_bytes
        return await self._call("write", write, off, buf, span=span, direct_first=True)

    async def flush(self, fh: int) -> None:
        if not self.read_only:
            await self._call("flush", self.handler.synchronize_cache)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._call("fsync", self.handler.synchronize_cache)

    async def release(self, fh: int) -> None:
        return None

    async def _call(
        self,
        op: str,
        function: Callable[..., _T],
        *args: object,
        span: tuple[int, int] = (0, 0),
        direct_first: bool = False,
    ) -> _T:
        """Run one handler call as its own tracing request; in a worker thread if it waits.

        With `direct_first` the call is tried in the trio task first, without blocking
        (`call_nonblocking`):
        served from local files and the block cache it completes there, with no thread hop;
        a read that needs the registry raises `WouldBlockError` before fetching anything and
        the whole call is run again in a worker thread (reads and writes are idempotent, so
        a retried write that had patched a sector writes the same bytes again). Calls
        without it (fsync) always go to a thread. The request event records `span`, the
        (offset, length) of the disk the kernel asked.

        Errors become the errno a file would give: EROFS for a read-only image, ENOSPC past
        the end of the disk, EIO (logged) for anything else the stack raises.
        """
        if self.metrics is not None:
            return await self._measured(op, function, args, span, direct_first)
        # Untraced, a request id serves nobody: skip opening one (a few us per request).
        if trace.recorder is None:
            return await self._serve(op, function, args, direct_first, span)
        with trace.request(f"fuse-{op}", DISK_NAME, *span):
            return await self._serve(op, function, args, direct_first, span)

    async def _measured(
        self,
        op: str,
        function: Callable[..., _T],
        args: tuple[object, ...],
        span: tuple[int, int],
        direct_first: bool,
    ) -> _T:
        """`_call` with its latency, bytes and errno counted in `metrics`."""
        metrics = self.metrics
        assert metrics is not None
        started = time.perf_counter()
        try:
            if trace.recorder is None:
                result = await self._serve(op, function, args, direct_first, span)
            else:
                with trace.request(f"fuse-{op}", DISK_NAME, *span):
                    result = await self._serve(op, function, args, direct_first, span)
        except pyfuse3.FUSEError as exc:
            name = errno.errorcode.get(exc.errno, str(exc.errno))
            metrics.observe(op, 0, time.perf_counter() - started, name)
            raise
        nbytes = len(result) if isinstance(result, bytes) else span[1]
        metrics.observe(op, nbytes, time.perf_counter() - started)
        return result

    async def _serve(
        self,
        op: str,
        function: Callable[..., _T],
        args: tuple[object, ...],
        direct_first: bool,
        span: tuple[int, int] = (0, 0),
    ) -> _T:
        try:
            if not self.threaded:
                return function(*args)
            if direct_first:
                try:
                    result = call_nonblocking(function, *args)
                    self.served_direct += 1
                    return result
                except WouldBlockError:
                    pass
            self.served_in_threads += 1
            # Only here can a call wait, so only here is it entered in the table of calls in
            # flight (what the hang detector and the debug view look at).
            ticket = next(self._tickets)
            self.in_flight[ticket] = InFlight(op, span[0], span[1], time.monotonic())
            try:
                return await trio.to_thread.run_sync(function, *args, limiter=self.limiter)
            finally:
                del self.in_flight[ticket]
        except ReadOnlyError as exc:
            raise pyfuse3.FUSEError(errno.EROFS) from exc
        except LbaRangeError as exc:
            raise pyfuse3.FUSEError(errno.ENOSPC) from exc
        except (WorkbenchError, OSError, ValueError) as exc:
            log.error("%s: fuse %s failed: %s", self.handler.name, op, exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc


def open_stack(
    config: str | os.PathLike[str], writable_dir: str | os.PathLike[str] | None = None
) -> LayerStack:
    """The stack of a config.v1.json: its lowers, plus a writable layer in `writable_dir`.

    The writable layer lives in ``writable_dir/data`` and ``writable_dir/index``; they are
    created (parent = the top lower's uuid) when the folder holds none yet. Without
    `writable_dir` the config's own upper is used if it has one, else the image is read-only.
    """
    from workbench.image.open import open_image
    from workbench.image.writable import WritableLayer

    if writable_dir is None:
        return open_image(config, upper="writable")

    lowers_only = open_image(config, upper="none")
    try:
        folder = Path(writable_dir)
        folder.mkdir(parents=True, exist_ok=True)
        data, index = folder / "data", folder / "index"
        if data.exists():
            upper = WritableLayer.open(data, index)
        else:
            parent = lowers_only.lowers[-1].uuid if lowers_only.lowers else None
            upper = WritableLayer.create(data, index, lowers_only.size, parent_uuid=parent)
    except BaseException:
        lowers_only.close()
        raise
    return LayerStack(lowers_only.lowers, upper, name=str(config))


def raise_readahead(fuse_dir: str | os.PathLike[str], kb: int = READAHEAD_KB) -> bool:
    """Set the FUSE mount's bdi ``read_ahead_kb`` (fuse-ceiling.md, "Best settings" 2).

    Returns False (logged) where the bdi is not found or not writable: the mount still
    works, with 128 KiB requests.
    """
    device = os.stat(fuse_dir).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    try:
        bdi.write_text(f"{kb}\n")
    except OSError as exc:
        log.info("could not raise the readahead of %s (%s): %s", fuse_dir, bdi, exc)
        return False
    return True


def serve(
    handler: BlockHandler,
    fuse_dir: str | os.PathLike[str],
    on_ready: Callable[[], None] | None = None,
    name: str = "workbench",
    max_in_flight: int = MAX_IN_FLIGHT,
    services: Callable[[FuseDisk, trio.Nursery], None] | None = None,
) -> None:
    """Mount `handler` as ``fuse_dir/disk`` and serve it until unmounted or signalled.

    `on_ready` is called once the file system is mounted. SIGTERM and SIGINT unmount and
    return. `services`, if given, is called with the file system and a nursery of the serving
    loop before the mount is made, to start tasks beside it (`workbench.device.services`:
    introspection endpoint, hang detector); they are cancelled on the way out. The handler's
    writable layer is flushed before returning; the stack is left open (the caller owns it).
    """
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {f"fsname={name}", "subtype=workbench"}
    disk = FuseDisk(handler, max_in_flight)
    pyfuse3.init(disk, os.fspath(fuse_dir), options)
    try:
        trio.run(_main_until_signalled, os.fspath(fuse_dir), on_ready, disk, services)
    finally:
        pyfuse3.close(unmount=True)
        with trace.request("fuse-unmount"):
            handler.synchronize_cache()
    log.info("served %s from %s until unmounted", handler.name, fuse_dir)


async def _main_until_signalled(
    fuse_dir: str,
    on_ready: Callable[[], None] | None,
    disk: FuseDisk,
    services: Callable[[FuseDisk, trio.Nursery], None] | None,
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        if services is not None:
            services(disk, nursery)
        nursery.start_soon(_when_mounted, fuse_dir, on_ready)
        # One task reads /dev/fuse while requests are served without waiting; pyfuse3 starts
        # more only while some wait (for the registry). Four idle tasks contending for its
        # read lock cost more than they gave (fio 4 KiB random, QD1 and QD32).
        await pyfuse3.main(min_tasks=1, max_tasks=MAX_IN_FLIGHT + 4)
        nursery.cancel_scope.cancel()


async def _when_mounted(fuse_dir: str, on_ready: Callable[[], None] | None) -> None:
    # Touching the mount blocks until the kernel's INIT request is answered, which needs
    # pyfuse3.main running: so this runs beside it, in a thread.
    await trio.to_thread.run_sync(raise_readahead, fuse_dir)
    if on_ready is not None:
        on_ready()


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("got signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


def main(argv: list[str] | None = None) -> int:
    """``python -m workbench.device.fuse CONFIG FUSE_DIR [options]``.

    Prints ``ready`` on stdout once mounted (``ready metrics=PORT`` with ``--metrics``), so
    that a parent can wait for it. With ``--trace`` every event is recorded and written to
    FILE (Parquet) when the file system is unmounted or the server gets SIGTERM. The other
    options start the services of `workbench.device.services`.
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    from workbench.device.services import ServerServices

    stack = open_stack(args.config, args.writable)
    services = None
    try:
        handler = BlockHandler(stack, detect_zeroes=True)
        services = ServerServices(
            stack,
            args.config,
            control=args.control,
            metrics=args.metrics,
            hang_threshold=args.hang_threshold,
            record_trace=args.record_trace,
            replay_trace=args.replay_trace,
            concurrency=args.prefetch_concurrency,
        )

        def ready() -> None:
            port = services.metrics_port
            print("ready" if port is None else f"ready metrics={port}", flush=True)

        def run() -> None:
            serve(handler, args.fuse_dir, ready, args.name, args.threads, services.start)

        if args.trace is None:
            run()
        else:
            with recording() as recorder:
                try:
                    run()
                finally:
                    recorder.to_parquet(args.trace)
    finally:
        if services is not None:
            services.close()
        stack.close()
    return 0


def _parser() -> argparse.ArgumentParser:
    from workbench.device.metrics import DEFAULT_HANG_THRESHOLD

    parser = argparse.ArgumentParser(prog="python -m workbench.device.fuse")
    parser.add_argument("config", help="config.v1.json of the image")
    parser.add_argument("fuse_dir", help="empty folder to mount the FUSE file system on")
    parser.add_argument("--writable", help="folder of the writable layer (made if empty)")
    parser.add_argument("--name", default="workbench", help="fsname of the FUSE mount")
    parser.add_argument("--trace", help="record every event, write them to this Parquet file")
    parser.add_argument(
        "--threads",
        type=int,
        default=MAX_IN_FLIGHT,
        help=f"handler calls in flight (worker threads; default {MAX_IN_FLIGHT}); 0: none",
    )
    parser.add_argument("--control", help="unix socket of the introspection endpoint")
    parser.add_argument("--metrics", help="serve Prometheus metrics on [HOST:]PORT")
    parser.add_argument(
        "--hang-threshold",
        type=float,
        default=DEFAULT_HANG_THRESHOLD,
        help=f"seconds in flight after which a request counts as hung ({DEFAULT_HANG_THRESHOLD})",
    )
    parser.add_argument("--record-trace", help="record the lowers' reads to this trace file")
    parser.add_argument("--replay-trace", help="prefetch the reads of this trace file")
    parser.add_argument(
        "--prefetch-concurrency", type=int, default=16, help="reads in flight during prefetch"
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
