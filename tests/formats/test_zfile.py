"""ZFile: reading OverlayBD's own files, writing compatible ones, and refusing damaged ones."""

from __future__ import annotations

import io
import itertools
import random
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import TESTDATA, needs_testdata
from samples import make_zfile, sample_data

from workbench.blobs.common import BytesFile
from workbench.errors import (
    ChecksumError,
    CorruptFileError,
    FormatError,
    UnsupportedFormatError,
)
from workbench.formats import zfile
from workbench.formats.checksum import crc32c_raw
from workbench.formats.zfile import ZFileHeader, ZFileReader, ZFileWriter, is_zfile
from workbench.tracing import recording

REFERENCE_ZFILES = [
    "layer1.commit-z.lz4.zfile",
    "layer1.commit-z.zstd.zfile",
    "layer1.lz4.bs32k.crc.zfile",
    "layer1.lz4.bs64k.crc.zfile",
    "layer1.lz4.crc.zfile",
    "layer1.lz4.nocrc.zfile",
    "layer1.zstd.crc.zfile",
    "layer1.zstd.nocrc.zfile",
    "layer2.commit-z.lz4.zfile",
    "layer2.commit-z.zstd.zfile",
    "layer2.lz4.bs32k.crc.zfile",
    "layer2.lz4.crc.zfile",
    "layer2.zstd.crc.zfile",
    "merged12.zfile",
    "src/text.bin.lz4.nocrc.zfile",
    "src/text.bin.zstd.crc.zfile",
]


@pytest.fixture(scope="module", autouse=True, params=["native", "python"])
def block_loop(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs through the C block loop (when built) and through the Python one.

    Module scope: hypothesis refuses function-scoped fixtures around its examples.
    """
    if request.param == "native" and zfile.native is None:
        pytest.skip("native ZFile decoder not built or WORKBENCH_PURE_PYTHON set")
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "python":
            patch.setattr(zfile, "native", None)
        yield request.param


def original_of(name: str) -> Path:
    if name.startswith("src/text.bin"):
        return TESTDATA / "src" / "text.bin"
    return TESTDATA / (name.split(".")[0] + ".lsmt")


def trailer_of(blob: bytes) -> ZFileHeader:
    return ZFileHeader.unpack(blob[-512:], "<test>", len(blob) - 512)


# ---------------------------------------------------------------------------------------------
# OverlayBD's own files


@needs_testdata
@pytest.mark.parametrize("name", REFERENCE_ZFILES)
def test_reference_zfile_reads_back_identical(name: str) -> None:
    original = original_of(name).read_bytes()
    with ZFileReader(BytesFile((TESTDATA / name).read_bytes(), name)) as reader:
        assert reader.size == len(original)
        assert reader.pread(0, reader.size + 100) == original

        rng = random.Random(name)
        for _ in range(200):
            offset = rng.randrange(reader.size)
            length = rng.choice([1, 511, 4096, 5000, 70000, rng.randrange(1, 300000)])
            assert reader.pread(offset, length) == original[offset : offset + length]
        assert reader.pread(reader.size, 10) == b""
        assert reader.pread(10, 0) == b""


@needs_testdata
def test_reference_options_are_exposed() -> None:
    with ZFileReader(BytesFile((TESTDATA / "layer1.commit-z.zstd.zfile").read_bytes())) as r:
        assert (r.algorithm, r.block_size, r.verify) == ("zstd", 4096, True)
        assert r.header.flags == 0x1B and r.trailer is None
        assert r.block_count == 1306
        offsets = r.block_offsets()
        assert offsets[0] == 512 and offsets[-1] == r.header.index_offset
    with ZFileReader(BytesFile((TESTDATA / "layer1.lz4.nocrc.zfile").read_bytes())) as r:
        assert (r.algorithm, r.verify) == ("lz4", False)
        assert r.header.flags == 0x13 and r.trailer is not None and r.trailer.flags == 0x16


def replay_writer(reference: bytes, original: bytes, **options: object) -> bytes:
    """Write `original` with our writer but the reference file's compressed blocks.

    Compressed bytes depend on the lz4/zstd library version; everything else (header,
    CRCs, index, trailer, placement) is ours. With the same payloads, the file must equal
    OverlayBD's byte for byte.
    """
    reader = ZFileReader(BytesFile(reference))
    crc = 4 if reader.verify else 0
    offsets = reader.block_offsets().tolist()
    payloads = iter(reference[a : b - crc] for a, b in itertools.pairwise(offsets))
    out = io.BytesIO()
    writer = ZFileWriter(out, **options)  # type: ignore[arg-type]
    writer._compress = lambda block: next(payloads)
    writer.write(original)
    writer.close()
    return out.getvalue()


@needs_testdata
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("layer1.lz4.crc.zfile", {"algorithm": "lz4"}),
        ("layer1.lz4.nocrc.zfile", {"algorithm": "lz4", "verify": False}),
        ("layer1.zstd.crc.zfile", {"algorithm": "zstd"}),
        ("layer1.lz4.bs64k.crc.zfile", {"algorithm": "lz4", "block_size": 65536}),
        ("layer1.commit-z.lz4.zfile", {"algorithm": "lz4", "overwrite_header": True}),
        ("layer2.commit-z.zstd.zfile", {"algorithm": "zstd", "overwrite_header": True}),
    ],
)
def test_writer_layout_is_byte_identical_to_overlaybd(name: str, options: dict) -> None:
    reference = (TESTDATA / name).read_bytes()
    original = original_of(name).read_bytes()
    assert replay_writer(reference, original, **options) == reference


@needs_testdata
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("layer1.lz4.crc.zfile", {"algorithm": "lz4"}),
        ("layer1.zstd.crc.zfile", {"algorithm": "zstd"}),
        ("layer1.commit-z.lz4.zfile", {"algorithm": "lz4", "overwrite_header": True}),
    ],
)
def test_our_compression_matches_overlaybd_fields(name: str, options: dict) -> None:
    reference = (TESTDATA / name).read_bytes()
    original = original_of(name).read_bytes()
    ours = make_zfile(original, **options)
    if ours == reference:
        return  # the library produced OverlayBD's exact bytes: nothing more to compare

    # Different lz4/zstd versions give different compressed blocks (see the module's
    # Caveats); every field that does not depend on the compressed sizes must match.
    size_dependent = {"index_offset": 0, "index_crc": 0, "digest": 0}
    for at in (0, -512):
        mine = ZFileHeader.unpack(ours[at:][:512]).with_(**size_dependent)
        theirs = ZFileHeader.unpack(reference[at:][:512]).with_(**size_dependent)
        assert mine == theirs
    if not options.get("overwrite_header"):
        assert ours[:512] == reference[:512]
    assert ZFileReader(BytesFile(ours)).pread(0, len(original)) == original


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
@pytest.mark.parametrize("block_size", zfile.BLOCK_SIZES)
@pytest.mark.parametrize(("verify", "overwrite_header"), [(True, False), (False, True)])
def test_round_trip(algorithm: str, block_size: int, verify: bool, overwrite_header: bool) -> None:
    data = sample_data(3 * block_size + block_size // 2 + 7)
    blob = make_zfile(
        data,
        algorithm=algorithm,
        block_size=block_size,
        verify=verify,
        overwrite_header=overwrite_header,
    )
    header = ZFileHeader.unpack(blob[:512])
    assert header.flags == (0x1B if overwrite_header else 0x13)
    assert trailer_of(blob).flags == 0x16
    assert trailer_of(blob).index_size == 4

    reader = ZFileReader(BytesFile(blob))
    assert reader.size == len(data) and reader.verify == verify
    assert reader.pread(0, len(data)) == data
    for offset, length in [(0, 1), (block_size - 1, 2), (block_size, block_size), (5, 10**6)]:
        assert reader.pread(offset, length) == data[offset : offset + length]


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 12345])
def test_round_trip_sizes(size: int) -> None:
    data = sample_data(size)
    blob = make_zfile(data)
    reader = ZFileReader(BytesFile(blob))
    assert reader.size == size and reader.block_count == -(-size // 4096)
    assert reader.pread(0, size + 1) == data


def test_writes_of_any_size_give_the_same_file() -> None:
    data = sample_data(50000)
    one_go = make_zfile(data, algorithm="zstd")
    out = io.BytesIO()
    writer = ZFileWriter(out, algorithm="zstd")
    rng = random.Random(3)
    position = 0
    while position < len(data):
        step = rng.choice([0, 1, 100, 4095, 4096, 9000])
        writer.write(memoryview(data)[position : position + step])
        position += step
    writer.close()
    assert out.getvalue() == one_go


def test_incompressible_blocks_larger_than_block_size_read_back() -> None:
    data = random.Random(7).randbytes(65536 * 3)
    blob = make_zfile(data, block_size=65536)
    reader = ZFileReader(BytesFile(blob))
    assert max(lengths := (reader.block_offsets()[1:] - reader.block_offsets()[:-1])) > 65536
    assert len(lengths) == 3
    assert reader.pread(1000, 65536 * 2) == data[1000 : 1000 + 65536 * 2]


def test_writer_rejects_bad_block_size_and_algorithm() -> None:
    with pytest.raises(FormatError, match=r"block size 5000 is not allowed.*4096, 8192"):
        ZFileWriter(io.BytesIO(), block_size=5000)
    with pytest.raises(FormatError, match="unknown ZFile algorithm 'lzo'"):
        ZFileWriter(io.BytesIO(), algorithm="lzo")


def test_writer_starts_at_the_current_position_of_out() -> None:
    out = io.BytesIO()
    out.write(b"x" * 100)
    writer = ZFileWriter(out, overwrite_header=True)
    writer.write(b"abc" * 5000)
    writer.close()
    blob = out.getvalue()[100:]
    assert ZFileHeader.unpack(blob[:512]).flags == 0x1B
    assert ZFileReader(BytesFile(blob)).pread(0, 15000) == b"abc" * 5000


def test_file_helpers_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(sample_data(300000))
    trailer = zfile.compress(src, tmp_path / "c.zfile", algorithm="zstd", block_size=8192)
    assert trailer.original_file_size == 300000
    assert zfile.decompress(tmp_path / "c.zfile", tmp_path / "out.bin") == 300000
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()


def test_is_zfile() -> None:
    blob = make_zfile(b"hello")
    assert is_zfile(blob[:512])
    assert not is_zfile(blob[-512:])  # the trailer has the HEADER bit clear
    assert not is_zfile(b"\0" * 512)
    assert not is_zfile(blob[:100])
    damaged = bytearray(blob[:512])
    damaged[40] ^= 1
    assert not is_zfile(bytes(damaged))


# ---------------------------------------------------------------------------------------------
# Damaged input


def test_wrong_magic() -> None:
    with pytest.raises(FormatError, match="no ZFile magic at offset 0"):
        ZFileReader(BytesFile(b"LSMT" + bytes(4000), "layer.bin"))


@pytest.mark.parametrize("keep", [10, 600, -1])
def test_truncated_file(keep: int) -> None:
    blob = make_zfile(sample_data(20000))
    with pytest.raises(CorruptFileError, match=r"truncated|cut short|trailer"):
        ZFileReader(BytesFile(blob[:keep], "cut.zfile"))


def test_truncated_overwritten_file_fails_on_read() -> None:
    blob = make_zfile(sample_data(20000), overwrite_header=True)
    index_offset = ZFileHeader.unpack(blob[:512]).index_offset
    # Keep the index (copied to its place) but drop the blocks in front of it.
    with pytest.raises(CorruptFileError, match=r"index .* does not fit"):
        ZFileReader(BytesFile(blob[: index_offset - 1]))


def test_flipped_block_byte_names_the_block() -> None:
    data = sample_data(20000)
    blob = bytearray(make_zfile(data))
    reader = ZFileReader(BytesFile(bytes(blob)))
    start = int(reader.block_offsets()[2])
    blob[start + 5] ^= 0x40
    damaged = ZFileReader(BytesFile(bytes(blob), "bad.zfile"))
    assert damaged.pread(0, 8192) == data[:8192]  # blocks 0 and 1 are intact
    with pytest.raises(ChecksumError, match=rf"bad.zfile: ZFile block 2 at offset {start}: CRC"):
        damaged.pread(8192, 10)


def test_undecodable_block_without_crc() -> None:
    # Without CRCs a damaged literal goes unnoticed (the format cannot tell); a block that
    # does not decode, or decodes to the wrong length, is still caught.
    blob = bytearray(make_zfile(b"\0" * 8192, verify=False))
    stop = int(ZFileReader(BytesFile(bytes(blob))).block_offsets()[1])
    blob[512:stop] = b"\xff" * (stop - 512)
    reader = ZFileReader(BytesFile(bytes(blob)))
    with pytest.raises(CorruptFileError, match=r"ZFile block 0 at offset 512 .lz4. does not"):
        reader.pread(0, 4096)


def test_bad_index_crc() -> None:
    blob = bytearray(make_zfile(sample_data(20000)))
    index_offset = trailer_of(bytes(blob)).index_offset
    blob[index_offset] ^= 1
    with pytest.raises(ChecksumError, match=f"index at offset {index_offset}: CRC mismatch"):
        ZFileReader(BytesFile(bytes(blob)))


def rewrite_trailer(blob: bytes, **changes: object) -> bytes:
    trailer = trailer_of(blob).with_(**changes)
    return blob[:-512] + trailer.pack()


def with_index_entry(blob: bytes, entry: int, value: int) -> bytes:
    """`blob` with one index entry changed and the index CRC made to match again."""
    trailer = trailer_of(blob)
    start = trailer.index_offset
    index = bytearray(blob[start : start + 4 * trailer.index_size])
    struct.pack_into("<I", index, 4 * entry, value)
    rest = blob[start + len(index) : -512]
    return blob[:start] + bytes(index) + rest + trailer.with_(index_crc=crc32c_raw(index)).pack()


def test_index_entry_pointing_past_eof() -> None:
    blob = with_index_entry(make_zfile(sample_data(20000)), 1, 100000)
    with pytest.raises(CorruptFileError, match=r"index entry 1 .* says block 1 is 100000 bytes"):
        ZFileReader(BytesFile(blob))


def test_index_that_does_not_add_up() -> None:
    blob = make_zfile(sample_data(20000))
    first_length = struct.unpack_from("<I", blob, trailer_of(blob).index_offset)[0]
    with pytest.raises(CorruptFileError, match=r"blocks end at offset .* but the index starts"):
        ZFileReader(BytesFile(with_index_entry(blob, 0, first_length + 1)))
    with pytest.raises(CorruptFileError, match="index_size is 5 blocks"):
        ZFileReader(BytesFile(rewrite_trailer(blob, original_file_size=99999)))


def test_header_digest_mismatch() -> None:
    blob = bytearray(make_zfile(b"data" * 3000))
    blob[300] = 1  # padding of the header, still covered by the digest
    with pytest.raises(ChecksumError, match="header at offset 0: digest mismatch"):
        ZFileReader(BytesFile(bytes(blob)))


def test_unsupported_features() -> None:
    blob = make_zfile(b"data" * 3000)
    with pytest.raises(UnsupportedFormatError, match="mini-LZO"):
        ZFileReader(BytesFile(rewrite_trailer(blob, algo=0)))
    with pytest.raises(UnsupportedFormatError, match="dictionar"):
        ZFileReader(BytesFile(rewrite_trailer(blob, use_dict=1, dict_size=0)))
    with pytest.raises(CorruptFileError, match="algo byte is 9"):
        ZFileReader(BytesFile(rewrite_trailer(blob, algo=9)))


# ---------------------------------------------------------------------------------------------
# Tracing and threads


def test_tracing_events() -> None:
    data = sample_data(5 * 4096)
    reader = ZFileReader(BytesFile(make_zfile(data), "t.zfile"))
    reader.pread(0, 10)  # no recording: nothing to see, nothing kept
    with recording() as recorder:
        assert reader.pread(4000, 5000) == data[4000:9000]
    events = recorder.events
    assert [(e.layer, e.op) for e in events] == [("zfile", "block")] * 3 + [("zfile", "read")]
    offsets = reader.block_offsets()
    assert [e.offset for e in events[:3]] == offsets[:3].tolist()
    assert [e.length for e in events[:3]] == (offsets[1:4] - offsets[:3]).tolist()
    assert all(e.nbytes == 4096 for e in events[:3])
    assert (events[3].offset, events[3].length, events[3].nbytes) == (4000, 5000, 5000)


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_concurrent_reads(algorithm: str) -> None:
    data = sample_data(64 * 4096)
    reader = ZFileReader(BytesFile(make_zfile(data, algorithm=algorithm)))
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(200):
            offset, length = rng.randrange(len(data)), rng.randrange(1, 20000)
            if reader.pread(offset, length) != data[offset : offset + length]:
                failures.append(f"{seed}: {offset}+{length}")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# ---------------------------------------------------------------------------------------------
# Properties

SMALL_ZFILES = {
    (algorithm, overwrite): make_zfile(
        sample_data(3 * 4096 + 100, seed=5), algorithm=algorithm, overwrite_header=overwrite
    )
    for algorithm in ("lz4", "zstd")
    for overwrite in (False, True)
}
SMALL_DATA = sample_data(3 * 4096 + 100, seed=5)


def read_all_or_format_error(blob: bytes) -> bytes | None:
    try:
        reader = ZFileReader(BytesFile(blob, "fuzz.zfile"))
        return reader.pread(0, reader.size)
    except FormatError:
        return None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_format_errors(blob: bytes) -> None:
    assert read_all_or_format_error(blob) is None
    assert read_all_or_format_error(zfile.MAGIC0 + zfile.MAGIC1 + blob) is None


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(SMALL_ZFILES)),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3),
)
def test_damaged_file_gives_right_data_or_an_error(key: tuple, flips: list) -> None:
    blob = bytearray(SMALL_ZFILES[key])
    for position, mask in flips:
        blob[position % len(blob)] ^= mask
    result = read_all_or_format_error(bytes(blob))
    # With CRCs on and digests on, damage is either caught or lands where no reader looks
    # (the trailer of an overwritten-header file).
    assert result is None or result == SMALL_DATA


@settings(max_examples=50, deadline=None)
@given(
    st.binary(max_size=70000),
    st.sampled_from(["lz4", "zstd"]),
    st.sampled_from([4096, 8192, 65536]),
    st.booleans(),
    st.booleans(),
)
def test_random_round_trips(
    data: bytes, algorithm: str, block_size: int, verify: bool, overwrite: bool
) -> None:
    blob = make_zfile(
        data,
        algorithm=algorithm,
        block_size=block_size,
        verify=verify,
        overwrite_header=overwrite,
    )
    reader = ZFileReader(BytesFile(blob))
    assert reader.pread(0, len(data) + 1) == data
    if data:
        offset = len(data) // 3
        assert reader.pread(offset, block_size) == data[offset : offset + block_size]
