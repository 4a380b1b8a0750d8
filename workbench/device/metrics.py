"""Prometheus metrics of a mounted image: the device, the block cache, the registry, ZFile.

The FUSE server (`workbench.device.fuse`) makes a `DeviceMetrics` when it is asked for
metrics (``--metrics ADDR``, ``workbench mount ... --metrics ADDR``) and serves them over
HTTP at ``http://ADDR/metrics`` with prometheus_client; the debug view shows the same text
(`workbench debugfs`, file ``metrics``). Metric families:

    workbench_device_requests_total{op}            FUSE requests served (read, write, fsync...)
    workbench_device_bytes_total{op}               bytes read or written
    workbench_device_errors_total{op,errno}        requests answered with an error
    workbench_device_request_seconds{op}           histogram of request latency
    workbench_device_requests_in_flight            requests waiting in worker threads now
    workbench_device_requests_hung                 of those, older than the hang threshold
    workbench_device_hangs_total                   requests ever seen older than the threshold
    workbench_device_oldest_request_seconds        age of the oldest request in flight
    workbench_cache_*                              block cache counters (hits, misses, bytes
                                                   from cache and fetched, fetches, evictions,
                                                   crc_failures, present and capacity bytes)
    workbench_cache_fetch_seconds                  histogram of the cache's fetch latency
    workbench_registry_requests_total, _bytes_total, _retries_total
    workbench_registry_errors_total{status}        failed HTTP exchanges by status or exception
    workbench_zfile_failures_total{kind}           ZFile blocks that failed (crc, decompress)

Cost. The device counters and histogram are plain integers updated by the serving task
(no locks: one trio thread serves every request), and only when metrics are on; everything
else is read from the counters the cache, client and ZFile already keep, when scraped.

The hang detector (`HangDetector`) runs in the FUSE server whether or not metrics are on: a
request in flight longer than `threshold_s` (default 30 s) is logged once as a WARNING, and
the gauges above count it. Requests served in the trio task itself never wait (they only use
local and cached data), so the requests in flight are exactly those in worker threads.

Caveats:
- cache and registry figures come from the process-wide registry session; an image of local
  layers only has none;
- ZFile failures count every reader in the process, healed or not (a healed block counts one
  failure per attempt).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "DEFAULT_HANG_THRESHOLD",
    "LATENCY_BUCKETS",
    "DeviceMetrics",
    "HangDetector",
    "Histogram",
    "InFlight",
    "parse_address",
    "start_metrics_server",
]

log = logging.getLogger(__name__)

DEFAULT_HANG_THRESHOLD = 30.0
"""Seconds a request may be in flight before it counts as hung."""

LATENCY_BUCKETS = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
    100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
"""Upper bounds (seconds) of the latency histograms: a cache hit (~10 us) to a hang."""


class Histogram:
    """Counts per latency bucket and their sum; `observe` is one bisect and two additions."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count) pairs as Prometheus wants them, ``+Inf`` last."""
        pairs, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            pairs.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return pairs


@dataclass
class _OpCounters:
    requests: int = 0
    nbytes: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency: Histogram = field(default_factory=Histogram)


class DeviceMetrics:
    """Per FUSE operation: requests, bytes, errors by errno, latency."""

    def __init__(self) -> None:
        self.ops: dict[str, _OpCounters] = {}
        self.fetch_latency = Histogram()

    def observe(self, op: str, nbytes: int, seconds: float, error: str | None = None) -> None:
        counters = self.ops.get(op)
        if counters is None:
            counters = self.ops[op] = _OpCounters()
        counters.requests += 1
        counters.nbytes += nbytes
        counters.latency.observe(seconds)
        if error is not None:
            counters.errors[error] = counters.errors.get(error, 0) + 1

    def observe_fetch(self, seconds: float) -> None:
        self.fetch_latency.observe(seconds)


@dataclass
class InFlight:
    """A request waiting in a worker thread: what it is and since when (time.monotonic)."""

    op: str
    offset: int
    length: int
    started: float
    hung: bool = False

    def age(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.started


class HangDetector:
    """Watches a table of requests in flight and reports those older than `threshold_s`."""

    def __init__(
        self, in_flight: dict[int, InFlight], threshold_s: float = DEFAULT_HANG_THRESHOLD
    ) -> None:
        if threshold_s <= 0:
            raise ValueError(f"hang threshold must be > 0 seconds, not {threshold_s}")
        self.in_flight = in_flight
        self.threshold_s = threshold_s
        self.hangs_total = 0

    def check(self, now: float | None = None) -> list[InFlight]:
        """Mark and return the requests newly found hung (each is reported once)."""
        now = time.monotonic() if now is None else now
        found = []
        for request in list(self.in_flight.values()):
            if not request.hung and request.age(now) >= self.threshold_s:
                request.hung = True
                self.hangs_total += 1
                found.append(request)
                log.warning(
                    "fuse %s of %d bytes at %d in flight for %.1f s (hang threshold %.1f s): "
                    "the registry or the cache is not answering",
                    request.op,
                    request.length,
                    request.offset,
                    request.age(now),
                    self.threshold_s,
                )
        return found

    def hung_now(self) -> int:
        return sum(1 for request in list(self.in_flight.values()) if request.hung)

    def oldest_age(self) -> float:
        now = time.monotonic()
        return max((request.age(now) for request in list(self.in_flight.values())), default=0.0)

    async def run(self) -> None:
        """Check a few times per threshold until cancelled."""
        interval = min(1.0, self.threshold_s / 4)
        while True:
            await trio.sleep(interval)
            self.check()


class _Collector:
    """Builds the metric families at scrape time (the prometheus_client custom collector)."""

    def __init__(
        self,
        device: DeviceMetrics | None,
        detector: HangDetector,
        session: Callable[[], Any],
    ) -> None:
        self.device = device
        self.detector = detector
        self.session = session

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        yield from self._device(CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily)
        yield from self._cache_and_registry(CounterMetricFamily, GaugeMetricFamily)
        if self.device is not None:
            fetches = HistogramMetricFamily(
                "workbench_cache_fetch_seconds", "Latency of the block cache's fetches."
            )
            histogram = self.device.fetch_latency
            fetches.add_metric([], histogram.cumulative(), histogram.sum)
            yield fetches

        from workbench.formats.zfile import FAILURES

        failures = CounterMetricFamily(
            "workbench_zfile_failures", "ZFile blocks that failed a check.", labels=["kind"]
        )
        for kind in ("crc", "decompress"):
            failures.add_metric([kind], FAILURES[kind])
        yield failures

    def _device(self, counter: Any, gauge: Any, histogram_family: Any) -> Iterator[Any]:
        detector = self.detector
        yield gauge(
            "workbench_device_requests_in_flight",
            "Requests waiting in worker threads.",
            value=len(detector.in_flight),
        )
        yield gauge(
            "workbench_device_requests_hung",
            "Requests in flight longer than the hang threshold.",
            value=detector.hung_now(),
        )
        yield counter(
            "workbench_device_hangs",
            "Requests ever found in flight longer than the hang threshold.",
            value=detector.hangs_total,
        )
        yield gauge(
            "workbench_device_oldest_request_seconds",
            "Age of the oldest request in flight.",
            value=detector.oldest_age(),
        )
        if self.device is None:
            return
        requests = counter("workbench_device_requests", "FUSE requests served.", labels=["op"])
        nbytes = counter("workbench_device_bytes", "Bytes read or written.", labels=["op"])
        errors = counter(
            "workbench_device_errors", "Requests answered with an error.", labels=["op", "errno"]
        )
        latency = histogram_family(
            "workbench_device_request_seconds", "FUSE request latency.", labels=["op"]
        )
        for op, counters in sorted(self.device.ops.items()):
            requests.add_metric([op], counters.requests)
            nbytes.add_metric([op], counters.nbytes)
            for name, count in sorted(counters.errors.items()):
                errors.add_metric([op, name], count)
            latency.add_metric([op], counters.latency.cumulative(), counters.latency.sum)
        yield from (requests, nbytes, errors, latency)

    def _cache_and_registry(self, counter: Any, gauge: Any) -> Iterator[Any]:
        session = self.session()
        if session is None:
            return
        cache = session.cache
        if cache is not None:
            stats = session._portal.run_sync(cache.statistics)
            for name in (
                "hits",
                "misses",
                "bytes_from_cache",
                "bytes_fetched",
                "fetches",
                "evictions",
                "crc_failures",
            ):
                value = getattr(stats, name)
                yield counter(f"workbench_cache_{name}", f"Block cache {name}.", value=value)
            yield gauge("workbench_cache_present_bytes", "Bytes cached.", value=stats.present_bytes)
            yield gauge(
                "workbench_cache_capacity_bytes", "Cache capacity.", value=stats.capacity_bytes
            )
        client = session._client
        if client is not None:
            registry = client.statistics()
            yield counter("workbench_registry_requests", "HTTP exchanges.", value=registry.requests)
            yield counter("workbench_registry_bytes", "Body bytes received.", value=registry.bytes)
            yield counter(
                "workbench_registry_retries", "Attempts repeated.", value=registry.retries
            )
            errors = counter(
                "workbench_registry_errors", "Failed exchanges by status.", labels=["status"]
            )
            for status, count in sorted(registry.errors.items()):
                errors.add_metric([status], count)
            yield errors


def make_registry(
    device: DeviceMetrics | None, detector: HangDetector, session: Callable[[], Any]
) -> CollectorRegistry:
    """A prometheus_client registry holding the workbench collector and the process's."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(device, detector, session))  # type: ignore[arg-type]
    ProcessCollector(registry=registry)
    return registry


def parse_address(address: str) -> tuple[str, int]:
    """``PORT`` or ``HOST:PORT`` (host default 127.0.0.1) as (host, port)."""
    host, _, port = address.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise ValueError(
            f"metrics address {address!r}: expected PORT or HOST:PORT, e.g. 9863 or 127.0.0.1:9863"
        )
    return host or "127.0.0.1", number


def start_metrics_server(address: str, registry: CollectorRegistry) -> tuple[Any, int]:
    """Serve `registry` at ``http://ADDR/metrics`` in a daemon thread; (server, port)."""
    from prometheus_client import start_http_server

    host, port = parse_address(address)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[1]
    log.info("metrics at http://%s:%d/metrics", host, bound)
    return server, bound
