"""A trace as Chrome trace-event JSON, the format ui.perfetto.dev (and chrome://tracing) opens.

What the file holds (the "JSON Array/Object Format" of the Trace Event Format)::

    {"traceEvents": [...], "displayTimeUnit": "ns", "otherData": {...}}

- one process, ``workbench``, and one track (a "thread") per layer of the stack, in stack
  order: request, device, image, lsmt, zfile, cache/blob, registry (`LAYER_DEPTH`);
- one complete event (``"ph": "X"``) per trace event: ``name`` = ``layer op`` (``zfile
  block``), ``ts`` and ``dur`` in microseconds from the start of the recording, ``args`` =
  the request id, target, offset, length, bytes moved and hit;
- slices on one track must nest (a slice inside another, or after it): a layer's events that
  overlap without nesting (two requests served at once) go on further tracks of the same
  layer, named ``lsmt #2``, ``lsmt #3``, ...; so every track is a proper call stack and a
  request's image read shows its segment reads nested under it;
- a flow arrow (``"ph": "s"``/``"f"``) from each request slice to the first event of every
  other layer it caused, so clicking a kernel read leads to its fetches.

Caveats:
- the trace records when each operation started and how long it took, not its caller: nesting
  on a track is by time only, so two unrelated events that happen to nest are shown nested;
- events without a request (id 0, background downloads and readahead) have no flow arrows.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pandas as pd

from workbench.tracing.report import LAYER_DEPTH

__all__ = ["PROCESS_ID", "to_perfetto", "write_perfetto"]

PROCESS_ID = 1
_UNKNOWN_DEPTH = max(LAYER_DEPTH.values()) + 1


def to_perfetto(frame: pd.DataFrame) -> dict[str, Any]:
    """The trace-event JSON object of a trace (`Recorder.to_dataframe`, a Parquet trace)."""
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": PROCESS_ID, "args": {"name": "workbench"}}
    ]
    frame = frame.sort_values(["start_ns", "duration_ns"], ascending=[True, False])
    tracks: dict[tuple[str, int], int] = {}
    first_per_layer: dict[tuple[int, str], dict[str, Any]] = {}
    request_slices: dict[int, dict[str, Any]] = {}

    for layer, rows in frame.groupby("layer", observed=True, sort=False):
        lanes = _assign_lanes(rows["start_ns"].to_numpy(), rows["duration_ns"].to_numpy())
        for row, lane in zip(rows.itertuples(index=False), lanes, strict=True):
            tid = tracks.setdefault((str(layer), lane), len(tracks) + 1)
            slice_ = _slice(row, tid)
            events.append(slice_)
            request_id = int(row.request_id)
            if request_id and row.layer == "request":
                request_slices.setdefault(request_id, slice_)
            elif request_id:
                first_per_layer.setdefault((request_id, str(layer)), slice_)

    events += _track_names(tracks)
    events += _flows(request_slices, first_per_layer)
    return {
        "traceEvents": events,
        "displayTimeUnit": "ns",
        "otherData": {"source": "workbench trace", "events": len(frame)},
    }


def write_perfetto(frame: pd.DataFrame, path: str | os.PathLike[str]) -> int:
    """Write `to_perfetto(frame)` to `path`; returns the number of slices written."""
    document = to_perfetto(frame)
    with open(path, "w") as out:
        json.dump(document, out, separators=(",", ":"))
    return sum(1 for event in document["traceEvents"] if event["ph"] == "X")


def _assign_lanes(starts: Any, durations: Any) -> list[int]:
    """A lane per event such that the events of one lane nest or follow each other.

    Events come sorted by start, longest first. Each lane keeps a stack of the slices open at
    the current time; an event joins the first lane whose innermost open slice (after closing
    those that ended) contains it, or which has none open.
    """
    lanes: list[list[int]] = []  # per lane, the end times of its open slices, outermost first
    chosen = []
    for start, duration in zip(starts.tolist(), durations.tolist(), strict=True):
        end = start + max(0, duration)
        for number, stack in enumerate(lanes):
            while stack and stack[-1] <= start:
                stack.pop()
            if not stack or end <= stack[-1]:
                stack.append(end)
                chosen.append(number)
                break
        else:
            lanes.append([end])
            chosen.append(len(lanes) - 1)
    return chosen


def _slice(row: Any, tid: int) -> dict[str, Any]:
    hit = None if pd.isna(row.hit) else bool(row.hit)
    return {
        "ph": "X",
        "name": f"{row.layer} {row.op}",
        "cat": str(row.layer),
        "pid": PROCESS_ID,
        "tid": tid,
        "ts": row.start_ns / 1e3,
        "dur": max(0, row.duration_ns) / 1e3,
        "args": {
            "request": int(row.request_id),
            "target": str(row.target),
            "offset": int(row.offset),
            "length": int(row.length),
            "nbytes": int(row.nbytes),
            "hit": hit,
        },
    }


def _track_names(tracks: dict[tuple[str, int], int]) -> list[dict[str, Any]]:
    named = []
    for (layer, lane), tid in tracks.items():
        name = layer if lane == 0 else f"{layer} #{lane + 1}"
        depth = LAYER_DEPTH.get(layer, _UNKNOWN_DEPTH)
        named.append(
            {
                "ph": "M",
                "name": "thread_name",
                "pid": PROCESS_ID,
                "tid": tid,
                "args": {"name": name},
            }
        )
        named.append(
            {
                "ph": "M",
                "name": "thread_sort_index",
                "pid": PROCESS_ID,
                "tid": tid,
                "args": {"sort_index": depth * 100 + lane},
            }
        )
    return named


def _flows(
    requests: dict[int, dict[str, Any]], firsts: dict[tuple[int, str], dict[str, Any]]
) -> list[dict[str, Any]]:
    flows = []
    for number, ((request_id, _layer), target) in enumerate(firsts.items(), start=1):
        source = requests.get(request_id)
        if source is None:
            continue
        common = {"name": "caused", "cat": "flow", "pid": PROCESS_ID, "id": number}
        flows.append({**common, "ph": "s", "tid": source["tid"], "ts": source["ts"]})
        flows.append({**common, "ph": "f", "bp": "e", "tid": target["tid"], "ts": target["ts"]})
    return flows
