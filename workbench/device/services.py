"""What a FUSE server runs beside the disk: introspection, hang detection, metrics, prefetch.

`ServerServices` is made by `workbench.device.fuse.main` from its command line, after the
stack is open and before the disk is served:

- the introspection endpoint (`workbench.device.introspect`) on ``--control SOCK``, with the
  live trace stream of a `TraceHub`;
- the hang detector (`workbench.device.metrics.HangDetector`, ``--hang-threshold S``);
- Prometheus metrics on ``--metrics ADDR`` (device counters switched on only then);
- prefetch: ``--record-trace FILE`` records the lowers' reads from now on, ``--replay-trace
  FILE`` (or the image's acceleration layer) starts replaying at once, and the endpoint's
  ``prefetch-ranges`` op takes the ranges of a priority list (`workbench.prefetch`).

`start(disk, nursery)` is the `services` hook of `serve`; `close()` runs after the disk is
unmounted: it stops the prefetch threads, writes a recorded trace and stops the metrics server.

Caveats:
- the metrics HTTP server runs in a daemon thread of prometheus_client; a scrape reads the
  cache in the cache's trio thread and waits for it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from workbench.device.introspect import Introspector
from workbench.device.metrics import (
    DEFAULT_HANG_THRESHOLD,
    DeviceMetrics,
    HangDetector,
    make_registry,
    start_metrics_server,
)
from workbench.errors import ImageConfigError
from workbench.registry.session import current_default_session
from workbench.tracing.stream import TraceHub

if TYPE_CHECKING:
    from workbench.device.fuse import FuseDisk
    from workbench.image.stack import LayerStack
    from workbench.prefetch.runtime import Prefetcher, TraceRecording

__all__ = ["ServerServices"]

log = logging.getLogger(__name__)


class ServerServices:
    """The services of one FUSE server; see the module docstring."""

    def __init__(
        self,
        stack: LayerStack,
        config: str,
        *,
        control: str | None = None,
        metrics: str | None = None,
        hang_threshold: float = DEFAULT_HANG_THRESHOLD,
        record_trace: str | None = None,
        replay_trace: str | None = None,
        concurrency: int = 16,
    ) -> None:
        self.stack = stack
        self.control = control
        self.hub = TraceHub()
        self.in_flight: dict[int, Any] = {}
        self.detector = HangDetector(self.in_flight, hang_threshold)
        self.device_metrics = DeviceMetrics() if metrics is not None else None
        self.registry = make_registry(self.device_metrics, self.detector, current_default_session)
        self.concurrency = concurrency
        self.recording: TraceRecording | None = None
        self.prefetcher: Prefetcher | None = None
        self.metrics_port: int | None = None
        self._metrics_server: Any = None

        self._start_prefetch(config, record_trace, replay_trace)
        if metrics is not None:
            session = current_default_session()
            if session is not None and session.cache is not None:
                session.cache.fetch_observer = self.device_metrics.observe_fetch  # type: ignore
            self._metrics_server, self.metrics_port = start_metrics_server(metrics, self.registry)

    # Prefetch ------------------------------------------------------------------------------

    def _start_prefetch(self, config: str, record: str | None, replay: str | None) -> None:
        from workbench.formats.config import ImageConfig
        from workbench.prefetch.layer import read_acceleration_trace
        from workbench.prefetch.runtime import Prefetcher, TraceRecording, coalesce, trace_jobs
        from workbench.prefetch.tracefile import TraceFile

        image = ImageConfig.load(config)
        if record is not None and replay is not None:
            raise ImageConfigError("record a trace or replay one, not both at once")
        if record is not None and image.acceleration_layer:
            raise ImageConfigError(
                f"{config}: the image has an acceleration layer (a recorded trace); "
                "recording another is refused, as OverlayBD does: mount the image without it"
            )
        if record is not None:
            self.recording = TraceRecording(self.stack, record)
            return

        trace, source = None, ""
        if replay is not None:
            trace, source = TraceFile.load(replay), replay
        elif image.acceleration_layer:
            trace, source = read_acceleration_trace(image), "acceleration layer"
        if trace is not None:
            jobs = coalesce(trace_jobs(self.stack, trace))
            self.prefetcher = Prefetcher(
                jobs, self.concurrency, "replay", source, on_finish=self._pause_readahead()
            ).start()

    def prefetch_ranges(self, ranges: list[tuple[int, int]]) -> None:
        """Prefetch disk ranges (a resolved priority list); queued after any replay."""
        from workbench.prefetch.runtime import Prefetcher, coalesce, range_jobs

        jobs = coalesce(range_jobs(self.stack, ranges))
        if self.prefetcher is None:
            self.prefetcher = Prefetcher(
                jobs, self.concurrency, "list", "priority list", self._pause_readahead()
            ).start()
        else:
            self.prefetcher.add(jobs)

    def _pause_readahead(self) -> Any:
        """Turn the block cache's readahead off while prefetching; returns what turns it back.

        The prefetcher knows what the start will read; readahead guessing beside it fetches
        whole windows the start never reads, on the same link (measured by `workbench bench
        prefetch`: the application's reads fetched more than the replay itself).
        """
        from workbench.prefetch.runtime import cached_blobs

        paused = [blob for blob in cached_blobs(self.stack) if blob.readahead]
        for blob in paused:
            blob.readahead = False

        def resume() -> None:
            for blob in paused:
                blob.readahead = True

        return resume

    def prefetch_status(self) -> Any:
        if self.recording is not None:
            return self.recording
        return self.prefetcher

    # The serving loop ---------------------------------------------------------------------

    def start(self, disk: FuseDisk, nursery: trio.Nursery) -> None:
        """The `serve` hook: share the disk's table of calls in flight, start the tasks."""
        disk.in_flight = self.in_flight
        disk.metrics = self.device_metrics
        nursery.start_soon(self.detector.run)
        if self.recording is not None:
            nursery.start_soon(self.recording.watch_lock)
        if self.control is not None:
            from prometheus_client import generate_latest

            introspector = Introspector(
                disk,
                self.stack,
                self.hub,
                self.detector,
                lambda: generate_latest(self.registry),
                current_default_session,
                self.prefetch_status,
                self.prefetch_ranges,
            )
            Path(self.control).parent.mkdir(parents=True, exist_ok=True)
            nursery.start_soon(introspector.serve, self.control)

    def close(self) -> None:
        """After unmounting: stop prefetching, write a recorded trace, stop serving metrics."""
        if self.prefetcher is not None:
            self.prefetcher.stop()
        if self.recording is not None:
            try:
                self.recording.stop()
            except OSError as exc:
                log.error("could not write the recorded trace %s: %s", self.recording.path, exc)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
