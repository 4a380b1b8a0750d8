"""The image: a stack of read-only LSMT layers, maybe a writable layer on top, read as one disk.

This is the merged view OverlayBD exposes as a block device (shared/specs/overlaybd-formats.md,
section 1.7). A `LayerStack` is a `RandomAccessFile` of the virtual disk:

    upper (writable)     consulted first; its own index changes with every write and trim
    lowers[-1] (top)     \\
    ...                   } merged once at open into one index (`merge_indexes`)
    lowers[0] (bottom)   /

Resolution, for every sector: the writable layer's mapping if it has one, else the merged
read-only index's, else zeros. A zeroed mapping (a trim) reads as zeros and hides everything
below it. The merged entries carry OverlayBD's tags: 0 for the topmost lower up to n-1 for
the bottom one, and n for the writable layer (n = number of lowers).

Contract of `pread`
    - offset and length must be multiples of 512 (`AlignmentError` otherwise): LSMT I/O is
      whole sectors;
    - a read past the virtual size is short, as with a file; at or after it, ``b""``;
    - neighbouring segments of the same layer whose data follow each other in the layer file
      are read with one `read_data` call.

Virtual size: the writable layer's if there is one, else that of the topmost lower whose
header gives a size above 0 (a layer may leave it 0 to inherit it).

Tracing: one ``image``/``read`` event per `pread` (target = the stack's name, bytes of the
virtual disk) and, inside it, one ``image``/``segment`` event per run of segments served by one
layer (target = that layer's name, offset and length in bytes of the virtual disk, nbytes = the
bytes read, 0 for a zeroed run). The layers emit their own ``lsmt`` events below these.

Caveats:
- the read-only layers are merged once; a stack whose lowers change (a live snapshot) is
  reopened, not updated;
- the uuid chain is not checked unless asked (`check_uuid_chain=True` or `check_chain()`),
  as OverlayBD's image opener does not check it either;
- OverlayBD splits reads at 4 MiB; this stack reads a request of any size in one go;
- `pread` asks the writable layer only for the mappings over the read (`lookup`, O(log n)),
  but `index`, `segments` and `data_ranges` use its whole `index`, which that layer
  rebuilds (O(its entries)) after each write: call them between batches of writes, not per
  read. 20,000 random 4 KiB writes on a 1 GiB upper, each followed by a 4 KiB read of the
  block: 2.0 s in all, about 100 us per write+read and flat, where rebuilding the index per
  read took 111 s, 1.2 ms per write+read at first and 11.5 ms near 20,000 (2-core VM).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from workbench.errors import AlignmentError, LayerStackError, ReadOnlyError
from workbench.formats.lsmt import (
    ALIGNMENT,
    LENGTH_BITS,
    MAX_SEGMENT_LENGTH,
    MAX_STACK_LAYERS,
    SECTOR_SHIFT,
    SegmentIndex,
)
from workbench.image.merge import clip, merge_indexes, overlay
from workbench.tracing import core as trace

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Layer", "LayerStack", "WritableUpper"]

log = logging.getLogger(__name__)


class Layer(Protocol):
    """What the stack needs of a layer (`ReadOnlyLayer` and `WritableLayer` both fit)."""

    name: str

    @property
    def index(self) -> SegmentIndex: ...

    @property
    def virtual_size(self) -> int: ...

    @property
    def uuid(self) -> str: ...

    @property
    def parent_uuid(self) -> str: ...

    def read_data(self, moffset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class WritableUpper(Layer, Protocol):
    """A layer that also takes writes (`WritableLayer`).

    `lookup(first, count)` gives the mappings ``(offset, length, moffset, zeroed)`` that
    overlap sectors [first, first + count), sorted by offset, uncut: the read path's way
    to the upper's mappings without building its whole `index` after every write.
    `readonly` is True for an upper opened read-only (a view of its files that refuses
    writes).
    """

    @property
    def readonly(self) -> bool: ...

    def lookup(self, first: int, count: int) -> list[tuple[int, int, int, bool]]: ...

    def pwrite(self, offset: int, data: bytes) -> object: ...

    def trim(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...


# A merged entry cut to a read, or a run of them read in one go: virtual start and end
# sectors, moffset (sectors of the layer file), zeroed, tag.
Piece = tuple[int, int, int, bool, int]

_ZEROED_BIT = 1 << 55
_MOFFSET_MASK = (1 << 55) - 1
_SECTOR_MASK = ALIGNMENT - 1


class LayerStack:
    """The merged view of `lowers` (bottom first) under an optional writable `upper`.

    The stack owns its layers: `close` closes them all.

    Parameters
    ----------
    lowers
        Read-only layers in config order: ``lowers[0]`` is the bottom (base) layer.
    upper
        The writable layer, or None for a read-only image.
    check_uuid_chain
        Check at open that each layer's parent_uuid is the uuid of the layer below
        (`check_chain`); off by default, as in OverlayBD.
    name
        The stack's name in errors and trace events.

    Raises
    ------
    LayerStackError
        If there are more than 255 lowers, or the uuid chain is broken (when checked).
    """

    def __init__(
        self,
        lowers: Sequence[Layer],
        upper: WritableUpper | None = None,
        *,
        check_uuid_chain: bool = False,
        name: str = "image",
    ) -> None:
        if len(lowers) > MAX_STACK_LAYERS:
            raise LayerStackError(
                f"{name}: a stack of {len(lowers)} read-only layers; LSMT stacks at most "
                f"{MAX_STACK_LAYERS}, flatten (merge) some layers first"
            )
        self.name = name
        self.lowers = list(lowers)
        self.upper = upper

        # Tag t serves from _by_tag[t]: the lowers top first, then the writable layer.
        self._by_tag: list[Layer] = list(reversed(self.lowers))
        self._upper_tag = len(self.lowers)
        if upper is not None:
            self._by_tag.append(upper)

        started = time.perf_counter()
        self.ro_index = merge_indexes([layer.index for layer in self._by_tag[: len(lowers)]])
        log.debug(
            "%s: merged %d lowers into %d segments in %.1f ms",
            name,
            len(self.lowers),
            len(self.ro_index),
            (time.perf_counter() - started) * 1e3,
        )

        if check_uuid_chain:
            self.check_chain()
        # Layers never change size once open, so neither does the stack: every read asks.
        self._size = self._virtual_size()

    # Layers ----------------------------------------------------------------------------

    @property
    def layers(self) -> list[Layer]:
        """All layers bottom first, the writable one last."""
        return self.lowers + ([self.upper] if self.upper is not None else [])

    def layer_for_tag(self, tag: int) -> Layer:
        """The layer that a merged entry with this tag reads from."""
        return self._by_tag[tag]

    @property
    def size(self) -> int:
        """Bytes of the virtual disk; see the module docstring for which layer decides."""
        return self._size

    def _virtual_size(self) -> int:
        for layer in reversed(self.layers):
            if layer.virtual_size > 0:
                return layer.virtual_size
        return 0

    @property
    def writable(self) -> bool:
        """True if the stack takes writes: it has an upper, not opened read-only."""
        return self.upper is not None and not self.upper.readonly

    def check_chain(self) -> None:
        """Raise `LayerStackError` at the first layer whose parent_uuid is not the uuid below."""
        layers = self.layers
        for below, layer in itertools.pairwise(layers):
            if layer.parent_uuid != below.uuid:
                raise LayerStackError(
                    f"{self.name}: broken uuid chain: layer {layer.name} has parent_uuid "
                    f"{layer.parent_uuid}, but the layer below it, {below.name}, has uuid "
                    f"{below.uuid}; the layers are not stacked in the order they were built"
                )

    # The index of the whole image ------------------------------------------------------

    @property
    def index(self) -> SegmentIndex:
        """The merged index of the whole image, the writable layer's entries included."""
        if self.upper is None:
            return self.ro_index
        return overlay(self.upper.index.with_tag(self._upper_tag), self.ro_index)

    def _segments(self, first: int, count: int) -> SegmentIndex:
        """Merged entries covering sectors [first, first + count), cut to that range."""
        ro = self.ro_index.slice(*self.ro_index.span(first, count))
        if self.upper is not None:
            upper_index = self.upper.index
            mine = upper_index.slice(*upper_index.span(first, count))
            ro = overlay(mine.with_tag(self._upper_tag), ro)
        return clip(ro, first, first + count)

    def _pieces(self, first: int, count: int) -> list[Piece]:
        """The same entries as `_segments`, as tuples; the read path's version.

        A small read touches a handful of entries, where numpy's per-call cost dominates:
        the entries are cut in plain Python. The writable layer is asked only for its
        mappings over the range (`lookup`), and the merged read-only entries fill the gaps
        between them.
        """
        stop = first + count
        index = self.ro_index
        lo, hi = index.span(first, count)
        ro = list(_cut(index.keys[lo:hi].tolist(), index.mappings[lo:hi].tolist(), first, stop))
        if self.upper is None:
            return ro

        mine = list(_cut_lookup(self.upper.lookup(first, count), first, stop, self._upper_tag))
        if not mine:
            return ro
        return _fill_gaps(mine, ro, first, stop)

    # Reading ---------------------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        """`length` bytes of the virtual disk at `offset`; see the module docstring."""
        recorder = trace.recorder
        if (
            recorder is None
            and not (offset | length) & _SECTOR_MASK
            and offset >= 0
            and 0 < length <= self._size - offset
        ):
            whole = self._read_one_entry(offset >> SECTOR_SHIFT, length >> SECTOR_SHIFT)
            if whole is not None:
                return whole

        self._check_aligned(offset, length, "read")
        if recorder is not None:
            start_ns = time.perf_counter_ns()

        wanted = min(length, self.size - offset)
        data = (
            self._read_sectors(offset >> SECTOR_SHIFT, wanted >> SECTOR_SHIFT)
            if wanted > 0
            else b""
        )

        if recorder is not None:
            recorder.emit("image", "read", self.name, offset, length, start_ns, len(data))
        return data

    def _read_sectors(self, first: int, count: int) -> bytes:
        recorder = trace.recorder
        out = bytearray(count << SECTOR_SHIFT)
        for start, end, moffset, zeroed, tag in _runs(self._pieces(first, count)):
            if recorder is not None:
                run_ns = time.perf_counter_ns()

            # Zeroed runs are already zeros in `out`; only data runs touch a layer.
            nbytes = 0
            if not zeroed:
                data = self._by_tag[tag].read_data(moffset, end - start)
                out[(start - first) << SECTOR_SHIFT : (end - first) << SECTOR_SHIFT] = data
                nbytes = len(data)

            if recorder is not None:
                recorder.emit(
                    "image",
                    "segment",
                    self._by_tag[tag].name,
                    start << SECTOR_SHIFT,
                    (end - start) << SECTOR_SHIFT,
                    run_ns,
                    nbytes,
                    hit=None,
                )
        return bytes(out)

    def _read_one_entry(self, first: int, count: int) -> bytes | None:
        """The sectors if one read-only entry covers them all and the upper maps none of
        them (most small reads), else None.

        The general path checks alignment, cuts entries, joins runs and copies each into an
        output buffer: ~8 us of Python for a 4 KiB read. This path reads the layer's bytes
        and returns them as they are. Untraced reads only (`pread` tries it first): the
        traced path emits an event per segment.
        """
        if self.upper is not None and self.upper.lookup(first, count):
            return None
        found = self.ro_index.cover(first, count)
        if found is None:
            return None

        offset, mapping = found
        if mapping & _ZEROED_BIT:
            return bytes(count << SECTOR_SHIFT)
        moffset = (mapping & _MOFFSET_MASK) + (first - offset)
        return self._by_tag[mapping >> 56].read_data(moffset, count)

    def segments(self, offset: int = 0, length: int | None = None) -> pd.DataFrame:
        """Which layer serves which range of [offset, offset + length), as a DataFrame.

        One row per merged segment plus one per unmapped gap, sorted by offset. Columns:
        ``offset``, ``length`` (bytes of the virtual disk), ``kind`` (``data``, ``zeroed``
        or ``unmapped``), ``layer`` (the serving layer's name, None for a gap), ``tag``
        (OverlayBD's tag: 0 = topmost lower, n = writable layer; -1 for a gap) and
        ``moffset`` (bytes in the layer file; -1 where no data is read). Unaligned bounds are
        widened to whole sectors; the range is clipped to the virtual size.
        """
        import pandas as pd

        end = self.size if length is None else min(self.size, offset + length)
        first = offset >> SECTOR_SHIFT
        stop = -(-end // ALIGNMENT)
        count = max(stop - first, 0)
        segments = self._segments(first, count) if count else SegmentIndex.empty()

        names = np.array([layer.name for layer in self._by_tag] + [None], dtype=object)
        tag = segments.tag.astype(np.int64)
        zeroed = segments.zeroed
        mapped = pd.DataFrame(
            {
                "offset": segments.offset.astype(np.int64) << SECTOR_SHIFT,
                "length": segments.length.astype(np.int64) << SECTOR_SHIFT,
                "kind": np.where(zeroed, "zeroed", "data"),
                "layer": names[tag],
                "tag": tag,
                "moffset": np.where(zeroed, -1, segments.moffset.astype(np.int64) << SECTOR_SHIFT),
            }
        )

        gap_start, gap_end = _gaps_within(segments, first, first + count)
        gaps = pd.DataFrame(
            {
                "offset": gap_start << SECTOR_SHIFT,
                "length": (gap_end - gap_start) << SECTOR_SHIFT,
                "kind": "unmapped",
                "layer": None,
                "tag": -1,
                "moffset": -1,
            }
        )
        frames = [frame for frame in (mapped, gaps) if len(frame)]
        if not frames:
            return mapped
        table = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        return table.sort_values("offset", ignore_index=True)

    def data_ranges(self) -> Iterator[tuple[int, int]]:
        """Byte ranges (offset, length) of the disk that hold data, neighbours joined.

        Unmapped and zeroed ranges are left out: a sparse copy of the disk only needs these.
        """
        index = self.index
        if len(index) == 0:
            return
        keep = ~index.zeroed
        offset = index.offset[keep].astype(np.int64)
        end = index.end[keep].astype(np.int64)
        if len(offset) == 0:
            return

        # A range starts where a data segment does not continue the previous one.
        starts = np.flatnonzero(np.concatenate([[True], offset[1:] != end[:-1]]))
        stops = np.concatenate([starts[1:], [len(offset)]]) - 1
        size_sectors = self.size >> SECTOR_SHIFT
        for lo, hi in zip(offset[starts].tolist(), end[stops].tolist(), strict=True):
            hi = min(hi, size_sectors)
            if hi > lo:
                yield lo << SECTOR_SHIFT, (hi - lo) << SECTOR_SHIFT

    # Writing ---------------------------------------------------------------------------

    def _writable_upper(self, what: str) -> WritableUpper:
        if self.upper is None:
            raise ReadOnlyError(
                f"{self.name}: cannot {what}: the image has no writable layer; "
                "open it with a writable layer (an upper in the config, writable=True)"
            )
        if self.upper.readonly:
            raise ReadOnlyError(
                f"{self.name}: cannot {what}: the writable layer {self.upper.name} was opened "
                'read-only; open the image with upper="writable"'
            )
        return self.upper

    def pwrite(self, offset: int, data: bytes) -> int:
        """Write `data` at `offset` to the writable layer (both 512-aligned); returns its length."""
        upper = self._writable_upper("write")
        self._check_aligned(offset, len(data), "write")
        upper.pwrite(offset, data)
        return len(data)

    def trim(self, offset: int, length: int) -> None:
        """Discard a range: it reads as zeros and hides the lowers' data (512-aligned)."""
        upper = self._writable_upper("trim")
        self._check_aligned(offset, length, "trim")
        upper.trim(offset, length)

    def flush(self) -> None:
        """Make the writable layer's writes durable; nothing to do for a read-only image."""
        if self.upper is not None:
            self.upper.flush()

    # Lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Close every layer (the stack owns them)."""
        for layer in self.layers:
            layer.close()

    def __enter__(self) -> LayerStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_aligned(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset % ALIGNMENT or length % ALIGNMENT:
            raise AlignmentError(
                f"{self.name}: {what} at offset {offset}, length {length}: LSMT I/O must be "
                f"aligned to {ALIGNMENT}-byte sectors (offset and length non-negative "
                f"multiples of {ALIGNMENT})"
            )

    def __repr__(self) -> str:
        upper = self.upper.name if self.upper is not None else None
        return (
            f"LayerStack({self.name!r}, {len(self.lowers)} lowers, upper={upper!r}, "
            f"size={self.size}, {len(self.ro_index)} merged segments)"
        )

    def _repr_html_(self) -> str:
        from workbench.explore.html import card, human_bytes

        fields = {
            "layers (bottom first)": ", ".join(layer.name for layer in self.lowers) or "none",
            "upper": "none" if self.upper is None else self.upper.name,
            "virtual size": human_bytes(self.size),
            "merged segments": len(self.ro_index),
        }
        return card(f"LayerStack {self.name}", fields, self.segments())


def _cut(keys: list[int], mappings: list[int], first: int, stop: int) -> Iterator[Piece]:
    """Decode entries (keys and w1 words) and cut them to sectors [first, stop)."""
    for key, mapping in zip(keys, mappings, strict=True):
        offset = key >> LENGTH_BITS
        end = min(offset + (key & MAX_SEGMENT_LENGTH), stop)
        start = max(offset, first)
        zeroed = bool(mapping & _ZEROED_BIT)
        moffset = mapping & _MOFFSET_MASK
        if not zeroed:
            moffset += start - offset
        if start < end:
            yield start, end, moffset, zeroed, mapping >> 56


def _cut_lookup(
    segments: list[tuple[int, int, int, bool]], first: int, stop: int, tag: int
) -> Iterator[Piece]:
    """`_cut` for a layer's own (offset, length, moffset, zeroed) mappings, tagged `tag`."""
    for offset, length, moffset, zeroed in segments:
        start = max(offset, first)
        end = min(offset + length, stop)
        if start < end:
            yield start, end, moffset if zeroed else moffset + (start - offset), zeroed, tag


def _fill_gaps(mine: list[Piece], below: list[Piece], first: int, stop: int) -> list[Piece]:
    """`mine` (the writable layer's pieces) with the gaps between them filled from `below`.

    Both lists are sorted, non-overlapping and cut to [first, stop); so is the result. A
    piece of `below` can straddle several gaps, so the scan of `below` restarts at the first
    piece that reaches into each gap.
    """
    gaps = []
    cursor = first
    for start, end, *_ in mine:
        if start > cursor:
            gaps.append((cursor, start))
        cursor = end
    if cursor < stop:
        gaps.append((cursor, stop))

    pieces = list(mine)
    position = 0
    for gap_start, gap_end in gaps:
        while position < len(below) and below[position][1] <= gap_start:
            position += 1
        scan = position
        while scan < len(below) and below[scan][0] < gap_end:
            start, end, moffset, zeroed, tag = below[scan]
            cut_start = max(start, gap_start)
            if not zeroed:
                moffset += cut_start - start
            pieces.append((cut_start, min(end, gap_end), moffset, zeroed, tag))
            scan += 1
    pieces.sort()
    return pieces


def _runs(pieces: Iterable[Piece]) -> Iterator[Piece]:
    """Join neighbouring pieces of one layer whose data also follow each other in its file.

    Zeroed neighbours of one layer join too (they read nothing).
    """
    run: list | None = None
    for start, end, moffset, zeroed, tag in pieces:
        if run is not None:
            run_start, run_end, run_moffset, run_zeroed, run_tag = run
            follows = start == run_end and tag == run_tag and zeroed == run_zeroed
            if follows and (zeroed or moffset == run_moffset + (run_end - run_start)):
                run[1] = end
                continue
            yield run_start, run_end, run_moffset, run_zeroed, run_tag
        run = [start, end, moffset, zeroed, tag]
    if run is not None:
        yield run[0], run[1], run[2], run[3], run[4]


def _gaps_within(segments: SegmentIndex, first: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Sector ranges of [first, stop) that no segment covers (segments already cut to it)."""
    starts = np.concatenate([[first], segments.end.astype(np.int64)])
    ends = np.concatenate([segments.offset.astype(np.int64), [stop]])
    keep = starts < ends
    return starts[keep].astype(np.int64), ends[keep].astype(np.int64)
