"""Figures of an image and its traces (matplotlib), for notebooks and reports.

    segment_map(image)          which layer serves which part of the disk: one row per layer
                                (its own index), and the merged view underneath
    access_pattern(trace)       where a workload read over time: offset against time, one dot
                                per read, misses and registry fetches marked
    cache_filling(trace)        bytes fetched into the block cache over time (and the
                                fraction of the image, given its size)
    block_sizes(frame)          the stored size of each ZFile block (`Image.zfile_blocks`)
    presence_map(blob_cache)    which blocks of a blob the block cache holds (`Image.blob_cache`)

Each takes an optional `ax` and returns the matplotlib `Figure` it drew on, so a notebook
shows it and a script saves it (``fig.savefig``). Axes are in MiB of the disk and in
milliseconds from the start of the trace.

Caveats:
- a segment map draws one rectangle per index entry; images with hundreds of thousands of
  entries draw slowly (pass `offset`/`length` to look at a part);
- pyplot is imported when a function runs, never at import, so the package loads without
  a display; notebooks pick their backend as usual, tests use Agg.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from workbench.explore.html import human_bytes
from workbench.tracing import report

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from workbench.explore.cache import BlobCache
    from workbench.explore.image import Image
    from workbench.explore.trace import Trace

__all__ = ["access_pattern", "block_sizes", "cache_filling", "presence_map", "segment_map"]

MiB = float(1 << 20)

_KIND_STYLE = {"data": {}, "zeroed": {"hatch": "////", "alpha": 0.5}}


def _axes(ax: Axes | None, size: tuple[float, float] = (9, 3)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=size, layout="constrained")
    return figure, ax


def _colours(count: int) -> list:
    import matplotlib.pyplot as plt

    cycle = plt.get_cmap("tab10")
    return [cycle(i % 10) for i in range(count)]


def segment_map(
    image: Image, offset: int = 0, length: int | None = None, ax: Axes | None = None
) -> Figure:
    """One row per layer (bottom row: the merged view), coloured by the layer that serves.

    Zeroed ranges (trims) are hatched; white is unmapped (reads as zeros).
    """
    layers = image.stack.layers
    figure, ax = _axes(ax, (9, 0.6 * (len(layers) + 1) + 1.2))
    colours = _colours(len(layers))
    by_name = {layer.name: colour for layer, colour in zip(layers, colours, strict=True)}
    end = image.size if length is None else min(image.size, offset + length)

    def draw(row: int, frame: pd.DataFrame, colour_of) -> None:
        frame = frame[(frame.offset < end) & (frame.offset + frame.length > offset)]
        for kind, style in _KIND_STYLE.items():
            part = frame[frame.kind == kind]
            if part.empty:
                continue
            starts = np.maximum(part.offset.to_numpy(), offset)
            stops = np.minimum((part.offset + part.length).to_numpy(), end)
            spans = list(zip(starts / MiB, (stops - starts) / MiB, strict=True))
            ax.broken_barh(
                spans, (row - 0.4, 0.8), facecolors=colour_of(part), edgecolor="none", **style
            )

    labels = []
    for row, layer in enumerate(layers):
        frame = image.layer_index(layer)
        draw(row + 1, frame, lambda part, c=by_name[layer.name]: [c] * len(part))
        kind = "upper" if layer is image.stack.upper else f"tag {image.tag_of(layer)}"
        labels.append(f"{report.short_target(layer.name)} ({kind})")

    merged = image.segments(offset, end - offset)
    merged = merged[merged.kind != "unmapped"]
    draw(0, merged, lambda part: [by_name[name] for name in part.layer])

    ax.set_yticks(range(len(layers) + 1), ["merged", *labels])
    ax.set_xlim(offset / MiB, end / MiB)
    ax.set_ylim(-0.6, len(layers) + 0.6)
    ax.set_xlabel("offset on the virtual disk (MiB)")
    ax.set_title("segment map: which layer serves which part of the disk")
    return figure


def access_pattern(
    trace: Trace,
    layer: str = "image",
    op: str | None = "read",
    ax: Axes | None = None,
    fetches: bool = True,
) -> Figure:
    """Offset against time of every `layer`/`op` event; registry fetches as marks on top.

    The default shows the disk reads (``image``/``read``); for a mount's trace,
    ``layer="request", op="fuse-read"`` shows the kernel's requests. Events with a hit flag
    (``cache``) are coloured hit/miss.
    """
    figure, ax = _axes(ax, (9, 4))
    events = trace.layer(layer, op)
    if events.empty:
        raise ValueError(
            f"the trace has no {layer}/{op or '*'} events; its layers are "
            f"{', '.join(sorted(map(str, trace.events.layer.unique())))}"
        )
    start_ms = events.start_ns / 1e6
    middle = (events.offset + events.length / 2) / MiB
    if events.hit.notna().any():
        hit = events.hit.fillna(False).astype(bool)
        ax.scatter(start_ms[hit], middle[hit], s=8, label="hit", color="tab:green")
        ax.scatter(start_ms[~hit], middle[~hit], s=8, label="miss", color="tab:red")
    else:
        ax.scatter(start_ms, middle, s=8, label=f"{layer} {op or ''}".strip())
    ax.set_xlabel("time since the trace started (ms)")
    disk = layer in ("request", "device", "image")
    ax.set_ylabel("offset on the disk (MiB)" if disk else f"offset in the {layer} file (MiB)")
    ax.set_title(f"access pattern: {len(events)} {layer} {op or 'events'}")

    registry = trace.fetches
    if fetches and len(registry) and layer != "registry":
        for time_ms in registry.start_ns / 1e6:
            ax.axvline(time_ms, color="tab:orange", alpha=0.15, linewidth=1)
        ax.plot([], [], color="tab:orange", alpha=0.5, label=f"{len(registry)} registry fetches")
    ax.legend(loc="best", fontsize="small")
    return figure


def cache_filling(trace: Trace, total_bytes: int | None = None, ax: Axes | None = None) -> Figure:
    """Cumulative bytes fetched from the registry over time (``cache``/``fetch`` events, or
    ``registry`` events when the cache is off); with `total_bytes` (the blob or image size),
    also as a percentage of it on the right."""
    figure, ax = _axes(ax, (9, 3.5))
    fetched = trace.layer("cache", "fetch")
    if fetched.empty:
        fetched = trace.layer("registry")
    ends_ms = (fetched.start_ns + fetched.duration_ns).to_numpy() / 1e6
    order = np.argsort(ends_ms, kind="stable")
    ends_ms = np.concatenate([[0.0], ends_ms[order]])
    filled = np.concatenate([[0], np.cumsum(fetched.nbytes.to_numpy()[order])]) / MiB
    ax.step(ends_ms, filled, where="post", color="tab:blue")
    ax.set_xlabel("time since the trace started (ms)")
    ax.set_ylabel("fetched into the cache (MiB)")
    ax.set_title(f"cache filling: {filled[-1]:.2f} MiB in {len(fetched)} fetches")
    if total_bytes:
        share = ax.secondary_yaxis(
            "right",
            functions=(
                lambda mib: 100 * mib * MiB / total_bytes,
                lambda pc: pc * total_bytes / MiB / 100,
            ),
        )
        share.set_ylabel(f"% of {human_bytes(total_bytes)}")
    return figure


def block_sizes(blocks: pd.DataFrame, ax: Axes | None = None) -> Figure:
    """The stored size of each ZFile block along the file (`Image.zfile_blocks`)."""
    figure, ax = _axes(ax, (9, 3))
    ax.bar(blocks.block, blocks.stored_length, width=1.0, color="tab:blue")
    full = int(blocks.offset.iloc[1] - blocks.offset.iloc[0]) if len(blocks) > 1 else None
    if full:
        ax.axhline(full, color="tab:red", linestyle="--", label=f"uncompressed block ({full} B)")
        ax.legend(loc="best", fontsize="small")
    ax.set_xlabel("block")
    ax.set_ylabel("stored bytes")
    ax.set_title(
        f"ZFile: {len(blocks)} blocks, {int(blocks.stored_length.sum()) / MiB:.2f} MiB stored"
    )
    return figure


def presence_map(cache: BlobCache, ax: Axes | None = None) -> Figure:
    """The blocks of a cached blob along the blob: filled where present, empty where not."""
    figure, ax = _axes(ax, (9, 1.6))
    blocks = cache.blocks()
    present = blocks[blocks.present]
    spans = list(zip(present.offset / MiB, present.length / MiB, strict=True))
    ax.broken_barh(spans, (0, 1), facecolors="tab:blue", edgecolor="none")
    ax.set_xlim(0, cache.blob.size / MiB)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("offset in the blob (MiB)")
    ax.set_title(
        f"{cache.name}: {len(present)} of {len(blocks)} blocks present "
        f"({100 * cache.fraction_present:.0f}%)"
    )
    return figure
