"""The snapshotter over gRPC: containerd's snapshots service on a unix socket.

containerd reaches a proxy snapshotter through ``[proxy_plugins]`` in its config (see the
README for the snippet) and calls ``containerd.services.snapshots.v1.Snapshots`` on its
socket: Prepare, View, Mounts, Commit, Remove, Stat, Update, List (a stream: containerd's
Walk), Usage and Cleanup. Each call runs `Snapshotter`'s method of the same name in a
worker thread of the server.

Errors become gRPC statuses that containerd's errdefs understand, with the exception's
message as the status detail (containerd puts it in front of its own error class, so the
cause reaches ``ctr``'s output):

    SnapshotNotFoundError    NOT_FOUND             (e.g. the unpacker's Stat of a chain ID)
    SnapshotExistsError      ALREADY_EXISTS        (also: a remote layer, nothing to unpack)
    SnapshotStateError       FAILED_PRECONDITION
    SnapshotArgumentError    INVALID_ARGUMENT
    RegistryError            UNAVAILABLE           (blob, range, HTTP status, registry)
    MountError               UNAVAILABLE           (a device that could not be attached, with
                                                  the FUSE server's log lines naming the read)
    anything else            INTERNAL, "<type>: <message>"

With a metrics address, a Prometheus endpoint (prometheus_client) serves, per method:
``workbench_snapshotter_requests_total{method,code}``, and the latency histogram
``workbench_snapshotter_request_seconds{method}``.

Caveats:
- the socket's parent folder is created; a stale socket file there is replaced;
- a call that is cancelled by containerd still runs to its end in its worker thread (the
  snapshotter's state stays consistent; containerd cleans up what it no longer wants).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

from workbench.device.mount import MountError
from workbench.errors import (
    RegistryError,
    SnapshotArgumentError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    SnapshotStateError,
)
from workbench.snapshotter import protos
from workbench.snapshotter.service import MountSpec, Snapshotter
from workbench.snapshotter.store import Snapshot

__all__ = ["SnapshotterServer", "status_of"]

log = logging.getLogger(__name__)

WORKERS: Final = 8
"""Worker threads of the gRPC server (calls are serialized by the snapshotter's lock, but a
slow device attach must not keep Stat or List of other callers from being read off the wire)."""

_STATUSES: Final = (
    (SnapshotNotFoundError, grpc.StatusCode.NOT_FOUND),
    (SnapshotExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (SnapshotStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (SnapshotArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (RegistryError, grpc.StatusCode.UNAVAILABLE),
    (MountError, grpc.StatusCode.UNAVAILABLE),
)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and detail text an exception of a call becomes (module docstring)."""
    for kind, code in _STATUSES:
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


class _Metrics:
    """Call counts, errors and latency per method, in a private Prometheus registry."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "workbench_snapshotter_requests",
            "snapshots API calls by method and gRPC status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "workbench_snapshotter_request_seconds",
            "time to answer a snapshots API call",
            ["method"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
            registry=self.registry,
        )

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.requests.labels(method, code.name).inc()
        self.latency.labels(method).observe(seconds)


@dataclass
class _Call:
    method: str
    started: float


class SnapshotterServer:
    """A `Snapshotter` served on a unix socket; `start`, then `stop` (or `serve_forever`).

    Parameters
    ----------
    snapshotter
        The snapshotter to serve (closed by `stop`).
    socket_path
        The unix socket to listen on.
    metrics_address
        ``[host:]port`` of a Prometheus endpoint, or None for none.
    """

    def __init__(
        self,
        snapshotter: Snapshotter,
        socket_path: str | os.PathLike[str],
        metrics_address: str | None = None,
    ) -> None:
        self.snapshotter = snapshotter
        self.socket_path = Path(socket_path).absolute()
        self.metrics_address = metrics_address
        self.metrics = _Metrics()
        self.metrics_port: int | None = None
        self._api = protos.load()
        self._server: grpc.Server | None = None
        self._metrics_server: Any = None
        self._stopped = threading.Event()

    def start(self) -> SnapshotterServer:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path.is_socket():
            self.socket_path.unlink()
        server = grpc.server(futures.ThreadPoolExecutor(WORKERS, "snapshotter"))
        self._api.snapshots_grpc.add_SnapshotsServicer_to_server(_Servicer(self), server)
        if server.add_insecure_port(f"unix:{self.socket_path}") == 0:
            raise OSError(f"could not listen on unix socket {self.socket_path}")
        server.start()
        self._server = server
        if self.metrics_address is not None:
            self._start_metrics(self.metrics_address)
        log.info("snapshotter serving %s on %s", self.snapshotter.root, self.socket_path)
        return self

    def _start_metrics(self, address: str) -> None:
        from prometheus_client import start_http_server

        host, _, port = address.rpartition(":")
        self._metrics_server, _thread = start_http_server(
            int(port), addr=host or "127.0.0.1", registry=self.metrics.registry
        )
        self.metrics_port = self._metrics_server.server_port
        log.info("metrics on http://%s:%d/metrics", host or "127.0.0.1", self.metrics_port)

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving and close the store; devices and their mounts stay."""
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        self.snapshotter.close()
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
        self._stopped.set()

    def serve_forever(self) -> None:
        """Serve until SIGTERM or SIGINT, then `stop`."""

        def on_signal(signum: int, _frame: object) -> None:
            log.info("got signal %d: stopping", signum)
            self._stopped.set()

        previous = {
            signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self._stopped.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.stop()

    def __enter__(self) -> SnapshotterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # One call, timed and counted; its exception becomes a status.

    def run(self, method: str, context: grpc.ServicerContext, work: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            result = work()
        except Exception as exc:
            code, detail = status_of(exc)
            self.metrics.observe(method, code, time.perf_counter() - started)
            level = logging.DEBUG if code == grpc.StatusCode.ALREADY_EXISTS else logging.INFO
            if code == grpc.StatusCode.INTERNAL:
                level = logging.ERROR
            log.log(level, "%s failed (%s): %s", method, code.name, detail)
            context.abort(code, detail)
        self.metrics.observe(method, grpc.StatusCode.OK, time.perf_counter() - started)
        return result


class _Servicer:
    """The generated servicer's methods, mapped onto `Snapshotter` (see the module docstring)."""

    def __init__(self, server: SnapshotterServer) -> None:
        self._server = server
        self._sn = server.snapshotter
        self._pb = server._api.snapshots
        self._types = server._api.mount

    def _mounts(self, mounts: list[MountSpec]) -> list[Any]:
        return [self._types.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]

    def _info(self, snapshot: Snapshot) -> Any:
        info = self._pb.Info(name=snapshot.name, parent=snapshot.parent, kind=int(snapshot.kind))
        info.labels.update(snapshot.labels)
        info.created_at.FromNanoseconds(snapshot.created)
        info.updated_at.FromNanoseconds(snapshot.updated)
        return info

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        def work() -> Any:
            mounts = self._sn.prepare(request.key, request.parent, dict(request.labels))
            return self._pb.PrepareSnapshotResponse(mounts=self._mounts(mounts))

        return self._server.run("Prepare", context, work)

    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        def work() -> Any:
            mounts = self._sn.view(request.key, request.parent, dict(request.labels))
            return self._pb.ViewSnapshotResponse(mounts=self._mounts(mounts))

        return self._server.run("View", context, work)

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        def work() -> Any:
            return self._pb.MountsResponse(mounts=self._mounts(self._sn.mounts(request.key)))

        return self._server.run("Mounts", context, work)

    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        from google.protobuf import empty_pb2

        def work() -> Any:
            self._sn.commit(request.name, request.key, dict(request.labels))
            return empty_pb2.Empty()

        return self._server.run("Commit", context, work)

    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        from google.protobuf import empty_pb2

        def work() -> Any:
            self._sn.remove(request.key)
            return empty_pb2.Empty()

        return self._server.run("Remove", context, work)

    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        def work() -> Any:
            return self._pb.StatSnapshotResponse(info=self._info(self._sn.stat(request.key)))

        return self._server.run("Stat", context, work)

    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        def work() -> Any:
            paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
            snapshot = self._sn.update(request.info.name, dict(request.info.labels), paths)
            return self._pb.UpdateSnapshotResponse(info=self._info(snapshot))

        return self._server.run("Update", context, work)

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        snapshots = self._server.run("List", context, lambda: self._sn.walk(request.filters))
        # containerd's own snapshot service sends batches of 100 infos per message.
        for start in range(0, len(snapshots), 100):
            batch = [self._info(snapshot) for snapshot in snapshots[start : start + 100]]
            yield self._pb.ListSnapshotsResponse(info=batch)

    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        def work() -> Any:
            size, inodes = self._sn.usage(request.key)
            return self._pb.UsageResponse(size=size, inodes=inodes)

        return self._server.run("Usage", context, work)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        from google.protobuf import empty_pb2

        def work() -> Any:
            self._sn.cleanup()
            return empty_pb2.Empty()

        return self._server.run("Cleanup", context, work)
