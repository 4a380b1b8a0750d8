"""Reading a trace back: per-request tables and the path of one request through the layers.

A trace (`Recorder.to_parquet`, ``workbench mount --trace``) is one row per event. What a
reader asks of it, in order:

    summary(frame)              per layer and operation: events, bytes, time, hits, misses
    request_table(frame)        one row per top-level request (a FUSE read, a demo read):
                                its kind and range, duration, and what it cost below it
    render_request(frame, id)   the request as a tree: the kernel request, then the image,
                                LSMT segments, ZFile blocks, cache reads and registry fetches
                                it caused, indented by layer, in the order they started
    render_report(frame)        all three as text, for the ``workbench trace`` command

Events are emitted when an operation ends, with its start time; sorting a request's events by
start time puts each caller before the calls it made, so the indentation by layer reads as a
call tree.

Caveats:
- the layer depth is a fixed order (`LAYER_DEPTH`), not a recorded parent: two reads of the
  same layer inside one request show side by side, not nested;
- events without a request (id 0: work outside any request, such as a background download)
  show only in the summary.
"""

from __future__ import annotations

import os
import re

import pandas as pd

__all__ = [
    "LAYER_DEPTH",
    "load",
    "render_report",
    "render_request",
    "request_table",
    "short_target",
    "summary",
]

LAYER_DEPTH = {
    "request": 0,
    "device": 1,
    "image": 2,
    "lsmt": 3,
    "zfile": 4,
    "blob": 5,
    "cache": 5,
    "registry": 6,
}
"""How far below the request each layer sits; unknown layers go one below the deepest."""

_UNKNOWN_DEPTH = max(LAYER_DEPTH.values()) + 1

_DIGEST = re.compile(r"(sha256:)([0-9a-f]{64})")


def load(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A trace written by `Recorder.to_parquet`."""
    return pd.read_parquet(path)


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Events, bytes, total and mean time, cache hits and misses per layer and operation."""
    hits = frame["hit"].astype("boolean")
    table = (
        frame.assign(
            hits=hits.fillna(False).astype(int),
            misses=(~hits).fillna(False).astype(int),
        )
        .groupby(["layer", "op"], observed=True)
        .agg(
            events=("nbytes", "size"),
            nbytes=("nbytes", "sum"),
            total_ms=("duration_ns", lambda ns: ns.sum() / 1e6),
            mean_us=("duration_ns", lambda ns: ns.mean() / 1e3),
            hits=("hits", "sum"),
            misses=("misses", "sum"),
        )
    )
    order = [LAYER_DEPTH.get(layer, _UNKNOWN_DEPTH) for layer, _op in table.index]
    return table.iloc[sorted(range(len(table)), key=order.__getitem__)]


def request_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per request: kind, range, duration and what it caused below it.

    Columns: kind, offset, length, duration_us, events (below the request), segments (LSMT
    reads), blocks (ZFile block events), cache_hits, cache_misses, fetched (registry bytes).
    Indexed by request id, in the order the requests started.
    """
    requests = frame[frame.layer == "request"].set_index("request_id")
    below = frame[(frame.layer != "request") & (frame.request_id != 0)]
    cache = below[below.layer == "cache"]
    hits = cache["hit"].astype("boolean")

    def count(mask: pd.Series) -> pd.Series:
        return below[mask].groupby("request_id").size()

    table = pd.DataFrame(
        {
            "kind": requests["op"].astype(str),
            "offset": requests["offset"],
            "length": requests["length"],
            "duration_us": requests["duration_ns"] / 1e3,
            "start_ns": requests["start_ns"],
        }
    )
    extra = {
        "events": below.groupby("request_id").size(),
        "segments": count((below.layer == "lsmt") & (below.op == "read")),
        "blocks": count(below.layer == "zfile"),
        "cache_hits": cache[hits.fillna(False)].groupby("request_id").size(),
        "cache_misses": cache[(~hits).fillna(False)].groupby("request_id").size(),
        "fetched": below[below.layer == "registry"].groupby("request_id")["nbytes"].sum(),
    }
    for name, values in extra.items():
        table[name] = values.reindex(table.index).fillna(0).astype("int64")
    return table.sort_values("start_ns").drop(columns="start_ns")


def render_request(frame: pd.DataFrame, request_id: int, max_events: int = 60) -> list[str]:
    """The events of one request as indented lines, the request first; at most `max_events`."""
    events = frame[frame.request_id == request_id]
    if events.empty:
        raise KeyError(f"no events of request {request_id} in the trace")
    ordered = events.assign(
        depth=[LAYER_DEPTH.get(str(layer), _UNKNOWN_DEPTH) for layer in events.layer]
    ).sort_values(["start_ns", "depth"])

    lines = [_event_line(row, row.depth) for row in ordered.head(max_events).itertuples()]
    if len(ordered) > max_events:
        lines.append(f"  ... {len(ordered) - max_events} more events")
    return lines


def short_target(target: str) -> str:
    """A target as a tree line shows it: digests cut to 12 hex digits, paths to their name."""
    target = _DIGEST.sub(lambda match: match.group(1) + match.group(2)[:12], target)
    if target.startswith("/"):
        return os.path.basename(target)
    return target


def _event_line(row: object, depth: int) -> str:
    layer, op, target = str(row.layer), str(row.op), str(row.target)  # type: ignore[attr-defined]
    where = f"{short_target(target)} " if target else ""
    span = f"[{row.offset}, +{row.length})" if row.length else ""  # type: ignore[attr-defined]
    took = _duration(int(row.duration_ns))  # type: ignore[attr-defined]
    moved = f" {row.nbytes} B" if row.nbytes else ""  # type: ignore[attr-defined]
    hit = row.hit  # type: ignore[attr-defined]
    verdict = "" if pd.isna(hit) else (" hit" if hit else " MISS")
    return f"{'  ' * depth}{layer} {op} {where}{span} {took}{moved}{verdict}".rstrip()


def _duration(ns: int) -> str:
    if ns >= 1_000_000:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e3:.1f} us"


def render_report(
    frame: pd.DataFrame,
    request_id: int | None = None,
    slowest: int = 3,
    kind: str | None = None,
) -> str:
    """The summary, the requests by kind, and request trees, as text.

    With `request_id` only that request's tree is shown; else the `slowest` requests (of
    `kind`, if given).
    """
    if request_id is not None:
        return "\n".join(render_request(frame, request_id))

    table = request_table(frame)
    if kind is not None:
        table = table[table.kind == kind]
    parts = [
        f"{len(frame)} events, {len(table)} requests",
        "",
        "per layer and operation:",
        summary(frame).to_string(float_format=lambda value: f"{value:.1f}"),
    ]
    if not table.empty:
        kinds = table.groupby("kind").agg(
            requests=("duration_us", "size"),
            median_us=("duration_us", "median"),
            p99_us=("duration_us", lambda us: us.quantile(0.99)),
            segments=("segments", "sum"),
            blocks=("blocks", "sum"),
            cache_misses=("cache_misses", "sum"),
            fetched=("fetched", "sum"),
        )
        parts += ["", "requests by kind:", kinds.to_string(float_format=lambda v: f"{v:.1f}")]
        for slow_id in table.nlargest(slowest, "duration_us").index:
            parts += ["", f"request {slow_id} (one of the slowest):"]
            parts += render_request(frame, int(slow_id))
    return "\n".join(parts)
