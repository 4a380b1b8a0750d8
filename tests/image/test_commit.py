"""Commit: byte-identical to overlaybd-commit and overlaybd-merge; a model-checked round trip."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import TESTDATA, needs_testdata

from workbench.errors import FormatError
from workbench.formats.lsmt import HT_SPACE, LsmtHeader, SegmentIndex
from workbench.formats.zfile import ZFileReader
from workbench.image.commit import commit_writable, compact, import_raw, merge_neighbours
from workbench.image.layer import ReadOnlyLayer
from workbench.image.writable import WritableLayer

KiB, MiB = 1 << 10, 1 << 20


def layer_info(number: int) -> dict:
    return json.loads((TESTDATA / "manifest.json").read_text())["layers"][number - 1]


def open_rw_copy(tmp_path: Path, number: int) -> WritableLayer:
    paths = []
    for suffix in ("data", "index"):
        target = tmp_path / f"layer{number}.rw.{suffix}"
        shutil.copyfile(TESTDATA / f"layer{number}.rw.{suffix}", target)
        paths.append(target)
    return WritableLayer.open(*paths)


def commit_like_testdata(tmp_path: Path, number: int, **options: object) -> Path:
    """Commit layerN.rw with the identity overlaybd-commit was given for layerN.lsmt."""
    info = layer_info(number)
    out = tmp_path / f"out{number}"
    with open_rw_copy(tmp_path, number) as rw:
        commit_writable(
            rw,
            out,
            uuid=info["uuid"],
            parent_uuid=info["parent_uuid"],
            message=f"layer{number}",
            **options,
        )
    return out


# ---------------------------------------------------------------------------------------------
# Compatibility with OverlayBD's tools


@needs_testdata
@pytest.mark.parametrize("number", [1, 2])
def test_commit_is_byte_identical_to_overlaybd_commit(tmp_path: Path, number: int) -> None:
    reference = TESTDATA / f"layer{number}.lsmt"
    assert LsmtHeader.unpack(reference.read_bytes()[:HT_SPACE]).message == f"layer{number}"

    out = commit_like_testdata(tmp_path, number)

    assert out.read_bytes() == reference.read_bytes()
    assert not out.with_name(out.name + ".tmp").exists()


@needs_testdata
@pytest.mark.parametrize("number", [1, 2])
@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_compressed_commit_holds_the_overlaybd_layer(
    tmp_path: Path, number: int, algorithm: str
) -> None:
    """The ZFile content equals layerN.lsmt and its header fields match overlaybd-commit -z.

    The compressed bytes themselves differ: OverlayBD's lz4/zstd builds compress some blocks
    differently from the Python bindings (checked here, not assumed).
    """
    reference = TESTDATA / f"layer{number}.commit-z.{algorithm}.zfile"

    out = commit_like_testdata(tmp_path, number, compress=algorithm)

    with _zfile(out) as ours:
        assert ours.pread(0, ours.size) == (TESTDATA / f"layer{number}.lsmt").read_bytes()
        with _zfile(reference) as theirs:
            for field in ("flags", "index_size", "original_file_size", "block_size", "algo"):
                assert getattr(ours.header, field) == getattr(theirs.header, field), field
            assert ours.header.verify == theirs.header.verify == 1
    assert (out.read_bytes() == reference.read_bytes()) is False  # see the docstring


def _zfile(path: Path) -> ZFileReader:
    from workbench.blobs.common import LocalFile

    return ZFileReader(LocalFile(path))


@needs_testdata
def test_tar_wrapped_commit_opens_as_a_layer(tmp_path: Path) -> None:
    out = commit_like_testdata(tmp_path, 1, compress="zstd", tar=True, block_size=32 * KiB)

    with ReadOnlyLayer.open(out) as layer:
        assert layer.wrapping == ("tar", "zfile")
        assert layer.file.pread(0, layer.file.size) == (TESTDATA / "layer1.lsmt").read_bytes()


@needs_testdata
def test_compact_of_a_merged_index_is_byte_identical_to_overlaybd_merge() -> None:
    # layer12.segments.txt is OverlayBD's merged index: tag 0 = layer2 (top), 1 = layer1.
    text = (TESTDATA / "layer12.segments.txt").read_text()
    rows = [[int(v) for v in re.findall(r"=(\d+)", line)] for line in text.splitlines()]
    fields = np.array([row for row in rows if len(row) == 5])
    index = SegmentIndex.from_fields(
        fields[:, 0], fields[:, 1], fields[:, 2], fields[:, 3].astype(bool), fields[:, 4]
    )
    header = LsmtHeader(flags=0, virtual_size=64 * MiB)
    out = io.BytesIO()

    with (
        ReadOnlyLayer.open(TESTDATA / "layer2.lsmt") as top,
        ReadOnlyLayer.open(TESTDATA / "layer1.lsmt") as bottom,
    ):
        compact([top, bottom], index, out, header)

    assert out.getvalue() == (TESTDATA / "merged12.lsmt").read_bytes()


# ---------------------------------------------------------------------------------------------
# The merge rule


def test_neighbours_merge_only_below_16383_sectors() -> None:
    index = SegmentIndex.from_fields(
        offset=[0, 8000, 16000, 16382],
        length=[8000, 8000, 382, 1],
        moffset=[8, 8008, 16008, 16390],
    )

    merged = merge_neighbours(index)

    # 8000 + 8000 + 382 = 16382 < 16383 merges; one more sector would reach 16383: no.
    assert merged.length.tolist() == [16382, 1]
    assert merged.moffset.tolist() == [8, 16390]


def test_neighbours_of_different_kind_or_tag_stay_apart() -> None:
    index = SegmentIndex.from_fields(
        offset=[0, 10, 20, 30, 40],
        length=[10, 10, 10, 10, 10],
        moffset=[8, 18, 28, 28, 28],
        zeroed=[False, False, False, True, True],
        tag=[0, 1, 1, 0, 0],
    )

    merged = merge_neighbours(index)

    assert merged.offset.tolist() == [0, 10, 30]
    assert merged.length.tolist() == [10, 20, 20]


def test_a_commit_message_longer_than_the_user_tag_is_refused(tmp_path: Path) -> None:
    with (
        WritableLayer.create(tmp_path / "d", tmp_path / "i", MiB) as rw,
        pytest.raises(FormatError, match="commit message is 257 bytes"),
    ):
        commit_writable(rw, tmp_path / "out", message="x" * 257)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.tmp").exists()


# ---------------------------------------------------------------------------------------------
# Import of raw images


def test_import_raw_leaves_out_zero_blocks(tmp_path: Path) -> None:
    raw = bytearray(3 * MiB + 700)  # not a multiple of 512: the last sector is padded
    raw[4096:8192] = b"\x01" * 4096
    raw[MiB + 100 : MiB + 101] = b"\x02"
    raw[-10:] = b"\x03" * 10
    (tmp_path / "disk.img").write_bytes(raw)

    import_raw(tmp_path / "disk.img", tmp_path / "disk.lsmt", message="imported")

    with ReadOnlyLayer.open(tmp_path / "disk.lsmt") as layer:
        assert layer.virtual_size == 3 * MiB + 1024
        assert layer.message == "imported"
        assert layer.pread(0, layer.virtual_size) == raw + bytes(1024 - 700)
        assert layer.index.offset.tolist() == [8, 2048, 6144]
        assert layer.index.length.tolist() == [8, 8, 2]


def test_import_raw_splits_long_extents(tmp_path: Path) -> None:
    raw = np.random.default_rng(1).integers(1, 256, 9 * MiB, np.uint8).tobytes()
    (tmp_path / "disk.img").write_bytes(raw)

    import_raw(tmp_path / "disk.img", tmp_path / "disk.lsmt", compress="lz4")

    with ReadOnlyLayer.open(tmp_path / "disk.lsmt") as layer:
        assert layer.index.length.tolist() == [16383, 18432 - 16383]
        assert layer.pread(0, 9 * MiB) == raw


# ---------------------------------------------------------------------------------------------
# Model check: writable layer -> reopen -> commit -> read-only layer

SECTORS = 256  # a 128 KiB disk keeps examples small and overlaps frequent


operations = st.lists(
    st.tuples(
        st.sampled_from(["write", "write", "trim"]),
        st.integers(0, SECTORS - 1),
        st.integers(1, 64),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=operations, sparse=st.booleans())
def test_writable_layer_matches_a_bytearray_model(
    tmp_path_factory: pytest.TempPathFactory, ops: list, sparse: bool
) -> None:
    directory = tmp_path_factory.mktemp("model")
    data_path, index_path = directory / "data", directory / "index"
    size = SECTORS * 512
    model = bytearray(size)

    with WritableLayer.create(data_path, index_path, size, sparse=sparse) as rw:
        for step, (op, first, count, fill) in enumerate(ops):
            count = min(count, SECTORS - first)
            start, stop = first * 512, (first + count) * 512
            if op == "write":
                data = bytes([fill, step & 0xFF]) * ((stop - start) // 2)
                rw.pwrite(start, data)
                model[start:stop] = data
            else:
                rw.trim(start, stop - start)
                model[start:stop] = bytes(stop - start)
            assert rw.pread(0, size) == model
        rw.flush()

    with WritableLayer.open(data_path, index_path) as rw:
        assert rw.pread(0, size) == model
        commit_writable(rw, directory / "out.lsmt")

    with ReadOnlyLayer.open(directory / "out.lsmt") as committed:
        assert committed.pread(0, size) == model
        assert committed.virtual_size == size
