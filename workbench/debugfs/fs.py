"""The debug view: every running image's internals as files, read from its FUSE server.

Each mounted image is served by its own FUSE server (`workbench.device.fuse`), which answers
questions on a unix socket (`workbench.device.introspect`). This file system, mounted
anywhere with `serve` (``workbench debugfs MOUNTPOINT``), turns those answers into files, so
that ``ls``, ``cat``, ``grep`` and ``tail -f`` are enough to see an image at work. Layout
(`README_TEXT` is the README at its root)::

    README                      what each file is
    <mount id>/                 one folder per image mounted under the run dir
        mount.json              the mount's state: mount point, loop device, config, pid
        info.json               the server: calls served in the task / in threads, ...
        layers/<n>/header.json  lower n (0 = bottom): header and trailer fields, wrapping
        layers/<n>/index.csv    its index: offset, length, moffset (bytes), zeroed, tag
        layers/upper/...        the writable layer, if any
        merged-index.csv        the merged index: which layer serves each range
        cache/statistics.json   the block cache: hits, misses, bytes fetched, per blob
        cache/<blob>/statistics.json, cache/<blob>/presence
                                one blob: its counters, and a map of its blocks
                                ('#' present, '.' absent, '~' being fetched)
        inflight.json           requests waiting in worker threads, with their age
        prefetch.json           what trace replay / recording / the priority list did
        metrics                 the Prometheus text of the image
        trace                   the live trace: one line per event of every layer, while
                                it is open (``tail -f``); tracing is off when nobody reads it

Every file's content is made when it is opened (a snapshot; files are served with direct
I/O, so the size ``ls -l`` shows is that of the last read). ``trace`` grows while open: the
view follows the server's event stream from the first open to the last close and keeps the
last `TRACE_KEEP` bytes; its size counts every byte ever written, so ``tail -f`` (which polls
the size on FUSE) prints each new line.

Caveats:
- one view per process (pyfuse3 keeps global state); images mounted after it started show
  up at the next ``ls``;
- a reader that falls more than `TRACE_KEEP` bytes behind reads newlines for what was dropped;
- the view is read-only and needs to reach the servers' sockets (root, by their mode).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from workbench.device.introspect import IntrospectionError, afollow, aquery
from workbench.device.mount import Mount, default_run_dir, list_mounts
from workbench.tracing.report import LAYER_DEPTH, short_target

__all__ = ["README_TEXT", "TRACE_KEEP", "DebugFs", "format_event", "serve"]

log = logging.getLogger(__name__)

TRACE_KEEP = 8 << 20
"""Bytes of trace text kept per image for readers that lag behind."""

README_TEXT = """\
workbench debug view: the live internals of every image mounted by the workbench.

Each folder is one mounted image (named by its mount id; mount.json says where it is
mounted). Its files are read from the image's FUSE server when opened:

  mount.json             the mount: mount point, loop device, FUSE folder, config, pid
  info.json              the FUSE server: requests served in its trio task (cache hits and
                         local data) and in worker threads (registry reads), hang threshold
  layers/N/header.json   lower layer N (0 = bottom, as in config.v1.json): LSMT header and
                         trailer, uuid, parent uuid, wrapping (tar, zfile), segment count
  layers/N/index.csv     its index: one mapping a row; offset and length on the virtual
                         disk, moffset in the layer file (bytes), zeroed, tag
  layers/upper/...       the writable layer, when the image has one
  merged-index.csv       the merged index of the whole image: which layer serves each range
  cache/statistics.json  the block cache: hits, misses, bytes from cache and fetched, fetch
                         time, evictions, CRC failures, totals and per blob
  cache/BLOB/presence    one blob's blocks: '#' present, '.' absent, '~' being fetched
  cache/BLOB/statistics.json   that blob's counters
  inflight.json          requests waiting in worker threads now, with their age; "hung"
                         once older than the hang threshold
  prefetch.json          trace replay, recording or priority-list prefetch: reads done,
                         bytes, failures, finished or not
  metrics                Prometheus metrics of the device, cache, registry and ZFile
  trace                  the live trace: `tail -f trace` shows one line per event of every
                         layer (request, device, image, lsmt, zfile, cache, registry), while
                         it is open; tracing is off again when the last reader closes it

Trace lines: time (ms since following began), request id, the layer (indented by depth),
operation, target, [offset+length], bytes moved, duration, hit or miss. Events are written
when they end, so a request's line comes after the lines of the calls it made.
"""

_ROOT = pyfuse3.ROOT_INODE
_ATTR_TIMEOUT = 0.0
_ENTRY_TIMEOUT = 1.0

_IMAGE_FILES = (
    "mount.json",
    "info.json",
    "layers",
    "merged-index.csv",
    "cache",
    "inflight.json",
    "prefetch.json",
    "metrics",
    "trace",
)
_DIRECTORIES = {"layers", "cache"}
_SIMPLE_OPS = {
    "info.json": "info",
    "merged-index.csv": "merged-index",
    "inflight.json": "inflight",
    "prefetch.json": "prefetch",
    "metrics": "metrics",
}


def format_event(event: dict[str, Any]) -> str:
    """One trace event as a line of text (see the README)."""
    if "dropped" in event:
        return f"... {event['dropped']} events dropped (the reader fell behind)\n"
    depth = LAYER_DEPTH.get(event["layer"], max(LAYER_DEPTH.values()) + 1)
    hit = {True: " hit", False: " miss"}.get(event["hit"], "")
    return (
        f"{event['ts_us'] / 1e3:12.3f} ms  req {event['request']:>6}  {'  ' * depth}"
        f"{event['layer']} {event['op']} {short_target(event['target'])} "
        f"[{event['offset']}+{event['length']}] {event['nbytes']} B "
        f"{event['dur_us']:.1f} us{hit}\n"
    )


class _TraceBuffer:
    """The trace text of one image: the last `TRACE_KEEP` bytes, and the total ever written."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.base = 0
        self.opens = 0
        self.scope: trio.CancelScope | None = None
        self.mtime_ns = time.time_ns()

    @property
    def total(self) -> int:
        return self.base + len(self.data)

    def append(self, text: bytes) -> None:
        self.data += text
        if len(self.data) > TRACE_KEEP:
            cut = len(self.data) - TRACE_KEEP
            del self.data[:cut]
            self.base += cut
        self.mtime_ns = time.time_ns()

    def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.total)
        if offset >= end:
            return b""
        lost = max(0, min(end, self.base) - offset)
        start = max(offset, self.base) - self.base
        return b"\n" * lost + bytes(self.data[start : end - self.base])


class DebugFs(pyfuse3.Operations):
    """The pyfuse3 file system of the module docstring, over the mounts of `run_dir`."""

    def __init__(self, run_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir()
        self._paths: dict[int, tuple[str, ...]] = {_ROOT: ()}
        self._inodes: dict[tuple[str, ...], int] = {(): _ROOT}
        self._sizes: dict[int, int] = {}
        self._handles: dict[int, tuple[tuple[str, ...], bytes | None]] = {}
        self._next_handle = 1
        self._traces: dict[str, _TraceBuffer] = {}
        self.nursery: trio.Nursery | None = None
        self._uid, self._gid = os.getuid(), os.getgid()
        self._started_ns = time.time_ns()

    # The tree ---------------------------------------------------------------------------

    def _mounts(self) -> dict[str, Mount]:
        return {
            mount.id: mount
            for mount in list_mounts(self.run_dir)
            if mount.complete and mount.control and os.path.exists(mount.control)
        }

    def _mount(self, mount_id: str) -> Mount:
        mount = self._mounts().get(mount_id)
        if mount is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return mount

    async def _ask(self, mount: Mount, op: str, **args: Any) -> bytes:
        try:
            return await aquery(mount.control, op, **args)
        except (IntrospectionError, OSError, ValueError) as exc:
            log.info("%s: %s failed: %s", mount.id, op, exc)
            raise pyfuse3.FUSEError(errno.EIO) from exc

    async def _ask_json(self, mount: Mount, op: str, **args: Any) -> Any:
        return json.loads(await self._ask(mount, op, **args))

    async def _children(self, path: tuple[str, ...]) -> list[str]:
        """The names in directory `path`; ENOENT/ENOTDIR for anything else."""
        if path == ():
            return ["README", *sorted(self._mounts())]
        mount = self._mount(path[0])
        if len(path) == 1:
            return list(_IMAGE_FILES)
        if path[1:] == ("layers",):
            layers = await self._ask_json(mount, "layers")
            return [str(layer["position"]) for layer in layers]
        if path[1] == "layers" and len(path) == 3:
            if path[2] not in await self._children(path[:2]):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return ["header.json", "index.csv"]
        if path[1:] == ("cache",):
            cache = await self._ask_json(mount, "cache")
            stems = [blob["stem"] for blob in cache["blobs"]] if cache else []
            return ["statistics.json", *sorted(stems)]
        if path[1] == "cache" and len(path) == 3:
            if path[2] == "statistics.json" or path[2] not in await self._children(path[:2]):
                raise pyfuse3.FUSEError(
                    errno.ENOTDIR if path[2] == "statistics.json" else errno.ENOENT
                )
            return ["statistics.json", "presence"]
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    async def _is_dir(self, path: tuple[str, ...]) -> bool:
        if len(path) <= 1:
            return path == () or path[0] in self._mounts()
        if len(path) == 2:
            return path[1] in _DIRECTORIES
        return len(path) == 3 and path[1] in _DIRECTORIES and path[2] != "statistics.json"

    async def _content(self, path: tuple[str, ...]) -> bytes:
        """The bytes of file `path`, made now."""
        if path == ("README",):
            return README_TEXT.encode()
        mount = self._mount(path[0])
        name = path[-1]
        if len(path) == 2 and name == "mount.json":
            return json.dumps(asdict(mount), indent=2).encode() + b"\n"
        if len(path) == 2 and name in _SIMPLE_OPS:
            return await self._ask(mount, _SIMPLE_OPS[name])
        if path[1] == "layers" and len(path) == 4:
            if name == "index.csv":
                layer = path[2] if path[2] == "upper" else int(path[2])
                return await self._ask(mount, "layer-index", layer=layer)
            layers = await self._ask_json(mount, "layers")
            chosen = [layer for layer in layers if str(layer["position"]) == path[2]]
            if not chosen:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return json.dumps(chosen[0], indent=2).encode() + b"\n"
        if path[1:] == ("cache", "statistics.json"):
            return await self._ask(mount, "cache")
        if path[1] == "cache" and len(path) == 4:
            cache = await self._ask_json(mount, "cache")
            blobs = [blob for blob in (cache or {}).get("blobs", []) if blob["stem"] == path[2]]
            if not blobs:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if name == "presence":
                return await self._ask(mount, "presence", key=blobs[0]["key"])
            return json.dumps(blobs[0], indent=2).encode() + b"\n"
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _inode(self, path: tuple[str, ...]) -> int:
        inode = self._inodes.get(path)
        if inode is None:
            inode = len(self._inodes) + _ROOT
            self._inodes[path] = inode
            self._paths[inode] = path
        return inode

    def _path(self, inode: int) -> tuple[str, ...]:
        path = self._paths.get(inode)
        if path is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return path

    async def _attributes(self, path: tuple[str, ...]) -> pyfuse3.EntryAttributes:
        inode = self._inode(path)
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        mtime = self._started_ns
        if await self._is_dir(path):
            attrs.st_mode = stat.S_IFDIR | 0o555
            attrs.st_nlink = 2
        else:
            attrs.st_mode = stat.S_IFREG | 0o444
            attrs.st_nlink = 1
            if len(path) == 2 and path[1] == "trace":
                buffer = self._traces.get(path[0])
                attrs.st_size = buffer.total if buffer is not None else 0
                mtime = buffer.mtime_ns if buffer is not None else mtime
            elif path == ("README",):
                attrs.st_size = len(README_TEXT.encode())
            else:
                attrs.st_size = self._sizes.get(inode, 0)
        attrs.st_blksize = 4096
        attrs.st_uid, attrs.st_gid = self._uid, self._gid
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = mtime
        attrs.attr_timeout = _ATTR_TIMEOUT
        attrs.entry_timeout = _ENTRY_TIMEOUT
        return attrs

    # pyfuse3 operations ---------------------------------------------------------------------

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._attributes(self._path(inode))

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._path(parent_inode)
        text = os.fsdecode(name)
        if text not in await self._children(parent):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self._attributes((*parent, text))

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._path(inode)
        if not await self._is_dir(path):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        path = self._path(fh)
        names = await self._children(path)
        for number, name in enumerate(names[start_id:], start=start_id + 1):
            attributes = await self._attributes((*path, name))
            if not pyfuse3.readdir_reply(token, name.encode(), attributes, number):
                return

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        path = self._path(inode)
        if await self._is_dir(path):
            raise pyfuse3.FUSEError(errno.EISDIR)
        handle = self._next_handle
        self._next_handle += 1
        if len(path) == 2 and path[1] == "trace":
            self._mount(path[0])
            self._start_following(path[0])
            self._handles[handle] = (path, None)
        else:
            content = await self._content(path)
            self._sizes[inode] = len(content)
            self._handles[handle] = (path, content)
        return pyfuse3.FileInfo(fh=handle, direct_io=True, keep_cache=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        path, content = self._handles[fh]
        if content is None:
            buffer = self._traces.get(path[0])
            return buffer.read(off, size) if buffer is not None else b""
        return content[off : off + size]

    async def release(self, fh: int) -> None:
        path, content = self._handles.pop(fh, ((), b""))
        if content is None:
            self._stop_following(path[0])

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data

    # Following trace streams -------------------------------------------------------------

    def _start_following(self, mount_id: str) -> None:
        buffer = self._traces.setdefault(mount_id, _TraceBuffer())
        buffer.opens += 1
        if buffer.opens == 1 and self.nursery is not None:
            mount = self._mount(mount_id)
            buffer.scope = trio.CancelScope()
            self.nursery.start_soon(self._follow, mount, buffer, buffer.scope)

    def _stop_following(self, mount_id: str) -> None:
        buffer = self._traces.get(mount_id)
        if buffer is None:
            return
        buffer.opens -= 1
        if buffer.opens == 0 and buffer.scope is not None:
            buffer.scope.cancel()
            buffer.scope = None

    async def _follow(self, mount: Mount, buffer: _TraceBuffer, scope: trio.CancelScope) -> None:
        def on_line(line: bytes) -> None:
            buffer.append(format_event(json.loads(line)).encode())

        with scope:
            try:
                await afollow(mount.control, on_line)
            except (OSError, IntrospectionError, ValueError) as exc:
                buffer.append(f"... the trace stream of {mount.id} ended: {exc}\n".encode())


def serve(
    mountpoint: str | os.PathLike[str],
    run_dir: str | os.PathLike[str] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Mount the debug view at `mountpoint` and serve it until unmounted or signalled."""
    operations = DebugFs(run_dir)
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {"fsname=workbench-debug", "subtype=workbench-debug", "ro"}
    pyfuse3.init(operations, os.fspath(mountpoint), options)
    try:
        trio.run(_main, operations, os.fspath(mountpoint), on_ready)
    finally:
        pyfuse3.close(unmount=True)


async def _main(operations: DebugFs, mountpoint: str, on_ready: Callable[[], None] | None) -> None:
    async with trio.open_nursery() as nursery:
        operations.nursery = nursery
        nursery.start_soon(_terminate_on_signal)
        if on_ready is not None:
            nursery.start_soon(_when_mounted, mountpoint, on_ready)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _when_mounted(mountpoint: str, on_ready: Callable[[], None]) -> None:
    await trio.to_thread.run_sync(os.stat, mountpoint)
    on_ready()


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _signum in signals:
            pyfuse3.terminate()
            return
