"""The native ZFile block loop: same bytes and same errors as the Python loop, CRC32C, threads."""

from __future__ import annotations

import io
import os
import random
import threading

import lz4.block
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from samples import make_zfile, sample_data

from workbench.blobs.common import BytesFile
from workbench.errors import ChecksumError, CorruptFileError
from workbench.formats import zfile
from workbench.formats.checksum import SEED_BLOCK, crc32c_raw
from workbench.formats.zfile import ZFileReader, ZFileWriter

try:
    from workbench.formats import _zfile_native as native
except ImportError:  # built without a compiler or the lz4/zstd headers
    native = None

if os.environ.get("CI") and native is None:
    raise RuntimeError(
        "the native ZFile decoder is not built; CI must test it (scripts/setup.sh installs "
        "gcc, liblz4-dev and libzstd-dev before pip builds it)"
    )

pytestmark = pytest.mark.skipif(
    native is None,
    reason="native ZFile decoder not built (needs gcc, liblz4-dev and libzstd-dev, then "
    "pip install -e .); the pure-Python loop is tested by test_zfile.py",
)

PATHS = ["native", "python"]


@pytest.fixture(params=PATHS)
def block_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test through the C loop and through the Python loop."""
    monkeypatch.setattr(zfile, "native", native if request.param == "native" else None)
    return request.param


# ---------------------------------------------------------------------------------------------
# CRC32C


def test_crc_implementation_is_reported() -> None:
    assert native.CRC32C_IMPLEMENTATION in {"sse4.2", "armv8-crc", "table"}


@pytest.mark.parametrize("portable", [False, True])
def test_crc_matches_the_reference_on_known_values(portable: bool) -> None:
    # The library form of CRC32C("123456789") is 0xE3069283; the raw form from seed
    # 0xFFFFFFFF, inverted at the end, must give the same.
    assert native.crc32c(b"123456789", 0xFFFFFFFF, portable=portable) ^ 0xFFFFFFFF == 0xE3069283
    assert native.crc32c(b"", 1234, portable=portable) == 1234
    assert native.crc32c(b"abc", portable=portable) == crc32c_raw(b"abc")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=5000), st.integers(0, 0xFFFFFFFF), st.integers(0, 15))
def test_crc_equals_crc32c_raw(data: bytes, seed: int, skip: int) -> None:
    view = memoryview(data)[skip:]  # unaligned starts too
    expected = crc32c_raw(view, seed)
    assert native.crc32c(view, seed) == expected
    assert native.crc32c(view, seed, portable=True) == expected


def test_crc_on_large_random_buffers() -> None:
    # Sizes around the 3 x 256 and 3 x 4096 byte stretches of the interleaved hardware loop.
    rng = random.Random(7)
    for size in (767, 768, 769, 12287, 12288, 12289, 13063, 65536, 1 << 20):
        data = rng.randbytes(size)
        expected = crc32c_raw(data, SEED_BLOCK)
        assert native.crc32c(data, SEED_BLOCK) == native.crc32c(data, SEED_BLOCK, True) == expected


# ---------------------------------------------------------------------------------------------
# The functions themselves


def blocks_of(blob: bytes) -> tuple[ZFileReader, np.ndarray]:
    reader = ZFileReader(BytesFile(blob))
    return reader, reader.block_offsets()


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
@pytest.mark.parametrize("bounds_as", ["numpy", "list", "relative"])
def test_decode_blocks_writes_each_block_at_its_place(algorithm: str, bounds_as: str) -> None:
    data = sample_data(5 * 4096 + 123)
    blob = make_zfile(data, algorithm=algorithm)
    _, offsets = blocks_of(blob)
    raw = blob[int(offsets[0]) : int(offsets[-1])]
    bounds: object = {
        "numpy": offsets,
        "list": offsets.tolist(),
        "relative": (offsets - offsets[0]).tolist(),
    }[bounds_as]
    out = bytearray(len(data) + 10)
    algo = zfile.ALGORITHMS[algorithm]
    assert native.decode_blocks(raw, bounds, 4096, 123, algo, 4, True, out) is None
    assert out[: len(data)] == data and out[len(data) :] == bytes(10)


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_read_range_returns_the_slice(algorithm: str) -> None:
    data = sample_data(6 * 4096)
    blob = make_zfile(data, algorithm=algorithm, verify=False)
    _, offsets = blocks_of(blob)
    algo = zfile.ALGORITHMS[algorithm]
    for first, last, head, length in [(0, 5, 0, 6 * 4096), (1, 3, 100, 2 * 4096), (2, 2, 7, 1)]:
        raw = blob[int(offsets[first]) : int(offsets[last + 1])]
        bounds = offsets[first : last + 2]
        got = native.read_range(raw, bounds, 4096, 4096, algo, 0, False, head, length)
        start = first * 4096 + head
        assert got == data[start : start + length]


def test_failures_are_described_not_raised() -> None:
    data = sample_data(4 * 4096)
    blob = bytearray(make_zfile(data))
    _, offsets = blocks_of(bytes(blob))
    blob[int(offsets[2]) + 3] ^= 1
    raw = bytes(blob[int(offsets[0]) : int(offsets[-1])])
    out = bytearray(len(data))

    failure = native.decode_blocks(raw, offsets, 4096, 4096, 1, 4, True, out)
    position, kind, stored, computed, _detail = failure
    payload = raw[int(offsets[2] - offsets[0]) : int(offsets[3] - offsets[0]) - 4]
    assert (position, kind) == (2, "crc")
    assert computed == crc32c_raw(payload, SEED_BLOCK) != stored
    assert out[: 2 * 4096] == data[: 2 * 4096]  # the good blocks before it were written

    # Without the CRC check the damaged block decodes to something or fails to decode.
    failure = native.decode_blocks(raw, offsets, 4096, 4096, 1, 4, False, out)
    assert failure is None or failure[:2] == (2, "decompress")


def test_misuse_raises() -> None:
    blob = make_zfile(sample_data(2 * 4096))
    _, offsets = blocks_of(blob)
    raw = blob[int(offsets[0]) : int(offsets[-1])]
    out = bytearray(2 * 4096)
    args = (raw, offsets, 4096, 4096, 1, 4, True)
    with pytest.raises(ValueError, match="out holds 100 bytes"):
        native.decode_blocks(*args, bytearray(100))
    with pytest.raises(ValueError, match="raw holds"):
        native.decode_blocks(raw[:-1], *args[1:], out)
    with pytest.raises(ValueError, match="algo must be"):
        native.decode_blocks(raw, offsets, 4096, 4096, 0, 4, True, out)
    with pytest.raises(ValueError, match="crc_size"):
        native.decode_blocks(raw, offsets, 4096, 4096, 1, 2, True, out)
    with pytest.raises(ValueError, match="at least two offsets"):
        native.decode_blocks(raw, offsets[:1], 4096, 4096, 1, 4, True, out)
    with pytest.raises(ValueError, match="too short for its CRC"):
        native.decode_blocks(raw, offsets[::-1].copy(), 4096, 4096, 1, 4, True, out)
    with pytest.raises(TypeError, match="u64"):
        native.decode_blocks(raw, offsets.astype(np.uint32), 4096, 4096, 1, 4, True, out)
    with pytest.raises(BufferError, match="not writable"):
        native.decode_blocks(*args, bytes(2 * 4096))
    with pytest.raises(ValueError, match="do not fit"):
        native.read_range(*args, 4000, 5000)


# ---------------------------------------------------------------------------------------------
# Through the reader: same data and same errors on both loops


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
@pytest.mark.parametrize("block_size", [4096, 65536])
def test_both_loops_read_the_same(algorithm: str, block_size: int, block_loop: str) -> None:
    data = sample_data(5 * block_size + 777, seed=3)
    reader = ZFileReader(BytesFile(make_zfile(data, algorithm=algorithm, block_size=block_size)))
    rng = random.Random(block_size)
    assert reader.pread(0, len(data) + 1) == data
    for _ in range(100):
        offset, length = rng.randrange(len(data)), rng.randrange(1, 3 * block_size)
        assert reader.pread(offset, length) == data[offset : offset + length]


def test_flipped_byte_names_the_block(block_loop: str) -> None:
    data = sample_data(6 * 4096)
    blob = bytearray(make_zfile(data, algorithm="zstd"))
    _, offsets = blocks_of(bytes(blob))
    start = int(offsets[3])
    blob[start + 9] ^= 0x10
    reader = ZFileReader(BytesFile(bytes(blob), "flip.zfile"))
    assert reader.pread(0, 3 * 4096) == data[: 3 * 4096]
    with pytest.raises(
        ChecksumError,
        match=rf"flip.zfile: ZFile block 3 at offset {start}: CRC mismatch: "
        r"stored 0x[0-9a-f]{8}, computed 0x[0-9a-f]{8} over \d+ compressed bytes",
    ):
        reader.pread(2 * 4096 + 5, 3 * 4096)


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_undecodable_block_without_crc(algorithm: str, block_loop: str) -> None:
    blob = bytearray(make_zfile(sample_data(3 * 4096), algorithm=algorithm, verify=False))
    _, offsets = blocks_of(bytes(blob))
    start, stop = int(offsets[1]), int(offsets[2])
    blob[start:stop] = b"\xff" * (stop - start)
    reader = ZFileReader(BytesFile(bytes(blob), "junk.zfile"))
    with pytest.raises(
        CorruptFileError,
        match=rf"junk.zfile: ZFile block 1 at offset {start} .{algorithm}. does not decompress",
    ):
        reader.pread(0, 3 * 4096)


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_block_of_the_wrong_length(algorithm: str, block_loop: str) -> None:
    # A well-formed block (CRC and all) that decompresses to 100 bytes instead of 4096.
    short = (
        lz4.block.compress(b"x" * 100, store_size=False)
        if algorithm == "lz4"
        else zstandard.ZstdCompressor().compress(b"x" * 100)
    )
    out = io.BytesIO()
    writer = ZFileWriter(out, algorithm=algorithm)
    compress = writer._compress
    writer._compress = lambda block: short if block[:1] == b"B" else compress(block)
    writer.write(b"A" * 4096 + b"B" * 4096 + b"C" * 4096)
    writer.close()
    reader = ZFileReader(BytesFile(out.getvalue(), "short.zfile"))
    start = int(reader.block_offsets()[1])
    with pytest.raises(
        CorruptFileError,
        match=rf"block 1 at offset {start} .{algorithm}. decompresses to 100 bytes, not 4096",
    ):
        reader.pread(4000, 200)


def test_file_cut_short_after_opening(block_loop: str) -> None:
    data = sample_data(4 * 4096)
    blob = make_zfile(data)
    source = BytesFile(blob, "shrunk.zfile")
    reader = ZFileReader(source)
    cut = int(reader.block_offsets()[3]) + 10
    source._data = blob[:cut]  # the file shrank under the open reader
    assert reader.pread(0, 3 * 4096) == data[: 3 * 4096]
    with pytest.raises(CorruptFileError, match=r"blocks 2..3 at offset \d+: wanted .* cut short"):
        reader.pread(2 * 4096, 2 * 4096)


def test_tracing_uses_the_python_loop() -> None:
    from workbench.tracing import recording

    data = sample_data(3 * 4096)
    reader = ZFileReader(BytesFile(make_zfile(data)))
    with recording() as recorder:
        assert reader.pread(0, len(data)) == data
    assert [e.op for e in recorder.events] == ["block"] * 3 + ["read"]


# ---------------------------------------------------------------------------------------------
# Threads


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_eight_threads_share_a_reader(algorithm: str) -> None:
    data = sample_data(128 * 4096, seed=9)
    reader = ZFileReader(BytesFile(make_zfile(data, algorithm=algorithm)))
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            offset, length = rng.randrange(len(data)), rng.randrange(1, 200_000)
            if reader.pread(offset, length) != data[offset : offset + length]:
                failures.append(f"thread {seed}: {offset}+{length}")

    for _round in range(3):  # threads end and start again: contexts are freed and made anew
        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []


def test_missing_extension_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import workbench.formats

    monkeypatch.delattr(workbench.formats, "_zfile_native", raising=False)
    monkeypatch.setitem(sys.modules, "workbench.formats._zfile_native", None)
    assert zfile._load_native() is None


def test_pure_python_switch_in_the_environment() -> None:
    import subprocess
    import sys

    code = "from workbench.formats import zfile; print(zfile.native is None)"
    env = {**os.environ, "WORKBENCH_PURE_PYTHON": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "True", done.stderr


# ---------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=60, deadline=None)
@given(
    st.binary(max_size=40000),
    st.sampled_from(["lz4", "zstd"]),
    st.sampled_from([4096, 8192]),
    st.booleans(),
    st.integers(0, 40000),
    st.integers(1, 40000),
)
def test_random_round_trips_agree(
    data: bytes, algorithm: str, block_size: int, verify: bool, offset: int, length: int
) -> None:
    blob = make_zfile(data, algorithm=algorithm, block_size=block_size, verify=verify)
    reader = ZFileReader(BytesFile(blob))
    expected = data[offset : offset + length]
    original = zfile.native
    try:
        zfile.native = native
        fast = reader.pread(offset, length)
        zfile.native = None
        slow = reader.pread(offset, length)
    finally:
        zfile.native = original
    assert fast == slow == expected


def test_reader_hands_the_whole_range_to_the_native_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []

    class Spy:
        def read_range(self, *args: object) -> object:
            calls.append(args[2:])
            return native.read_range(*args)

    data = sample_data(5 * 4096 + 10)
    reader = ZFileReader(BytesFile(make_zfile(data, algorithm="zstd")))
    monkeypatch.setattr(zfile, "native", Spy())
    assert reader.pread(4196, 3 * 4096) == data[4196 : 4196 + 3 * 4096]
    assert reader.pread(5 * 4096, 100) == data[5 * 4096 :]
    assert calls == [(4096, 4096, 2, 4, True, 100, 3 * 4096), (4096, 10, 2, 4, True, 0, 10)]
