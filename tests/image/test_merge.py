"""Tests of merge_indexes: OverlayBD's reference merges, a per-sector model, and scale."""

from __future__ import annotations

import itertools
import re
import time

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import TESTDATA, needs_testdata

from workbench.formats.lsmt import HT_SPACE, LsmtHeader, SegmentIndex
from workbench.image.merge import clip, merge_indexes, overlay

SEGMENT_LINE = re.compile(r"seg off=(\d+) len=(\d+) moff=(\d+) zeroed=([01]) tag=(\d+)")


def load_index(name: str) -> SegmentIndex:
    """The index of a committed layer file, read straight from its trailer."""
    raw = (TESTDATA / name).read_bytes()
    trailer = LsmtHeader.unpack(raw[-HT_SPACE:])
    start = trailer.index_offset
    return SegmentIndex.from_bytes(raw[start : start + trailer.index_size * 16]).with_tag(0)


def reference_segments(name: str) -> list[tuple[int, int, int, bool, int]]:
    """The merged segments OverlayBD printed for a stack (offset, length, moffset, zeroed, tag)."""
    text = (TESTDATA / name).read_text()
    return [
        (int(o), int(n), int(m), z == "1", int(t)) for o, n, m, z, t in SEGMENT_LINE.findall(text)
    ]


def as_tuples(index: SegmentIndex) -> list[tuple[int, int, int, bool, int]]:
    return list(
        zip(
            index.offset.tolist(),
            index.length.tolist(),
            index.moffset.tolist(),
            index.zeroed.tolist(),
            index.tag.tolist(),
            strict=True,
        )
    )


# ---------------------------------------------------------------------------------------------
# OverlayBD's own merges


@needs_testdata
def test_merge_of_layer1_alone_matches_overlaybd() -> None:
    """A one-layer stack's merged index is the layer's index, tagged 0."""
    merged = merge_indexes([load_index("layer1.lsmt")])
    assert as_tuples(merged) == reference_segments("layer1.segments.txt")


@needs_testdata
def test_merge_of_layer2_over_layer1_matches_overlaybd() -> None:
    """Entry by entry: clipped lower entries, zeroed upper entries, tags by level."""
    merged = merge_indexes([load_index("layer2.lsmt"), load_index("layer1.lsmt")])
    expected = reference_segments("layer12.segments.txt")
    assert len(expected) == 17
    assert as_tuples(merged) == expected


@needs_testdata
def test_merge_bottom_first_equals_top_first() -> None:
    layer1, layer2 = load_index("layer1.lsmt"), load_index("layer2.lsmt")
    top_first = merge_indexes([layer2, layer1])
    bottom_first = merge_indexes([layer1, layer2], top_first=False)
    assert as_tuples(top_first) == as_tuples(bottom_first)


# ---------------------------------------------------------------------------------------------
# Small cases


def index_of(*entries: tuple[int, int, int, bool]) -> SegmentIndex:
    if not entries:
        return SegmentIndex.empty()
    offset, length, moffset, zeroed = zip(*entries, strict=True)
    return SegmentIndex.from_fields(offset, length, moffset, zeroed)


def test_merge_of_nothing_is_empty() -> None:
    assert len(merge_indexes([])) == 0
    assert len(merge_indexes([SegmentIndex.empty(), SegmentIndex.empty()])) == 0


def test_merge_ignores_input_tags() -> None:
    top = index_of((0, 4, 8, False)).with_tag(7)
    bottom = index_of((4, 4, 8, False)).with_tag(9)
    assert merge_indexes([top, bottom]).tag.tolist() == [0, 1]


def test_zeroed_upper_entry_hides_lower_data() -> None:
    top = index_of((10, 5, 99, True))
    bottom = index_of((0, 30, 8, False))
    assert as_tuples(merge_indexes([top, bottom])) == [
        (0, 10, 8, False, 1),
        (10, 5, 99, True, 0),
        (15, 15, 8 + 15, False, 1),
    ]


def test_clipped_zeroed_lower_entry_keeps_its_moffset() -> None:
    top = index_of((0, 4, 8, False))
    bottom = index_of((2, 6, 50, True))
    assert as_tuples(merge_indexes([top, bottom])) == [
        (0, 4, 8, False, 0),
        (4, 4, 50, True, 1),
    ]


def test_contiguous_pieces_are_not_joined() -> None:
    """Touching entries of one layer stay separate entries, as in OverlayBD."""
    top = index_of((0, 4, 8, False), (4, 4, 12, False))
    merged = merge_indexes([top, index_of((0, 100, 8, False))])
    assert as_tuples(merged)[:2] == [(0, 4, 8, False, 0), (4, 4, 12, False, 0)]
    assert len(merged) == 3


def test_clip_cuts_both_ends_and_advances_moffset() -> None:
    index = index_of((0, 10, 8, False), (10, 10, 100, True), (20, 10, 200, False))
    assert as_tuples(clip(index, 5, 25)) == [
        (5, 5, 13, False, 0),
        (10, 10, 100, True, 0),
        (20, 5, 200, False, 0),
    ]
    assert len(clip(index, 30, 40)) == 0
    assert len(clip(index, 7, 7)) == 0


def test_overlay_keeps_given_tags() -> None:
    upper = index_of((0, 2, 8, False)).with_tag(3)
    lower = index_of((0, 4, 8, False)).with_tag(5)
    assert merge_indexes([]).keys.size == 0
    assert overlay(upper, lower).tag.tolist() == [3, 5]


# ---------------------------------------------------------------------------------------------
# A per-sector model

DISK_SECTORS = 96


@st.composite
def layer_indexes(draw: st.DrawFn) -> SegmentIndex:
    """A random valid index over a small disk: sorted, disjoint, some entries zeroed."""
    cuts = sorted(draw(st.sets(st.integers(0, DISK_SECTORS), max_size=16)))
    entries = []
    for start, end in itertools.pairwise(cuts):
        if draw(st.booleans()):
            moffset = draw(st.integers(8, 10_000))
            entries.append((start, end - start, moffset, draw(st.booleans())))
    return index_of(*entries)


def sector_model(indexes: list[SegmentIndex]) -> dict[int, tuple[int, bool, int | None]]:
    """sector -> (level, zeroed, moffset of that sector or None when zeroed); top wins."""
    model: dict[int, tuple[int, bool, int | None]] = {}
    for level in reversed(range(len(indexes))):
        for offset, length, moffset, zeroed, _ in as_tuples(indexes[level]):
            for sector in range(offset, offset + length):
                model[sector] = (level, zeroed, None if zeroed else moffset + sector - offset)
    return model


@settings(max_examples=200, deadline=None)
@given(st.lists(layer_indexes(), min_size=1, max_size=6))
def test_merge_matches_a_per_sector_model(indexes: list[SegmentIndex]) -> None:
    merged = merge_indexes(indexes)
    merged.check_sorted("merged")

    seen: dict[int, tuple[int, bool, int | None]] = {}
    for offset, length, moffset, zeroed, tag in as_tuples(merged):
        for sector in range(offset, offset + length):
            seen[sector] = (tag, zeroed, None if zeroed else moffset + sector - offset)
    assert seen == sector_model(indexes)


@settings(max_examples=200, deadline=None)
@given(st.lists(layer_indexes(), min_size=1, max_size=6))
def test_merged_entries_are_whole_visible_pieces_of_one_source_entry(
    indexes: list[SegmentIndex],
) -> None:
    """Each output entry lies in one source entry; two pieces of one entry never touch."""
    merged = as_tuples(merge_indexes(indexes))
    sources = []
    for offset, length, moffset, zeroed, tag in merged:
        source = indexes[tag]
        position = int(source.find(offset)[0])
        assert position >= 0
        s_offset, s_length, s_moffset, s_zeroed, _ = as_tuples(source)[position]
        assert offset + length <= s_offset + s_length
        assert zeroed == s_zeroed
        assert moffset == (s_moffset if zeroed else s_moffset + offset - s_offset)
        sources.append((tag, position))

    for (a, b), (entry_a, entry_b) in zip(
        itertools.pairwise(merged), itertools.pairwise(sources), strict=True
    ):
        if entry_a == entry_b:
            assert a[0] + a[1] < b[0], "a visible piece was split in two"


# ---------------------------------------------------------------------------------------------
# Scale


def random_index(entries: int, seed: int) -> SegmentIndex:
    rng = np.random.default_rng(seed)
    offset = np.cumsum(rng.integers(1, 200, entries)).astype(np.uint64)
    room = np.diff(np.append(offset, offset[-1] + 200))
    length = np.minimum(rng.integers(1, 200, entries), room).astype(np.uint64)
    zeroed = rng.random(entries) < 0.1
    return SegmentIndex.from_fields(offset, length, np.arange(entries) * 200 + 8, zeroed)


def test_merge_scales_to_a_million_segments() -> None:
    """Two layers of 1M segments each merge in well under a second (best of three)."""
    upper, lower = random_index(1_000_000, 1), random_index(1_000_000, 2)
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        merged = merge_indexes([upper, lower])
        timings.append(time.perf_counter() - started)

    merged.check_sorted("merged")
    assert int(merged.length.sum()) >= int(upper.length.sum())
    assert min(timings) < 1.0, f"merging 2 x 1M segments took {min(timings):.2f} s"
