"""The FUSE server's introspection endpoint: a unix socket answering JSON requests.

Every FUSE server (`workbench.device.fuse`) listens on ``RUN_DIR/mounts/ID.sock`` (mode
0600), so that tools outside it (`workbench debugfs`, tests, a notebook) can see the live
internals of the image it serves. The protocol, one request per connection::

    client -> {"op": "layers"}\n                    one JSON line: the op and its arguments
    server -> {"ok": true, "length": N, "type": "application/json"}\n   then N bytes of body
           or {"ok": false, "error": "..."}\n
    (op "trace") {"ok": true, "stream": true}\n then one JSON line per event until the client
           closes the connection; tracing is on only while some connection follows

Ops and what their body holds:

    info            the server: pid, image name, size, read-only, calls served in the task and
                    in threads, the hang threshold, tracing state (JSON)
    layers          per lower (bottom first) and the upper: name, wrapping, uuid, header and
                    trailer fields, segment count (JSON)
    layer-index     {"layer": N | "upper"}: that layer's index, one row per mapping (CSV;
                    offsets and lengths in bytes)
    merged-index    the image's merged index: which layer serves each range (CSV)
    cache           block cache statistics, totals and per blob (JSON)
    presence        {"key": DIGEST}: the blob's blocks, '#' present '.' absent '~' in flight
    inflight        requests waiting in worker threads, with their age (JSON)
    metrics         the Prometheus text of `workbench.device.metrics`
    prefetch        what the prefetcher did so far (JSON; null without one)
    prefetch-ranges {"ranges": [[offset, length], ...]}: prefetch these disk ranges now
                    (the priority-list mode, sent by `mount_image` once ext4 is mounted)
    trace           the live event stream (see above); events as `event_json`

Bodies are built in a worker thread (an index of a million entries takes a while), never in
the trio task serving the disk; cache figures are read in the cache's own trio thread.

`query(socket, op, **args)` and `follow(socket)` are the blocking clients, `aquery` and
`afollow` the trio ones.

Caveats:
- bodies are snapshots: the writable layer's index may change while it is copied out;
- the socket is the server's only door besides the disk; anyone who can connect (root, by
  its mode) can switch tracing on.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from workbench.tracing.stream import TraceHub, event_json

if TYPE_CHECKING:
    from workbench.device.fuse import FuseDisk
    from workbench.device.metrics import HangDetector
    from workbench.image.stack import LayerStack

__all__ = [
    "IntrospectionError",
    "Introspector",
    "afollow",
    "aquery",
    "follow",
    "presence_map",
    "query",
]

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20
"""Longest request line accepted (a priority list's ranges fit)."""

STREAM_INTERVAL = 0.05
"""Seconds between two batches of a trace stream."""

PRESENCE_CHARS = {0: ".", 1: "#", 2: "~"}
PRESENCE_PER_LINE = 64

from workbench.errors import WorkbenchError  # noqa: E402  (after the constants it documents)


class IntrospectionError(WorkbenchError, OSError):
    """Raised when the introspection endpoint cannot be reached or refuses a request."""


class Introspector:
    """Answers the ops of the module docstring for one served image."""

    def __init__(
        self,
        disk: FuseDisk,
        stack: LayerStack,
        hub: TraceHub,
        detector: HangDetector,
        metrics_text: Callable[[], bytes],
        session: Callable[[], Any],
        prefetch: Callable[[], Any] | None = None,
        start_prefetch: Callable[[list[tuple[int, int]]], None] | None = None,
    ) -> None:
        self.disk = disk
        self.stack = stack
        self.hub = hub
        self.detector = detector
        self.metrics_text = metrics_text
        self.session = session
        self.prefetch = prefetch
        self.start_prefetch = start_prefetch
        self.ops: dict[str, Callable[[dict[str, Any]], tuple[bytes, str]]] = {
            "info": self._info,
            "layers": self._layers,
            "layer-index": self._layer_index,
            "merged-index": self._merged_index,
            "cache": self._cache,
            "presence": self._presence,
            "inflight": self._inflight,
            "metrics": lambda _args: (self.metrics_text(), "text/plain"),
            "prefetch": self._prefetch,
            "prefetch-ranges": self._prefetch_ranges,
        }

    # Serving ---------------------------------------------------------------------------

    async def serve(
        self, path: str | os.PathLike[str], task_status: Any = trio.TASK_STATUS_IGNORED
    ):
        """Listen on `path` until cancelled (the socket file is removed on the way out)."""
        path = os.fspath(path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        try:
            await trio.serve_listeners(self._handle, [listener])
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                request = await _receive_line(stream)
                op = request.get("op")
                if op == "trace":
                    await self._stream_trace(stream)
                    return
                handler = self.ops.get(op)  # type: ignore[arg-type]
                if handler is None:
                    raise IntrospectionError(
                        f"unknown op {op!r}; ops: {', '.join(sorted([*self.ops, 'trace']))}"
                    )
                body, kind = await trio.to_thread.run_sync(handler, request)
                head = {"ok": True, "length": len(body), "type": kind}
                await stream.send_all(json.dumps(head).encode() + b"\n" + body)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            except Exception as exc:
                log.info("introspection request failed: %s", exc)
                reply = {"ok": False, "error": str(exc)}
                try:
                    await stream.send_all(json.dumps(reply).encode() + b"\n")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    async def _stream_trace(self, stream: trio.SocketStream) -> None:
        follower = self.hub.follow()
        log.info("a trace follower joined (%d now)", len(self.hub.followers))
        try:
            await stream.send_all(b'{"ok": true, "stream": true}\n')
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_eof, stream, nursery.cancel_scope)
                dropped = 0
                while True:
                    await trio.sleep(STREAM_INTERVAL)
                    events = follower.drain()
                    lines = [json.dumps(event_json(event, follower.started_ns)) for event in events]
                    if follower.dropped != dropped:
                        lines.append(json.dumps({"dropped": follower.dropped - dropped}))
                        dropped = follower.dropped
                    if lines:
                        await stream.send_all(("\n".join(lines) + "\n").encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.hub.unfollow(follower)
            log.info("a trace follower left (%d now)", len(self.hub.followers))

    # Ops (run in a worker thread) ---------------------------------------------------------

    def _info(self, _args: dict[str, Any]) -> tuple[bytes, str]:
        disk = self.disk
        info = {
            "pid": os.getpid(),
            "image": self.stack.name,
            "size": self.stack.size,
            "read_only": disk.read_only,
            "lowers": len(self.stack.lowers),
            "writable_upper": self.stack.upper is not None,
            "served_direct": disk.served_direct,
            "served_in_threads": disk.served_in_threads,
            "in_flight": len(disk.in_flight),
            "hang_threshold_s": self.detector.threshold_s,
            "hangs_total": self.detector.hangs_total,
            "metrics": disk.metrics is not None,
            "trace_followers": len(self.hub.followers),
        }
        return _json(info)

    def _layers(self, _args: dict[str, Any]) -> tuple[bytes, str]:
        layers = []
        for position, layer in enumerate(self.stack.lowers):
            layers.append({"position": position, **_describe_layer(layer)})
        if self.stack.upper is not None:
            upper = self.stack.upper
            layers.append(
                {
                    "position": "upper",
                    "name": getattr(upper, "name", "upper"),
                    "readonly": upper.readonly,
                    "virtual_size": upper.virtual_size,
                    "uuid": upper.uuid,
                    "parent_uuid": upper.parent_uuid,
                    "segments": len(upper.index),
                }
            )
        return _json(layers)

    def _layer_index(self, args: dict[str, Any]) -> tuple[bytes, str]:
        which = args.get("layer")
        if which == "upper":
            if self.stack.upper is None:
                raise IntrospectionError("the image has no writable layer")
            index = self.stack.upper.index
        else:
            try:
                index = self.stack.lowers[int(which)].index  # type: ignore[arg-type]
            except (TypeError, ValueError, IndexError):
                raise IntrospectionError(
                    f"layer {which!r}: expected 0..{len(self.stack.lowers) - 1} or 'upper'"
                ) from None
        return _index_csv(index, None), "text/csv"

    def _merged_index(self, _args: dict[str, Any]) -> tuple[bytes, str]:
        names = [self.stack.layer_for_tag(tag).name for tag in range(len(self.stack.layers))]
        return _index_csv(self.stack.index, names), "text/csv"

    def _cache(self, _args: dict[str, Any]) -> tuple[bytes, str]:
        import dataclasses

        from workbench.blobs.cache import file_stem

        session = self.session()
        if session is None or session.cache is None:
            return _json(None)
        stats = session._portal.run_sync(session.cache.statistics)
        document = dataclasses.asdict(stats)
        for blob in document["blobs"]:
            blob["stem"] = file_stem(blob["key"])
        return _json(document)

    def _presence(self, args: dict[str, Any]) -> tuple[bytes, str]:
        session = self.session()
        key = str(args.get("key", ""))
        if session is None or session.cache is None:
            raise IntrospectionError("the image reads no registry blobs: there is no cache")
        cache = session.cache
        states = session._portal.run_sync(cache.block_states, key)
        if states is None:
            raise IntrospectionError(f"the cache holds no blob {key!r}")
        stats = session._portal.run_sync(cache.statistics)
        size = next((blob.size for blob in stats.blobs if blob.key == key), 0)
        return presence_map(key, size, cache.refill_size, states).encode(), "text/plain"

    def _inflight(self, _args: dict[str, Any]) -> tuple[bytes, str]:
        now = time.monotonic()
        requests = [
            {
                "op": request.op,
                "offset": request.offset,
                "length": request.length,
                "age_s": round(request.age(now), 6),
                "hung": request.hung,
            }
            for request in list(self.disk.in_flight.values())
        ]
        return _json({"threshold_s": self.detector.threshold_s, "requests": requests})

    def _prefetch(self, _args: dict[str, Any]) -> tuple[bytes, str]:
        prefetcher = self.prefetch() if self.prefetch is not None else None
        return _json(prefetcher.status() if prefetcher is not None else None)

    def _prefetch_ranges(self, args: dict[str, Any]) -> tuple[bytes, str]:
        if self.start_prefetch is None:
            raise IntrospectionError("this server takes no prefetch ranges")
        ranges = [(int(offset), int(length)) for offset, length in args.get("ranges", [])]
        self.start_prefetch(ranges)
        return _json({"queued": len(ranges)})


# Bodies -----------------------------------------------------------------------------------


def _json(value: Any) -> tuple[bytes, str]:
    return json.dumps(value, indent=2, default=str).encode() + b"\n", "application/json"


def _describe_layer(layer: Any) -> dict[str, Any]:
    import dataclasses

    described: dict[str, Any] = {
        "name": layer.name,
        "wrapping": list(getattr(layer, "wrapping", ())),
        "uuid": layer.uuid,
        "parent_uuid": layer.parent_uuid,
        "virtual_size": layer.virtual_size,
        "segments": len(layer.index),
    }
    for part in ("header", "trailer"):
        header = getattr(layer, part, None)
        if header is not None:
            fields = dataclasses.asdict(header)
            fields["user_tag"] = header.message
            described[part] = fields
    file = getattr(layer, "file", None)
    if file is not None:
        described["file_size"] = file.size
    return described


def _index_csv(index: Any, names: list[str] | None) -> bytes:
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame(
        {
            "offset": index.offset.astype(np.int64) << 9,
            "length": index.length.astype(np.int64) << 9,
            "moffset": index.moffset.astype(np.int64) << 9,
            "zeroed": index.zeroed.astype(bool),
            "tag": index.tag.astype(np.int64),
        }
    )
    if names is not None:
        frame["layer"] = np.array(names, dtype=object)[frame["tag"].to_numpy()]
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    return buffer.getvalue().encode()


def presence_map(key: str, size: int, refill: int, states: Any) -> str:
    """A blob's blocks as text: a legend, then 64 blocks a line after their byte offset."""
    present = int((states == 1).sum())
    lines = [
        f"# {key}: {size} bytes, {len(states)} blocks of {refill} bytes, {present} present",
        "# '#' present  '.' absent  '~' being fetched",
    ]
    chars = "".join(PRESENCE_CHARS.get(int(state), "?") for state in states.tolist())
    for start in range(0, len(chars), PRESENCE_PER_LINE):
        lines.append(f"{start * refill:#014x}  {chars[start : start + PRESENCE_PER_LINE]}")
    return "\n".join(lines) + "\n"


async def _receive_line(stream: trio.SocketStream) -> dict[str, Any]:
    buffer = bytearray()
    while b"\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > MAX_REQUEST:
            raise IntrospectionError(f"request longer than {MAX_REQUEST} bytes")
    request = json.loads(bytes(buffer).split(b"\n", 1)[0] or b"{}")
    if not isinstance(request, dict):
        raise IntrospectionError(f"a request is a JSON object, not {request!r}")
    return request


async def _cancel_on_eof(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    try:
        while await stream.receive_some(4096):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()


# Clients ----------------------------------------------------------------------------------


def _encode(op: str, args: dict[str, Any]) -> bytes:
    return json.dumps({"op": op, **args}).encode() + b"\n"


def _parse_head(line: bytes, path: str, op: str) -> dict[str, Any]:
    if not line:
        raise IntrospectionError(f"{path}: the server closed the connection (op {op})")
    head = json.loads(line)
    if not head.get("ok"):
        raise IntrospectionError(f"{path}: op {op} failed: {head.get('error')}")
    return head


def query(path: str | os.PathLike[str], op: str, timeout: float = 30.0, **args: Any) -> bytes:
    """The body of one request to the endpoint at `path` (blocking)."""
    path = os.fspath(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            raise IntrospectionError(
                f"{path}: cannot reach the FUSE server's endpoint ({exc}); is the image "
                "still mounted?"
            ) from exc
        sock.sendall(_encode(op, args))
        reader = sock.makefile("rb")
        head = _parse_head(reader.readline(), path, op)
        body = reader.read(head["length"])
    return body


def follow(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The trace events of the server at `path`, as they happen (blocking; close to stop)."""
    path = os.fspath(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        sock.sendall(_encode("trace", {}))
        reader = sock.makefile("rb")
        _parse_head(reader.readline(), path, "trace")
        for line in reader:
            yield json.loads(line)
    finally:
        sock.close()


async def aquery(path: str | os.PathLike[str], op: str, **args: Any) -> bytes:
    """`query` for trio code."""
    path = os.fspath(path)
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        raise IntrospectionError(
            f"{path}: cannot reach the FUSE server's endpoint ({exc})"
        ) from exc
    async with stream:
        await stream.send_all(_encode(op, args))
        buffer = bytearray()
        while b"\n" not in buffer:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            buffer += chunk
        line, _, rest = bytes(buffer).partition(b"\n")
        head = _parse_head(line, path, op)
        body = bytearray(rest)
        while len(body) < head["length"]:
            chunk = await stream.receive_some(1 << 20)
            if not chunk:
                raise IntrospectionError(f"{path}: op {op}: the body was cut short")
            body += chunk
    return bytes(body)


async def afollow(path: str | os.PathLike[str], on_line: Callable[[bytes], None]) -> None:
    """Call `on_line` with each JSON line of the server's trace stream until cancelled."""
    path = os.fspath(path)
    stream = await trio.open_unix_socket(path)
    async with stream:
        await stream.send_all(_encode("trace", {}))
        buffer = bytearray()
        head_seen = False
        while True:
            chunk = await stream.receive_some(1 << 16)
            if not chunk:
                return
            buffer += chunk
            *lines, rest = bytes(buffer).split(b"\n")
            buffer = bytearray(rest)
            for line in lines:
                if not head_seen:
                    _parse_head(line, path, "trace")
                    head_seen = True
                elif line:
                    on_line(line)


def socket_path(run_dir: str | os.PathLike[str], mount_id: str) -> Path:
    """Where the server of mount `mount_id` listens."""
    return Path(run_dir) / "mounts" / f"{mount_id}.sock"
