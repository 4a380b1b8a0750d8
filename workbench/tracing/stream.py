"""Live trace streams: events handed to followers while someone follows, tracing off otherwise.

A `TraceHub` belongs to one process (the FUSE server). `follow()` returns a `Follower`, a
bounded queue of events; while at least one follower exists the hub is the process's recorder
(`workbench.tracing.core.recorder`), so every layer emits; when the last one leaves, the
recorder in force before (None, or the recorder of ``--trace``) is put back and tracing costs
the hot path nothing again. Events still go to that earlier recorder while followed, so a
``--trace`` recording and a live stream coexist.

Threads: layers emit from the FUSE loop, worker threads and the registry loop at once; a
follower's queue is a `collections.deque`, whose append and popleft are atomic under the GIL,
so no lock is taken on the emit path. A follower that does not keep up loses the oldest events
(`Follower.dropped` counts them) rather than growing without bound.

Caveats:
- the hub replaces the module global while followed: a `recording()` block opened meanwhile
  in the same process wins until it ends (see `workbench.tracing.core`);
- a dropped count is approximate when many threads emit at the same instant.
"""

from __future__ import annotations

import collections
import threading
import time

from workbench.tracing import core
from workbench.tracing.core import Event, Recorder

__all__ = ["FOLLOWER_CAPACITY", "Follower", "TraceHub", "event_json"]

FOLLOWER_CAPACITY = 65536
"""Events a follower holds before the oldest are dropped (about 6 MiB)."""


class Follower:
    """The events emitted since it started following, oldest first."""

    def __init__(self, capacity: int = FOLLOWER_CAPACITY) -> None:
        self.queue: collections.deque[Event] = collections.deque(maxlen=capacity)
        self.capacity = capacity
        self.dropped = 0
        self.started_ns = time.perf_counter_ns()

    def push(self, event: Event) -> None:
        if len(self.queue) >= self.capacity:
            self.dropped += 1
        self.queue.append(event)

    def drain(self) -> list[Event]:
        """Take every queued event."""
        events = []
        queue = self.queue
        while queue:
            events.append(queue.popleft())
        return events


class _FanOut:
    """Stands in for a recorder's event list: each appended event goes to the recorder below
    (if any) and to every follower."""

    def __init__(self, hub: TraceHub, below: Recorder | None) -> None:
        self.hub = hub
        self.below = below

    def append(self, event: Event) -> None:
        if self.below is not None:
            self.below.events.append(event)
        for follower in self.hub.followers:
            follower.push(event)


class _HubRecorder(Recorder):
    """A `Recorder` whose `emit` (inherited) hands each event on instead of keeping it."""

    def __init__(self, hub: TraceHub, below: Recorder | None) -> None:
        super().__init__()
        self.below = below
        self.events = _FanOut(hub, below)  # type: ignore[assignment]


class TraceHub:
    """Hands every event to its followers; installed as the recorder only while followed."""

    def __init__(self) -> None:
        self.followers: tuple[Follower, ...] = ()
        self._lock = threading.Lock()
        self._installed: _HubRecorder | None = None

    def follow(self, capacity: int = FOLLOWER_CAPACITY) -> Follower:
        """A new follower; tracing is switched on if it was off."""
        follower = Follower(capacity)
        with self._lock:
            self.followers = (*self.followers, follower)
            if self._installed is None:
                self._installed = _HubRecorder(self, core.recorder)
                core.recorder = self._installed
        return follower

    def unfollow(self, follower: Follower) -> None:
        """Stop handing events to `follower`; the last one switches tracing back off."""
        with self._lock:
            self.followers = tuple(other for other in self.followers if other is not follower)
            if not self.followers and self._installed is not None:
                if core.recorder is self._installed:
                    core.recorder = self._installed.below
                self._installed = None

    @property
    def active(self) -> bool:
        return self._installed is not None


def event_json(event: Event, origin_ns: int) -> dict[str, object]:
    """One event as a JSON-ready dict; times in microseconds from `origin_ns`."""
    return {
        "ts_us": round((event.start_ns - origin_ns) / 1e3, 3),
        "dur_us": round(event.duration_ns / 1e3, 3),
        "layer": event.layer,
        "op": event.op,
        "target": event.target,
        "offset": event.offset,
        "length": event.length,
        "nbytes": event.nbytes,
        "hit": event.hit,
        "request": event.request_id,
    }
