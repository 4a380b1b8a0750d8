"""The LSMT format module: header, UUIDs, the segment index, and parsers fed bad bytes."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import TESTDATA, needs_testdata

from workbench.blobs import BytesFile
from workbench.errors import CorruptFileError, FormatError, WorkbenchError
from workbench.formats import lsmt
from workbench.formats.lsmt import LsmtHeader, SegmentIndex, normalize_uuid
from workbench.image.layer import ReadOnlyLayer

# ---------------------------------------------------------------------------------------------
# Header and UUIDs


@needs_testdata
@pytest.mark.parametrize("name", ["layer1.lsmt", "layer2.lsmt", "merged12.lsmt"])
def test_header_and_trailer_repack_to_the_same_bytes(name: str) -> None:
    data = (TESTDATA / name).read_bytes()

    header = LsmtHeader.unpack(data[:4096], name)
    trailer = LsmtHeader.unpack(data[-4096:], name, len(data) - 4096)

    assert header.pack() == data[:4096]
    assert trailer.pack() == data[-4096:]
    assert header.flags == 0x07 and trailer.flags == 0x06
    assert trailer.index_size % lsmt.INDEX_PAD_COMMITTED == 0


def test_header_layout_matches_the_spec() -> None:
    header = LsmtHeader(
        flags=0x03,
        index_offset=4096,
        index_size=7,
        virtual_size=64 << 30,
        uuid="aaaaaaaa-0000-4000-8000-000000000002",
        user_tag=b"hello",
    )

    raw = header.pack()

    assert len(raw) == 4096
    assert raw[:8] == b"LSMT\x00\x01\x02\x00"
    assert struct.unpack_from("<IIQQQ", raw, 24) == (390, 0x03, 4096, 7, 64 << 30)
    assert raw[56:93] == b"AAAAAAAA-0000-4000-8000-000000000002\x00"
    assert raw[93:130] == b"00000000-0000-0000-0000-000000000000\x00"
    assert raw[132:134] == b"\x01\x01"
    assert raw[134:139] == b"hello"
    assert raw[390:] == bytes(4096 - 390)


def test_a_commit_message_longer_than_the_tag_is_refused() -> None:
    with pytest.raises(FormatError, match=r"at most 256 fit"):
        LsmtHeader(flags=7, user_tag=b"x" * 257).pack()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, lsmt.NULL_UUID),
        ("", lsmt.NULL_UUID),
        ("aaaaaaaa-0000-4000-8000-000000000001", "AAAAAAAA-0000-4000-8000-000000000001"),
        ("AAAAAAAA00004000800000000000000A", "AAAAAAAA-0000-4000-8000-00000000000A"),
    ],
)
def test_uuids_are_normalised_to_overlaybd_text(text: str | None, expected: str) -> None:
    assert normalize_uuid(text) == expected


def test_a_bad_uuid_names_the_field() -> None:
    with pytest.raises(FormatError, match=r"^parent uuid 'nope' is not a UUID"):
        normalize_uuid("nope", "parent uuid")


def test_wrong_magic_and_wrong_size_field() -> None:
    good = LsmtHeader(flags=7).pack()

    with pytest.raises(FormatError, match=r"x.bin: no LSMT magic at offset 0"):
        LsmtHeader.unpack(b"\0" * 4096, "x.bin")
    bad_size = good[:24] + struct.pack("<I", 391) + good[28:]
    with pytest.raises(CorruptFileError, match=r"size field 391, expected 390"):
        LsmtHeader.unpack(bad_size, "x.bin")
    with pytest.raises(CorruptFileError, match=r"truncated: 100 of 390 bytes"):
        LsmtHeader.unpack(good[:100], "x.bin")


# ---------------------------------------------------------------------------------------------
# The segment index


def entry_bytes(offset: int, length: int, moffset: int, zeroed: int = 0, tag: int = 0) -> bytes:
    """One on-disk entry, written with the spec's formula, independently of the module."""
    return struct.pack("<QQ", offset | length << 50, moffset | zeroed << 55 | tag << 56)


def test_entries_decode_field_by_field() -> None:
    raw = entry_bytes(1024, 2048, 8) + entry_bytes(24576, 1024, 2074, zeroed=1, tag=3)

    index = SegmentIndex.from_bytes(raw)

    assert index.offset.tolist() == [1024, 24576]
    assert index.length.tolist() == [2048, 1024]
    assert index.moffset.tolist() == [8, 2074]
    assert index.zeroed.tolist() == [False, True]
    assert index.tag.tolist() == [0, 3]
    assert index.to_bytes() == raw


def test_padding_entries_are_dropped_and_written() -> None:
    padding = bytes.fromhex("ffffffffffff0300") + bytes(8)
    raw = entry_bytes(0, 8, 8) + padding * 3

    index = SegmentIndex.from_bytes(raw)

    assert len(index) == 1
    assert index.to_bytes(pad_to=4) == raw


def test_an_index_takes_sixteen_bytes_per_entry() -> None:
    index = SegmentIndex.from_fields(np.arange(0, 2000, 2), np.ones(1000), np.arange(1000) + 8)

    assert index.keys.nbytes + index.mappings.nbytes == 16 * len(index)


def test_check_sorted_names_the_overlapping_entries() -> None:
    index = SegmentIndex.from_fields([0, 10, 15], [10, 10, 1], [8, 18, 28])

    with pytest.raises(CorruptFileError, match=r"layer.x: index entries 1 and 2 overlap"):
        index.check_sorted("layer.x")


def test_check_data_range_names_the_entry_outside() -> None:
    index = SegmentIndex.from_fields([0, 10], [10, 10], [8, 500])

    with pytest.raises(CorruptFileError, match=r"index entry 1 maps sectors \[10, 20\)"):
        index.check_data_range("layer.x", 8, 100)


sorted_segments = st.lists(
    st.tuples(st.integers(0, 40), st.integers(1, 40)), min_size=0, max_size=40
).map(
    lambda pairs: [
        (sum(gap + length for gap, length in pairs[:i]) + gap, length)
        for i, (gap, length) in enumerate(pairs)
    ]
)


@given(segments=sorted_segments, probes=st.lists(st.integers(0, 3500), max_size=200))
def test_find_and_span_agree_with_a_brute_force_search(segments, probes) -> None:
    offsets = [offset for offset, _ in segments]
    lengths = [length for _, length in segments]
    index = SegmentIndex.from_fields(offsets, lengths, [8] * len(segments))

    def covering(sector: int) -> int:
        for position, (offset, length) in enumerate(segments):
            if offset <= sector < offset + length:
                return position
        return -1

    assert index.find(probes).tolist() == [covering(p) for p in probes]
    assert [index.find_one(p) for p in probes] == [covering(p) for p in probes]
    for probe in probes[:20]:
        first, stop = index.span(probe, 7)
        expected = [i for i, (o, n) in enumerate(segments) if o < probe + 7 and probe < o + n]
        assert list(range(first, stop)) == expected


def test_batched_find_handles_unsorted_probes_in_bulk() -> None:
    rng = np.random.default_rng(7)
    index = SegmentIndex.from_fields(
        np.arange(0, 200_000, 10), np.full(20_000, 5), np.full(20_000, 8)
    )
    probes = rng.integers(0, 200_010, 50_000, dtype=np.uint64)

    found = index.find(probes)

    expected = np.where(probes % 10 < 5, (probes // 10).astype(np.int64), -1)
    expected[probes >= 200_000] = -1
    assert (found == expected).all()


# ---------------------------------------------------------------------------------------------
# Parsers fed bad bytes


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=12_000))
def test_random_bytes_never_open_as_a_layer(data: bytes) -> None:
    with pytest.raises(FormatError):
        ReadOnlyLayer.open(BytesFile(data, "random.bin"))


@needs_testdata
@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=4))
def test_damaged_layers_fail_with_a_workbench_error_or_open(flips) -> None:
    data = bytearray((TESTDATA / "layer2.lsmt").read_bytes())
    # Aim at the parts a reader interprets: the header, the index and the trailer.
    interesting = [*range(0, 400), *range(3159040, len(data))]
    for where, value in flips:
        data[interesting[where % len(interesting)]] = value

    try:
        layer = ReadOnlyLayer.open(BytesFile(bytes(data), "damaged.lsmt"))
    except WorkbenchError:
        return
    # LSMT has no checksums: a layer that still parses must at least read within its rules.
    with layer:
        for offset in range(0, layer.virtual_size, layer.virtual_size // 8):
            try:
                assert len(layer.pread(offset, 65536)) == min(65536, layer.virtual_size - offset)
            except WorkbenchError:
                pass
