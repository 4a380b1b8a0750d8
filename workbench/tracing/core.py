"""One event model for every layer of the stack, and the in-memory recorder.

An event says that one layer did one operation on a range: which layer (`lsmt`, `zfile`,
`blob`, ...), which operation (`read`, `write`, `trim`, `decompress`, ...), on which target
(a file or blob name), the range in that layer's own offsets, when it started and how long it
took, how many bytes it moved, whether it was a cache hit, and the id of the top-level request
that caused it. Events of one device request share that id, so a trace shows a kernel read
fanning out into segments, blocks and fetches.

Cost. Layers read the module global `recorder` once per operation; when no recording is
active it is `None` and the layer skips everything else, so tracing off costs one global load
and one comparison per operation (the benchmark `workbench bench formats` measures it). When
recording, an event is one tuple appended to a list; `list.append` is atomic under the GIL,
so threads may emit concurrently.

Caveats:
- a recording is process-wide: two overlapping `recording()` blocks see each other's
  events; the inner one wins until it ends, then the outer one is restored;
- request ids live in a context variable, so they follow trio tasks and `trio.to_thread`
  calls (which copy the context) but not plain `threading.Thread`s started by hand.
"""

from __future__ import annotations

import contextvars
import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "EVENT_COLUMNS",
    "Event",
    "Recorder",
    "current_request",
    "recorder",
    "recording",
    "request",
]

# The recorder in force, or None. Hot paths read this global and nothing else when it is None.
recorder: Recorder | None = None

_request_id: contextvars.ContextVar[int] = contextvars.ContextVar("request_id", default=0)
_request_ids = itertools.count(1)

EVENT_COLUMNS = (
    "layer",
    "op",
    "target",
    "offset",
    "length",
    "start_ns",
    "duration_ns",
    "nbytes",
    "hit",
    "request_id",
)


class Event(NamedTuple):
    """One operation of one layer; see the module docstring for what each field means."""

    layer: str
    op: str
    target: str
    offset: int
    length: int
    start_ns: int
    duration_ns: int
    nbytes: int
    hit: bool | None
    request_id: int


class Recorder:
    """Collects events in memory and exports them as a DataFrame or a Parquet file."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.started_ns = time.perf_counter_ns()

    def emit(
        self,
        layer: str,
        op: str,
        target: str,
        offset: int,
        length: int,
        start_ns: int,
        nbytes: int = 0,
        hit: bool | None = None,
    ) -> None:
        """Record an operation that started at `start_ns` (perf_counter_ns) and ends now."""
        end_ns = time.perf_counter_ns()
        self.events.append(
            Event(
                layer,
                op,
                target,
                offset,
                length,
                start_ns,
                end_ns - start_ns,
                nbytes,
                hit,
                _request_id.get(),
            )
        )

    def __len__(self) -> int:
        return len(self.events)

    def __repr__(self) -> str:
        layers = sorted({event.layer for event in self.events})
        return f"Recorder({len(self.events)} events, layers {', '.join(layers) or 'none'})"

    def _repr_html_(self) -> str:
        from workbench.explore.html import card

        table = self.summary() if self.events else None
        return card(f"Recorder: {len(self.events)} events", {}, table, max_rows=20)

    def to_dataframe(self) -> pd.DataFrame:
        """The events as a tidy table, one row per event, times relative to the recording.

        Columns: those of `Event`, with `start_ns` counted from the start of the recording
        and `hit` as a nullable boolean (missing where a layer has no notion of a hit).
        """
        import pandas as pd

        frame = pd.DataFrame.from_records(self.events, columns=list(EVENT_COLUMNS))
        frame["start_ns"] -= self.started_ns
        for column in ("layer", "op", "target"):
            frame[column] = frame[column].astype("category")
        frame["hit"] = frame["hit"].astype("boolean")
        return frame

    def to_parquet(self, path: str) -> None:
        """Write the events to a Parquet file (via pyarrow) for notebooks and later runs."""
        self.to_dataframe().to_parquet(path, index=False)

    def summary(self) -> pd.DataFrame:
        """Count, bytes and total time per layer and operation."""
        frame = self.to_dataframe()
        grouped = frame.groupby(["layer", "op"], observed=True)
        return grouped.agg(
            events=("nbytes", "size"),
            nbytes=("nbytes", "sum"),
            total_ms=("duration_ns", lambda ns: ns.sum() / 1e6),
        )


@contextmanager
def recording() -> Iterator[Recorder]:
    """Record every event emitted inside the block; yields the `Recorder`."""
    global recorder

    previous = recorder
    recorder = Recorder()
    try:
        yield recorder
    finally:
        recorder = previous


@contextmanager
def request(
    kind: str = "request", target: str = "", offset: int = 0, length: int = 0
) -> Iterator[int]:
    """Open a top-level request: every event emitted inside it carries the new id.

    `kind` is recorded as a `request` event of layer `request` (with the `target`, `offset`
    and `length` the request names, if any), so a trace also holds the request itself with
    its duration.
    """
    request_id = next(_request_ids)
    token = _request_id.set(request_id)
    start_ns = time.perf_counter_ns()
    try:
        yield request_id
    finally:
        active = recorder
        if active is not None:
            active.emit("request", kind, target, offset, length, start_ns)
        _request_id.reset(token)


def current_request() -> int:
    """The id of the request being served, 0 outside any request."""
    return _request_id.get()
