"""A shaping TCP proxy: round-trip latency and a bandwidth cap between a client and a server.

The kernels of these machines have no netem, so the workbench puts a user-space proxy between
any client and any registry to imitate the links of the DADI paper (see `PRESETS`)::

    client  <->  ShapingProxy(listen)  <->  upstream (a registry)

Model of a link, applied to each direction of each connection separately:

- bandwidth: the proxy reads a chunk from one side, then waits until the token buckets of
  that direction allow it to pass. Each connection has its own bucket per direction, and by
  default all connections also share one bucket per direction, as flows share a real link
  (`shared=True`: `mbps` is the link's rate; `shared=False`: every connection gets `mbps`
  of its own). `connection_mbps` caps a single connection below the link rate.
- latency: a chunk that passed the buckets is stamped with `now + rtt / 2` and put in a
  queue; a sender task writes each chunk to the other side at its stamp. The delay is a
  pipeline, not a stop-and-wait: throughput is not limited by it, order is kept, and a
  request and its response see one full RTT between them.
- end of stream travels through the same queue: EOF from one side becomes a half-close
  (`shutdown(SHUT_WR)`) on the other side, one-way delay later. A reset or error on either
  side aborts both connections (RST, via SO_LINGER 0) at once; queued data is dropped, as
  a reset drops it on a real link.
- an upstream that cannot be reached: the client's connection is aborted right after the
  connection attempt fails, with a WARNING naming the upstream (once per outage).

Chunks are small (4-64 KiB, about half a millisecond of the link's rate) so that pacing is
smooth; the queue of each direction holds about two bandwidth-delay products, then the
reader stops reading and TCP's own flow control pushes back on the sender.

Caveats:
- trio's timers sleep in whole milliseconds (epoll); one-way delays below 25 ms are
  therefore met by sleeping to within 1 ms of the deadline and yielding to the event loop
  in a loop for the rest, which costs CPU while such data waits. Longer delays sleep
  plainly and arrive up to about 1 ms late.
- the proxy itself adds its own latency (about 0.3-0.5 ms per round trip on loopback,
  measured by `workbench bench net`) and cannot reach 10 Gbit/s in Python: presets above
  about 1-2 Gbit/s are caps that are never reached, not rates that are met.
- token buckets start full (`burst_bytes`), so the first `burst_bytes` of a connection or
  after an idle period pass at once, as they would through a real shaper's bucket.
- IPv4/IPv6 by name resolution of the given host; one listening socket only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import trio

log = logging.getLogger(__name__)

Address = tuple[str, int]

EOF: Final = None
"""Queue item that stands for the end of one direction's stream."""

MIN_CHUNK: Final = 4 << 10
MAX_CHUNK: Final = 64 << 10
CHUNK_SECONDS: Final = 0.0005
"""A chunk carries about half a millisecond of the link's rate, within [MIN_CHUNK, MAX_CHUNK]."""

BURST_SECONDS: Final = 0.005
"""Default bucket depth in seconds of the rate: it must exceed the timer's slack (1 ms), or
tokens that accrue while a late timer fires are lost and the rate falls short."""

PRECISE_BELOW_S: Final = 0.025
"""One-way delays shorter than this are timed by yielding in a loop for the last millisecond."""

TIMER_SLACK_S: Final = 0.001

UNLIMITED_NOMINAL_MBPS: Final = 10_000.0
"""Rate used only to size queues and chunks when there is no bandwidth cap."""

CONNECT_TIMEOUT_S: Final = 5.0


# ---------------------------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class LinkPreset:
    """A link from the DADI paper's evaluation: round-trip time and rate."""

    name: str
    rtt_ms: float
    mbps: float
    source: str


PRESETS: Final[dict[str, LinkPreset]] = {
    preset.name: preset
    for preset in (
        LinkPreset(
            "datacenter",
            rtt_ms=0.15,
            mbps=10_000,
            source="paper: physical hosts with >= 10 GbE, registry in the same datacenter; "
            "the RTT is not given, 0.15 ms is assumed (typical for one 10 GbE fabric)",
        ),
        LinkPreset(
            "cloud-vm",
            rtt_ms=0.5,
            mbps=1_500,
            source="paper: public-cloud VMs, vNIC 1.5 Gbit/s sustained (5 Gbit/s burst not "
            "modelled); the RTT is not given, 0.5 ms is assumed (VM to registry, one region)",
        ),
        LinkPreset(
            "cross-region",
            rtt_ms=50,
            mbps=25,
            source="ACI docs/trace-prefetch.md: cross-region pulls at 25 Mbit/s; the RTT is "
            "not given, 50 ms is assumed (regions of one continent)",
        ),
        LinkPreset(
            "high-latency",
            rtt_ms=150,
            mbps=100,
            source="Starlight (NSDI'22): eStargz slower than plain containerd at >= 150 ms "
            "RTT; the 100 Mbit/s rate is assumed",
        ),
    )
}


# ---------------------------------------------------------------------------------------------
# Token bucket


class TokenBucket:
    """Bytes per second with a depth of `burst_bytes`, by reservation.

    `reserve(n, now)` takes `n` tokens at once, letting the level go negative, and returns
    the time at which those bytes may pass: callers that reserve in turn are served in turn
    (first come, first served), which shares a bucket fairly between connections.
    """

    def __init__(self, rate_bytes_per_s: float, burst_bytes: int, now: float) -> None:
        self.rate = rate_bytes_per_s
        self.burst = burst_bytes
        self.level = float(burst_bytes)
        self.stamp = now

    def reserve(self, nbytes: int, now: float) -> float:
        if now > self.stamp:
            self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
            self.stamp = now
        self.level -= nbytes
        if self.level >= 0:
            return now
        return now + -self.level / self.rate


def mbps_to_bytes(mbps: float) -> float:
    """Mbit/s (10^6 bits) to bytes per second."""
    return mbps * 1e6 / 8


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass
class _Counters:
    accepted: int = 0
    active: int = 0
    upstream_failures: int = 0
    resets: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass(frozen=True)
class ProxyStatistics:
    """Counters since the proxy started; bytes are those handed to the other side's socket."""

    accepted: int
    active: int
    upstream_failures: int
    resets: int
    bytes_up: int
    bytes_down: int


class _Reset(Exception):
    """One side of a connection broke; both are aborted."""


# ---------------------------------------------------------------------------------------------
# Proxy


@dataclass
class ShapingProxy:
    """A TCP proxy from `listen` to `upstream` that adds `rtt_ms` and caps the rate at `mbps`.

    Parameters
    ----------
    listen, upstream
        (host, port); port 0 in `listen` picks a free port, reported by `serve`.
    rtt_ms
        Round-trip time added, in milliseconds: each direction delays data by half of it.
    mbps
        Rate in Mbit/s per direction; None or 0 for no cap. Shared by all connections
        when `shared` (the default, as flows share a link), else per connection.
    connection_mbps
        Optional lower cap for each connection and direction, in Mbit/s.
    burst_bytes
        Depth of the token buckets; default 5 ms of the rate, at least 64 KiB.
    chunk_bytes
        Largest read; default about 0.5 ms of the rate, within 4-64 KiB.
    """

    listen: Address = ("127.0.0.1", 0)
    upstream: Address = ("127.0.0.1", 5000)
    rtt_ms: float = 0.0
    mbps: float | None = None
    connection_mbps: float | None = None
    shared: bool = True
    burst_bytes: int | None = None
    chunk_bytes: int | None = None
    _counters: _Counters = field(default_factory=_Counters, init=False, repr=False)
    _shared_buckets: dict[str, TokenBucket] = field(default_factory=dict, init=False, repr=False)
    _upstream_down: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.rtt_ms < 0:
            raise ValueError(f"rtt_ms must be >= 0, got {self.rtt_ms}")
        for name in ("mbps", "connection_mbps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 (0 or None: no cap), got {value}")

        nominal = mbps_to_bytes(self._nominal_mbps())
        if self.chunk_bytes is None:
            self.chunk_bytes = int(min(MAX_CHUNK, max(MIN_CHUNK, nominal * CHUNK_SECONDS)))
        if self.burst_bytes is None:
            self.burst_bytes = int(max(64 << 10, nominal * BURST_SECONDS))

    @classmethod
    def from_preset(cls, name: str, **settings: Any) -> ShapingProxy:
        """A proxy with the RTT and rate of preset `name` (see `PRESETS`)."""
        try:
            preset = PRESETS[name]
        except KeyError:
            known = ", ".join(PRESETS)
            raise ValueError(f"unknown link preset {name!r}; choose one of {known}") from None
        return cls(rtt_ms=preset.rtt_ms, mbps=preset.mbps, **settings)

    @property
    def one_way_s(self) -> float:
        return self.rtt_ms / 2000

    def _nominal_mbps(self) -> float:
        caps = [rate for rate in (self.mbps, self.connection_mbps) if rate]
        return min(caps) if caps else UNLIMITED_NOMINAL_MBPS

    def statistics(self) -> ProxyStatistics:
        return ProxyStatistics(**vars(self._counters))

    def describe(self) -> str:
        rate = f"{self.mbps:g} Mbit/s" if self.mbps else "no rate cap"
        sharing = "shared by all connections" if self.shared else "per connection"
        if self.mbps:
            rate = f"{rate} {sharing}"
        if self.connection_mbps:
            rate += f", at most {self.connection_mbps:g} Mbit/s per connection"
        return f"rtt {self.rtt_ms:g} ms, {rate}"

    # -- serving --------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections until cancelled; reports the bound port through `task_status`."""
        listener = await _bind(self.listen)
        port = listener.socket.getsockname()[1]
        log.info(
            "shaping %s:%d -> %s:%d (%s)", self.listen[0], port, *self.upstream, self.describe()
        )

        async with listener, trio.open_nursery() as nursery:
            task_status.started(port)
            while True:
                client = await listener.accept()
                self._counters.accepted += 1
                nursery.start_soon(self._handle, client)

    @contextmanager
    def run_in_thread(self) -> Iterator[int]:
        """Serve from a trio loop in a background thread; yields the port, stops on exit.

        A failure to start (e.g. the port is in use) is raised here; a crash of the loop
        after it started is logged as an error, and leaving the block still joins the thread.
        """
        handoff: queue.Queue[tuple[int, trio.lowlevel.TrioToken, trio.CancelScope] | BaseException]
        handoff = queue.Queue()
        started = threading.Event()

        async def main() -> None:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    port = await nursery.start(self.serve)
                    handoff.put((port, trio.lowlevel.current_trio_token(), scope))
                    started.set()

        def run() -> None:
            try:
                trio.run(main)
            except BaseException as exc:
                while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                    exc = exc.exceptions[0]
                if started.is_set():
                    log.error("shaping proxy stopped by an error", exc_info=exc)
                else:
                    handoff.put(exc)  # the caller raises it

        thread = threading.Thread(target=run, name="shaping-proxy", daemon=True)
        thread.start()
        outcome = handoff.get()
        if isinstance(outcome, BaseException):
            thread.join()
            raise outcome

        port, token, scope = outcome
        try:
            yield port
        finally:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(scope.cancel, trio_token=token)
            thread.join()

    # -- one connection -------------------------------------------------------------------

    async def _handle(self, client: trio.SocketStream) -> None:
        peer = _peer(client)
        upstream = await self._connect_upstream(peer)
        if upstream is None:
            _abort(client)
            return

        self._counters.active += 1
        reset = False
        try:
            async with trio.open_nursery() as nursery:
                self._start_direction(nursery, client, upstream, "up")
                self._start_direction(nursery, upstream, client, "down")
        except* _Reset:
            reset = True
            self._counters.resets += 1
            log.debug("connection from %s reset; aborting both sides", peer)
        finally:
            self._counters.active -= 1
            for stream in (client, upstream):
                if reset:
                    _abort(stream)
                else:
                    stream.socket.close()
        log.debug("connection from %s closed", peer)

    async def _connect_upstream(self, peer: str) -> trio.SocketStream | None:
        host, port = self.upstream
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                stream = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            self._counters.upstream_failures += 1
            level = logging.DEBUG if self._upstream_down else logging.WARNING
            log.log(
                level,
                "upstream %s:%d unreachable (%s); closing the connection from %s",
                host,
                port,
                exc,
                peer,
            )
            self._upstream_down = True
            return None

        if self._upstream_down:
            log.warning("upstream %s:%d reachable again", host, port)
            self._upstream_down = False
        return stream

    def _start_direction(
        self,
        nursery: trio.Nursery,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        direction: str,
    ) -> None:
        # Enough room for two bandwidth-delay products, so that the delay never throttles.
        rate = mbps_to_bytes(self._nominal_mbps())
        assert self.chunk_bytes is not None
        in_flight = 2 * rate * self.one_way_s / self.chunk_bytes
        capacity = int(min(4096, max(16, math.ceil(in_flight) + 8)))

        send, receive = trio.open_memory_channel[tuple[float, bytes | None]](capacity)
        nursery.start_soon(self._read_side, source, send, self._buckets(direction))
        nursery.start_soon(self._write_side, receive, sink, direction)

    def _buckets(self, direction: str) -> list[TokenBucket]:
        now = trio.current_time()
        assert self.burst_bytes is not None
        buckets = []
        if self.mbps and self.shared:
            if direction not in self._shared_buckets:
                bucket = TokenBucket(mbps_to_bytes(self.mbps), self.burst_bytes, now)
                self._shared_buckets[direction] = bucket
            buckets.append(self._shared_buckets[direction])
        own = [rate for rate in (self.connection_mbps, None if self.shared else self.mbps) if rate]
        if own:
            buckets.append(TokenBucket(mbps_to_bytes(min(own)), self.burst_bytes, now))
        return buckets

    async def _read_side(
        self,
        source: trio.SocketStream,
        queue_in: trio.MemorySendChannel[tuple[float, bytes | None]],
        buckets: list[TokenBucket],
    ) -> None:
        assert self.chunk_bytes is not None
        async with queue_in:
            while True:
                try:
                    chunk = await source.receive_some(self.chunk_bytes)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise _Reset(str(exc)) from exc

                # Pass the buckets first (serialisation on the link), then start the delay.
                if chunk and buckets:
                    now = trio.current_time()
                    allowed = max(bucket.reserve(len(chunk), now) for bucket in buckets)
                    if allowed > now:
                        await trio.sleep_until(allowed)

                await queue_in.send((trio.current_time() + self.one_way_s, chunk or EOF))
                if not chunk:
                    return

    async def _write_side(
        self,
        queue_out: trio.MemoryReceiveChannel[tuple[float, bytes | None]],
        sink: trio.SocketStream,
        direction: str,
    ) -> None:
        precise = 0 < self.one_way_s < PRECISE_BELOW_S
        async with queue_out:
            async for due, chunk in queue_out:
                await _sleep_until(due, precise)
                # Counted before sending: a reset drops the connection, not the count.
                if chunk is not EOF and direction == "up":
                    self._counters.bytes_up += len(chunk)
                elif chunk is not EOF:
                    self._counters.bytes_down += len(chunk)

                try:
                    if chunk is EOF:
                        await sink.send_eof()
                        return
                    await sink.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise _Reset(str(exc)) from exc


async def _sleep_until(deadline: float, precise: bool) -> None:
    """Sleep until `deadline`; if `precise`, beat the timer's 1 ms granularity by yielding."""
    if not precise:
        await trio.sleep_until(deadline)
        return

    if deadline - trio.current_time() > TIMER_SLACK_S:
        await trio.sleep_until(deadline - TIMER_SLACK_S)
    while trio.current_time() < deadline:
        await trio.lowlevel.checkpoint()


async def _bind(address: Address) -> trio.SocketListener:
    host, port = address
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, kind, proto, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(sockaddr)
        sock.listen(256)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


def _abort(stream: trio.SocketStream) -> None:
    """Close with a reset (RST) instead of an orderly FIN, so the peer sees an error."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already closed or never connected: closing is all that is left
    stream.socket.close()
