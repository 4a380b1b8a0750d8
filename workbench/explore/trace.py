"""Traces for notebooks: the events of any block of code as DataFrames, with named views.

`tracing()` is `workbench.tracing.recording()` handing back a `Trace` instead of the bare
`Recorder`; `Trace.load` reads a trace file that ``workbench mount --trace`` wrote. A
`Trace` answers the questions a reader asks of a trace, each as a DataFrame:

    trace.events        every event (columns `workbench.tracing.EVENT_COLUMNS`, times in ns
                        from the start of the recording)
    trace.segments      ``image``/``segment``: which layer served which range of the disk
    trace.served_by()   bytes of the disk each layer served
    trace.blocks        ``zfile``/``block``: the ZFile blocks decompressed
    trace.cache         ``cache``/``read``: cache reads, with hit
    trace.fetches       ``registry`` events: the HTTP requests, with bytes received
    trace.requests()    one row per top-level request (`workbench.tracing.report`)
    trace.summary()     per layer and operation: events, bytes, time, hits, misses
    trace.tree(id)      one request as a call tree (text)

`TracedRead` is the trace of one read plus its data (`Image.read`).

Caveats:
- a recording is process-wide (see `workbench.tracing.core`): work of other threads while
  the block runs is in the trace too;
- while the block runs, each accessor converts the events recorded so far; after it ends
  the table is converted once and kept.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd

from workbench.tracing import core, report

__all__ = ["Trace", "TracedRead", "tracing"]

log = logging.getLogger(__name__)


class Trace:
    """The events of a recording (live or finished) or of a trace file, as DataFrames."""

    def __init__(self, source: core.Recorder | pd.DataFrame, name: str = "trace") -> None:
        self.name = name
        self._recorder = source if isinstance(source, core.Recorder) else None
        self._frame = None if isinstance(source, core.Recorder) else source
        self.active = self._recorder is not None and core.recorder is self._recorder

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Trace:
        """A trace file (`Recorder.to_parquet`, ``workbench mount --trace``)."""
        return cls(report.load(path), name=os.path.basename(os.fspath(path)))

    def _finish(self) -> None:
        """Convert the events once, now that no more will come."""
        self.active = False
        self._frame = self.events

    # All events ----------------------------------------------------------------------------

    @property
    def events(self) -> pd.DataFrame:
        """Every event, one row each, in the order they ended."""
        if self._frame is not None:
            return self._frame
        assert self._recorder is not None
        return self._recorder.to_dataframe()

    def __len__(self) -> int:
        if self._frame is not None:
            return len(self._frame)
        assert self._recorder is not None
        return len(self._recorder)

    def layer(self, layer: str, op: str | None = None) -> pd.DataFrame:
        """The events of one layer (and operation), sorted by start time, index reset."""
        frame = self.events
        mask = frame.layer == layer
        if op is not None:
            mask &= frame.op == op
        return frame[mask].sort_values("start_ns", kind="stable").reset_index(drop=True)

    # Named views ---------------------------------------------------------------------------

    @property
    def segments(self) -> pd.DataFrame:
        """Runs of the disk served by one layer: target = layer, offset/length on the disk."""
        return self.layer("image", "segment")

    @property
    def lsmt(self) -> pd.DataFrame:
        """Reads of layer files (offsets in the unwrapped LSMT file of each layer)."""
        return self.layer("lsmt", "read")

    @property
    def blocks(self) -> pd.DataFrame:
        """ZFile blocks decompressed: offset/length of the compressed block, nbytes out."""
        return self.layer("zfile", "block")

    @property
    def cache(self) -> pd.DataFrame:
        """Block cache reads (hit or miss) and fetches."""
        return self.layer("cache")

    @property
    def fetches(self) -> pd.DataFrame:
        """Registry requests (GET with a range, HEAD, token): nbytes is what came back."""
        return self.layer("registry")

    def served_by(self) -> pd.DataFrame:
        """Per layer: runs and bytes of the disk it served (zeroed runs count as 0 bytes read)."""
        segments = self.segments
        table = (
            segments.assign(target=segments.target.astype(str).map(report.short_target))
            .groupby("target")
            .agg(
                runs=("length", "size"), disk_bytes=("length", "sum"), read_bytes=("nbytes", "sum")
            )
        )
        table.index.name = "layer"
        return table.sort_values("disk_bytes", ascending=False)

    def fetched_bytes(self) -> int:
        """Bytes received from registries in the trace."""
        fetches = self.fetches
        return int(fetches.nbytes.sum()) if len(fetches) else 0

    # Reports (workbench.tracing.report) ----------------------------------------------------

    def summary(self) -> pd.DataFrame:
        """Events, bytes, total and mean time, hits and misses per layer and operation."""
        return report.summary(self.events)

    def requests(self) -> pd.DataFrame:
        """One row per top-level request: kind, range, duration, what it caused below it."""
        return report.request_table(self.events)

    def tree(self, request_id: int | None = None, max_events: int = 60) -> str:
        """One request as an indented call tree; the slowest request when none is named."""
        if request_id is None:
            requests = self.requests()
            if requests.empty:
                raise KeyError("the trace holds no request; wrap the work in tracing.request()")
            request_id = int(requests.duration_us.idxmax())
        return "\n".join(report.render_request(self.events, request_id, max_events))

    def to_parquet(self, path: str | os.PathLike[str]) -> None:
        """Write the events to a Parquet file (`Trace.load` reads it back)."""
        self.events.to_parquet(path, index=False)

    # Display -------------------------------------------------------------------------------

    def _fields(self) -> dict[str, object]:
        from workbench.explore.html import human_bytes

        frame = self.events
        span_ns = int((frame.start_ns + frame.duration_ns).max() - frame.start_ns.min())
        return {
            "events": len(frame),
            "layers": ", ".join(sorted(str(layer) for layer in frame.layer.unique())),
            "span": f"{span_ns / 1e6:.2f} ms",
            "registry fetches": f"{len(self.fetches)} ({human_bytes(self.fetched_bytes())})",
        }

    def __repr__(self) -> str:
        if len(self) == 0:
            return f"Trace({self.name!r}, no events)"
        fields = ", ".join(f"{key} {value}" for key, value in self._fields().items())
        return f"Trace({self.name!r}: {fields})"

    def _repr_html_(self) -> str:
        from workbench.explore.html import card

        if len(self) == 0:
            return card(f"Trace {self.name}", {"events": 0})
        return card(f"Trace {self.name}", self._fields(), self.summary(), max_rows=20)


class TracedRead(Trace):
    """One read of an image: its `data` and the trace of everything it caused."""

    def __init__(
        self, data: bytes, offset: int, length: int, recorder: core.Recorder, name: str
    ) -> None:
        super().__init__(recorder, name=name)
        self.data = data
        self.offset = offset
        self.length = length
        self._finish()

    def _fields(self) -> dict[str, object]:
        fields = super()._fields()
        segments = self.segments
        return {
            "read": f"[{self.offset}, +{self.length}) -> {len(self.data)} bytes",
            "layers": ", ".join(self.served_by().index) or "none (unmapped)",
            "segments": len(segments),
            "zfile blocks": len(self.blocks),
            "registry fetches": fields["registry fetches"],
            "took": fields["span"],
        }

    def __repr__(self) -> str:
        fields = "; ".join(f"{key} {value}" for key, value in self._fields().items())
        return f"TracedRead({fields})"


@contextmanager
def tracing(name: str = "trace") -> Iterator[Trace]:
    """Record every event of the block; yields a `Trace` (readable inside and after)."""
    with core.recording() as recorder:
        trace = Trace(recorder, name=name)
        try:
            yield trace
        finally:
            trace._finish()
