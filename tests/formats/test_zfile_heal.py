"""ZFile healing: a bad block is evicted from a source that can `evict` and read again."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from samples import make_zfile, sample_data

from workbench.blobs.common import BytesFile, LocalFile
from workbench.errors import ChecksumError, CorruptFileError
from workbench.formats import zfile
from workbench.formats.tar import TarPayload, TarWriter
from workbench.formats.zfile import READ_ATTEMPTS, ZFileReader
from workbench.tracing import recording

BLOCK = 4096
BAD_BLOCK = 2


class FlakySource:
    """A ZFile whose block `bad_block` reads corrupt until it has been evicted `heal_after`
    times (never, if None), as a cache over a registry that sent bad bytes would."""

    def __init__(self, data: bytes, bad_at: int, heal_after: int | None, damage: str = "flip"):
        self.name = "flaky.zfile"
        self._data = data
        self.bad_at = bad_at
        self.heal_after = heal_after
        self.damage = damage
        self.bad_end = bad_at + 1
        self.corrupt = True
        self.evictions: list[tuple[int, int]] = []
        self.reads = 0

    @property
    def size(self) -> int:
        return len(self._data)

    def pread(self, offset: int, length: int) -> bytes:
        self.reads += 1
        data = bytearray(self._data[offset : offset + length])
        if self.corrupt and offset <= self.bad_at < offset + len(data):
            if self.damage == "flip":
                data[self.bad_at - offset] ^= 0xFF
            else:  # the block's compressed bytes replaced by 0xFF, its CRC left alone
                data[self.bad_at - offset : self.bad_end - offset] = b"\xff" * (
                    self.bad_end - self.bad_at
                )
        return bytes(data)

    def evict(self, offset: int, length: int) -> None:
        self.evictions.append((offset, length))
        healed = self.heal_after is not None and len(self.evictions) >= self.heal_after
        if healed and offset <= self.bad_at < offset + length:
            self.corrupt = False

    def close(self) -> None:
        pass


class Unevictable(FlakySource):
    evict = None  # type: ignore[assignment]  # the capability is absent


@pytest.fixture(params=["native", "python"])
def loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run each test with the C block loop (if built) and with the pure-Python one."""
    if request.param == "native" and zfile.native is None:
        pytest.skip("the native ZFile decoder is not built")
    if request.param == "python":
        monkeypatch.setattr(zfile, "native", None)
    yield request.param


@pytest.fixture(scope="module")
def content() -> bytes:
    return sample_data(8 * BLOCK + 123)


@pytest.fixture(scope="module")
def compressed(content: bytes) -> bytes:
    return make_zfile(content, block_size=BLOCK)


def bad_block_range(compressed: bytes) -> tuple[int, int]:
    reader = ZFileReader(BytesFile(compressed))
    starts = reader.block_offsets()
    return int(starts[BAD_BLOCK]), int(starts[BAD_BLOCK + 1])


def test_a_block_corrupt_once_is_evicted_and_read_again(
    loop: str, content: bytes, compressed: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    start, end = bad_block_range(compressed)
    source = FlakySource(compressed, bad_at=start + 3, heal_after=1)
    reader = ZFileReader(source)

    with caplog.at_level(logging.WARNING, logger="workbench.formats.zfile"):
        data = reader.pread(0, reader.size)

    assert data == content
    assert source.evictions == [(start, end - start)]
    assert len(caplog.records) == 1
    assert f"flaky.zfile: ZFile block {BAD_BLOCK} at offset {start}" in caplog.text


def test_a_block_that_stays_corrupt_fails_after_three_attempts(
    loop: str, compressed: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    start, end = bad_block_range(compressed)
    source = FlakySource(compressed, bad_at=start + 3, heal_after=None)
    reader = ZFileReader(source)

    with (
        caplog.at_level(logging.WARNING, logger="workbench.formats.zfile"),
        pytest.raises(
            ChecksumError,
            match=rf"block {BAD_BLOCK} at offset {start}: CRC mismatch.*"
            rf"still wrong after {READ_ATTEMPTS} attempts",
        ),
    ):
        reader.pread(BAD_BLOCK * BLOCK, BLOCK)

    # Evicted after every failure, the last one included: nothing wrong stays cached.
    assert READ_ATTEMPTS == 3
    assert source.evictions == [(start, end - start)] * READ_ATTEMPTS
    assert len(caplog.records) == READ_ATTEMPTS


def test_without_evict_a_bad_block_fails_at_once(loop: str, compressed: bytes) -> None:
    start, _ = bad_block_range(compressed)
    source = Unevictable(compressed, bad_at=start + 3, heal_after=1)
    reader = ZFileReader(source)
    reads_to_open = source.reads

    with pytest.raises(ChecksumError, match=r"fetch or copy it again$"):
        reader.pread(0, reader.size)

    assert source.reads == reads_to_open + 1
    assert source.evictions == []


def test_a_block_that_does_not_decompress_is_healed_too(loop: str, content: bytes) -> None:
    compressed = make_zfile(content, block_size=BLOCK, verify=False)
    start, end = bad_block_range(compressed)
    source = FlakySource(compressed, bad_at=start, heal_after=1, damage="garbage")
    source.bad_end = end
    reader = ZFileReader(source)

    assert reader.pread(0, reader.size) == content
    assert source.evictions == [(start, end - start)]


def test_a_block_that_never_decompresses_fails_with_a_block_error(
    loop: str, content: bytes
) -> None:
    compressed = make_zfile(content, block_size=BLOCK, verify=False)
    start, end = bad_block_range(compressed)
    source = FlakySource(compressed, bad_at=start, heal_after=None, damage="garbage")
    source.bad_end = end
    reader = ZFileReader(source)

    with pytest.raises(CorruptFileError, match=rf"block {BAD_BLOCK} .*after 3 attempts"):
        reader.pread(0, reader.size)


def test_each_eviction_is_traced(compressed: bytes, content: bytes) -> None:
    start, end = bad_block_range(compressed)
    source = FlakySource(compressed, bad_at=start + 3, heal_after=2)
    reader = ZFileReader(source)

    with recording() as recorder:
        assert reader.pread(0, reader.size) == content

    evictions = [event for event in recorder.events if event.op == "evict"]
    assert [(e.layer, e.target, e.offset, e.length) for e in evictions] == [
        ("zfile", "flaky.zfile", start, end - start)
    ] * 2


def test_a_tar_payload_forwards_evict_with_its_offset(compressed: bytes, content: bytes) -> None:
    import io

    out = io.BytesIO()
    tar = TarWriter(out)
    tar.write(compressed)
    tar.close()
    wrapped = out.getvalue()
    payload_at = wrapped.index(compressed[:64])
    start, end = bad_block_range(compressed)
    source = FlakySource(wrapped, bad_at=payload_at + start + 3, heal_after=1)

    reader = ZFileReader(TarPayload(source))

    assert reader.pread(0, reader.size) == content
    assert source.evictions == [(payload_at + start, end - start)]


def test_a_tar_payload_over_a_local_file_cannot_evict(tmp_path, compressed: bytes) -> None:
    path = tmp_path / "layer.tar"
    with open(path, "wb") as out:
        tar = TarWriter(out)
        tar.write(compressed)
        tar.close()

    with LocalFile(path) as source:
        assert getattr(TarPayload(source), "evict", None) is None
