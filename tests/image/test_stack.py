"""Tests of the layer stack (the merged disk) and of opening an image from its config."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from reference import TESTDATA, needs_testdata
from reference import manifest as load_manifest

from workbench.errors import AlignmentError, ImageConfigError, LayerStackError, ReadOnlyError
from workbench.formats.lsmt import NULL_UUID, LsmtHeader, SegmentIndex
from workbench.image.commit import commit_writable
from workbench.image.layer import ReadOnlyLayer
from workbench.image.open import open_image, write_result
from workbench.image.stack import LayerStack
from workbench.image.writable import WritableLayer
from workbench.tracing import recording

MiB = 1 << 20


@pytest.fixture(scope="module")
def manifest() -> dict:
    return load_manifest()


def stack_hashes(stack: LayerStack) -> list[str]:
    """The manifest's chunk hashes of a stack, read 1 MiB at a time through `pread`."""
    assert stack.size % MiB == 0
    return [hashlib.sha256(stack.pread(i * MiB, MiB)).hexdigest() for i in range(stack.size // MiB)]


def open_stack(*names: str, **kwargs: object) -> LayerStack:
    return LayerStack([ReadOnlyLayer.open(TESTDATA / name) for name in names], **kwargs)


# ---------------------------------------------------------------------------------------------
# Reading back OverlayBD's images

VARIANTS = [
    ("layer1.lsmt", "layer2.lsmt"),
    ("layer1.lz4.crc.zfile", "layer2.zstd.crc.zfile"),
    ("layer1.zstd.crc.zfile", "layer2.lz4.crc.zfile"),
    ("layer1.commit-z.lz4.zfile", "layer2.commit-z.zstd.zfile"),
    ("layer1.lz4.bs32k.crc.zfile", "layer2.lz4.bs32k.crc.zfile"),
    ("layer1.lz4.nocrc.zfile", "layer2.lsmt"),
]


@needs_testdata
@pytest.mark.parametrize(("lower", "upper"), VARIANTS, ids=lambda name: name)
def test_two_layer_stack_reads_back_to_the_manifest(manifest: dict, lower: str, upper: str) -> None:
    with open_stack(lower, upper) as stack:
        assert stack.size == manifest["virtual_size"]
        assert stack_hashes(stack) == manifest["expected"]["merged_layer1_layer2"]["chunk_sha256"]


@needs_testdata
@pytest.mark.parametrize(
    "name", ["layer1.lsmt", "layer1.zstd.nocrc.zfile", "layer1.lz4.bs64k.crc.zfile"]
)
def test_layer1_alone_reads_back_to_the_manifest(manifest: dict, name: str) -> None:
    with open_stack(name) as stack:
        assert stack_hashes(stack) == manifest["expected"]["layer1_only"]["chunk_sha256"]


@needs_testdata
@pytest.mark.parametrize("name", ["merged12.lsmt", "merged12.zfile"])
def test_merged_layer_equals_the_two_layer_stack(manifest: dict, name: str) -> None:
    with open_stack(name) as stack:
        assert stack_hashes(stack) == manifest["expected"]["merged_layer1_layer2"]["chunk_sha256"]


@needs_testdata
def test_compacting_the_merged_index_rebuilds_overlaybd_merge_output() -> None:
    """merge_indexes + compact of layers 1 and 2 gives merged12.lsmt byte for byte."""
    from workbench.image.commit import compact

    with open_stack("layer1.lsmt", "layer2.lsmt") as stack:
        sources = [stack.layer_for_tag(tag) for tag in range(len(stack.lowers))]
        header = LsmtHeader(flags=0, virtual_size=stack.size)
        out = io.BytesIO()
        compact(sources, stack.ro_index, out, header)
    assert out.getvalue() == (TESTDATA / "merged12.lsmt").read_bytes()


# ---------------------------------------------------------------------------------------------
# The pread contract


@needs_testdata
def test_unaligned_reads_are_refused() -> None:
    with open_stack("layer1.lsmt") as stack:
        with pytest.raises(
            AlignmentError, match=r"offset 100, length 512: LSMT I/O must be aligned"
        ):
            stack.pread(100, 512)
        with pytest.raises(AlignmentError, match=r"offset 0, length 1000: .*512-byte sectors"):
            stack.pread(0, 1000)


@needs_testdata
def test_reads_past_the_end_are_short() -> None:
    with open_stack("layer1.lsmt") as stack:
        end = stack.size
        assert len(stack.pread(end - 1024, 4096)) == 1024
        assert stack.pread(end, 512) == b""
        assert stack.pread(end + 4096, 512) == b""
        assert stack.pread(0, 0) == b""


@needs_testdata
def test_trimmed_ranges_read_as_zeros_over_lower_data(manifest: dict) -> None:
    """layer2 trims [12 MiB, 12.5 MiB), where layer1 wrote text."""
    with open_stack("layer1.lsmt") as below, open_stack("layer1.lsmt", "layer2.lsmt") as stack:
        assert below.pread(12 * MiB, 4096) != bytes(4096)
        assert stack.pread(12 * MiB, 512 * 1024) == bytes(512 * 1024)


class FakeLayer:
    """A layer over an in-memory file, counting `read_data` calls."""

    def __init__(
        self,
        entries: list[tuple[int, int, int, bool]],
        name: str = "fake",
        virtual_size: int = 1 * MiB,
        uuid: str = NULL_UUID,
        parent_uuid: str = NULL_UUID,
    ) -> None:
        offset, length, moffset, zeroed = zip(*entries, strict=True) if entries else ([],) * 4
        self.index = SegmentIndex.from_fields(offset, length, moffset, zeroed)
        self.name = name
        self.virtual_size = virtual_size
        self.uuid = uuid
        self.parent_uuid = parent_uuid
        self.calls: list[tuple[int, int]] = []
        self.closed = False

    def read_data(self, moffset: int, length: int) -> bytes:
        self.calls.append((moffset, length))
        return b"".join(
            (sector % 251 + 1).to_bytes(1, "little") * 512
            for sector in range(moffset, moffset + length)
        )

    def close(self) -> None:
        self.closed = True


def test_adjacent_segments_of_one_layer_are_read_in_one_call() -> None:
    bottom = FakeLayer([(0, 64, 8, False)], name="bottom")
    top = FakeLayer([(0, 8, 100, False), (8, 8, 108, False), (16, 8, 300, False)], name="top")
    stack = LayerStack([bottom, top])
    data = stack.pread(0, 64 * 512)

    assert top.calls == [(100, 16), (300, 8)]
    assert bottom.calls == [(8 + 24, 40)]
    assert data[: 16 * 512] == top.read_data(100, 16)
    assert data[24 * 512 :] == bottom.read_data(32, 40)


def test_more_than_255_lowers_are_refused() -> None:
    layers = [FakeLayer([]) for _ in range(256)]
    with pytest.raises(LayerStackError, match=r"a stack of 256 read-only layers; .* at most 255"):
        LayerStack(layers)
    assert len(LayerStack(layers[:255]).lowers) == 255


def test_size_is_the_topmost_nonzero_virtual_size() -> None:
    stack = LayerStack([FakeLayer([], virtual_size=4 * MiB), FakeLayer([], virtual_size=0)])
    assert stack.size == 4 * MiB
    assert LayerStack([]).size == 0


def test_close_closes_every_layer() -> None:
    layers = [FakeLayer([]), FakeLayer([])]
    with LayerStack(layers):
        pass
    assert all(layer.closed for layer in layers)


def test_writes_without_a_writable_layer_are_refused() -> None:
    stack = LayerStack([FakeLayer([])])
    with pytest.raises(ReadOnlyError, match=r"no writable layer; open it with a writable layer"):
        stack.pwrite(0, bytes(512))
    with pytest.raises(ReadOnlyError, match=r"cannot trim"):
        stack.trim(0, 512)
    stack.flush()


# ---------------------------------------------------------------------------------------------
# The uuid chain


@needs_testdata
def test_uuid_chain_of_the_testdata_holds() -> None:
    with open_stack("layer1.lsmt", "layer2.lsmt", check_uuid_chain=True) as stack:
        stack.check_chain()


@needs_testdata
def test_broken_uuid_chain_names_the_first_mismatch() -> None:
    stack = open_stack("layer2.lsmt", "layer1.lsmt")
    with stack, pytest.raises(LayerStackError, match=r"layer .*layer1\.lsmt has parent_uuid 0000"):
        stack.check_chain()
    with pytest.raises(LayerStackError, match=r"broken uuid chain"):
        open_stack("layer2.lsmt", "layer1.lsmt", check_uuid_chain=True)


# ---------------------------------------------------------------------------------------------
# Inspection and tracing


@needs_testdata
def test_segments_table_shows_layers_and_gaps() -> None:
    with open_stack("layer1.lsmt", "layer2.lsmt") as stack:
        table = stack.segments()
        assert table["length"].sum() == stack.size
        assert (
            table["offset"].iloc[1:].to_numpy()
            == (table["offset"] + table["length"]).iloc[:-1].to_numpy()
        ).all()
        mapped = table[table["kind"] != "unmapped"]
        assert len(mapped) == 17
        assert set(mapped["layer"].map(lambda name: Path(name).name)) == {
            "layer1.lsmt",
            "layer2.lsmt",
        }

        # layer2 trims [12 MiB, 12.5 MiB): a zeroed segment served by layer2.
        trim = table[table["offset"] == 12 * MiB].iloc[0]
        assert (trim["kind"], Path(trim["layer"]).name, trim["tag"]) == ("zeroed", "layer2.lsmt", 0)

        part = stack.segments(12 * MiB - 4096, 8192)
        assert part["offset"].tolist() == [12 * MiB - 4096, 12 * MiB]
        assert part["length"].tolist() == [4096, 4096]
        assert part["kind"].tolist() == ["data", "zeroed"]


@needs_testdata
def test_a_read_emits_one_read_event_and_one_per_layer_run() -> None:
    with open_stack("layer1.lsmt", "layer2.lsmt") as stack, recording() as recorder:
        stack.pread(0, 2 * MiB)
    events = recorder.to_dataframe()
    image = events[events["layer"] == "image"]

    reads = image[image["op"] == "read"]
    assert reads[["offset", "length", "nbytes"]].values.tolist() == [[0, 2 * MiB, 2 * MiB]]
    runs = image[image["op"] == "segment"]
    assert [Path(t).name for t in runs["target"]] == ["layer1.lsmt", "layer2.lsmt"]
    assert runs[["offset", "length"]].values.tolist() == [[0, 512 * 1024], [512 * 1024, MiB]]
    assert (events[events["layer"] == "lsmt"]["nbytes"].sum()) == runs["nbytes"].sum()


# ---------------------------------------------------------------------------------------------
# A writable layer on top


@needs_testdata
def test_writable_upper_wins_and_its_gaps_show_the_lowers(tmp_path: Path, manifest: dict) -> None:
    lowers = [ReadOnlyLayer.open(TESTDATA / name) for name in ("layer1.lsmt", "layer2.lsmt")]
    upper = WritableLayer.create(
        tmp_path / "data", tmp_path / "index", lowers[-1].virtual_size, lowers[-1].uuid
    )
    with LayerStack(lowers, upper, check_uuid_chain=True) as stack:
        with open_stack("layer1.lsmt", "layer2.lsmt") as reference:
            model = bytearray(reference.pread(0, 16 * MiB))

        rng = np.random.default_rng(7)
        for offset, data in [(4096, rng.bytes(8192)), (12 * MiB + 4096, rng.bytes(512))]:
            assert stack.pwrite(offset, data) == len(data)
            model[offset : offset + len(data)] = data
        stack.trim(0, 1024)
        model[0:1024] = bytes(1024)
        stack.trim(11 * MiB, MiB)
        model[11 * MiB : 12 * MiB] = bytes(MiB)
        stack.flush()

        assert stack.pread(0, 16 * MiB) == bytes(model)
        tags = set(stack.segments()["tag"])
        assert {0, 1, 2} <= tags  # layer2, layer1 and the writable layer all serve ranges
        with pytest.raises(AlignmentError, match="aligned"):
            stack.pwrite(100, b"x" * 512)


@needs_testdata
def test_small_reads_take_the_one_entry_path_and_read_as_the_general_path(tmp_path: Path) -> None:
    # Untraced reads inside one merged entry skip the general path (cutting, joining,
    # copying); traced reads always take the general path. Both must agree everywhere:
    # inside entries, across their ends, over zeroed entries, gaps and the upper's writes.
    lowers = [ReadOnlyLayer.open(TESTDATA / name) for name in ("layer1.lsmt", "layer2.lsmt")]
    upper = WritableLayer.create(tmp_path / "data", tmp_path / "index", lowers[-1].virtual_size)
    rng = np.random.default_rng(11)
    with LayerStack(lowers, upper) as stack:
        stack.pwrite(8 * MiB, rng.bytes(8192))
        stack.trim(9 * MiB, 4096)
        edges = [int(offset) for offset in stack.segments()["offset"] if offset < stack.size]
        offsets = edges + [int(x) * 512 for x in rng.integers(0, stack.size // 512 - 64, 300)]
        offsets += [8 * MiB - 512, 8 * MiB + 4096, 9 * MiB - 512]

        for offset in offsets:
            for length in (512, 4096, 12288):
                length = min(length, stack.size - offset)
                fast = stack.pread(offset, length)
                with recording():
                    general = stack.pread(offset, length)
                assert fast == general, (offset, length)


# ---------------------------------------------------------------------------------------------
# Opening from a config


def write_config(directory: Path, document: dict) -> Path:
    path = directory / "config.v1.json"
    path.write_text(json.dumps(document))
    return path


@needs_testdata
def test_open_image_from_a_config(tmp_path: Path, manifest: dict) -> None:
    (tmp_path / "snap2").mkdir()
    (tmp_path / "snap2" / "overlaybd.commit").symlink_to(TESTDATA / "layer2.lz4.crc.zfile")
    path = write_config(
        tmp_path,
        {
            "repoBlobUrl": "",
            "lowers": [{"file": str(TESTDATA / "layer1.lsmt")}, {"dir": "snap2"}],
            "upper": {},
            "resultFile": "result.txt",
        },
    )
    with open_image(path, report_result=True) as stack:
        assert not stack.writable
        assert stack_hashes(stack) == manifest["expected"]["merged_layer1_layer2"]["chunk_sha256"]
    assert (tmp_path / "result.txt").read_text() == "success"


@needs_testdata
def test_open_image_with_a_writable_layer(tmp_path: Path) -> None:
    WritableLayer.create(tmp_path / "data", tmp_path / "index", 64 * MiB).close()
    path = write_config(
        tmp_path,
        {
            "lowers": [{"file": str(TESTDATA / "layer1.lsmt")}],
            "upper": {"data": "data", "index": "index", "vsize": 0},
        },
    )
    with open_image(path) as stack:
        assert stack.writable
        stack.pwrite(0, b"\xab" * 512)
        stack.flush()
    with open_image(path) as stack:
        assert stack.pread(0, 1024)[:513] == b"\xab" * 512 + stack.lowers[0].pread(512, 512)[:1]
    with open_image(path, writable=False) as stack:
        assert stack.upper is None
        assert stack.pread(0, 512) != b"\xab" * 512


@needs_testdata
def test_open_image_with_a_read_only_upper(tmp_path: Path) -> None:
    with WritableLayer.create(tmp_path / "data", tmp_path / "index", 64 * MiB) as rw:
        rw.pwrite(0, b"\xcd" * 512)
    path = write_config(
        tmp_path,
        {
            "lowers": [{"file": str(TESTDATA / "layer1.lsmt")}],
            "upper": {"data": "data", "index": "index", "vsize": 0},
        },
    )
    files = [tmp_path / "data", tmp_path / "index"]
    before = [(file.read_bytes(), file.stat().st_mtime_ns) for file in files]

    with open_image(path, upper="readonly") as stack:
        assert stack.upper is not None and stack.upper.readonly
        assert not stack.writable
        assert stack.pread(0, 512) == b"\xcd" * 512
        with pytest.raises(ReadOnlyError, match='opened read-only; open the image with upper="wr'):
            stack.pwrite(0, bytes(512))
        with pytest.raises(ReadOnlyError, match="cannot trim"):
            stack.trim(0, 512)
    assert [(file.read_bytes(), file.stat().st_mtime_ns) for file in files] == before

    with open_image(path, upper="none") as stack:
        assert stack.upper is None
    with open_image(path, upper="writable") as stack:
        assert stack.writable
    with pytest.raises(ValueError, match="writable=False contradicts upper='readonly'"):
        open_image(path, writable=False, upper="readonly")
    with pytest.raises(ValueError, match="expected one of none, readonly, writable"):
        open_image(path, upper="rw")  # type: ignore[arg-type]


def test_reads_do_not_rebuild_the_upper_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read path asks the upper for a range (`lookup`), not for its whole index."""
    with WritableLayer.create(tmp_path / "lower", tmp_path / "lower.index", MiB) as rw:
        rw.pwrite(0, b"\x11" * 65536)
        commit_writable(rw, tmp_path / "lower.lsmt")
    upper = WritableLayer.create(tmp_path / "data", tmp_path / "index", MiB)
    with LayerStack([ReadOnlyLayer.open(tmp_path / "lower.lsmt")], upper) as stack:
        # O(entries) per call: a read must not need it.
        monkeypatch.setattr(WritableLayer, "index", property(lambda _: pytest.fail("index")))
        model = bytearray(b"\x11" * 65536 + bytes(MiB - 65536))
        for offset, fill in [(4096, 0x22), (8192, 0x33), (60 * 1024, 0x44), (6144, 0x55)]:
            stack.pwrite(offset, bytes([fill]) * 4096)
            model[offset : offset + 4096] = bytes([fill]) * 4096
            assert stack.pread(0, 128 * 1024) == model[: 128 * 1024]
        stack.trim(512, 1024)
        model[512:1536] = bytes(1024)
        assert stack.pread(0, MiB) == model


def test_open_image_reports_failure_to_the_result_file(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, {"lowers": [{"dir": "missing"}], "upper": {}, "resultFile": "result.txt"}
    )
    with pytest.raises(ImageConfigError, match=r"not found: tried"):
        open_image(path, report_result=True)
    result = (tmp_path / "result.txt").read_text()
    assert result.startswith("failed:") and "not found" in result


def test_write_result_without_a_result_file_does_nothing(tmp_path: Path) -> None:
    from workbench.formats.config import ImageConfig

    write_result(ImageConfig(base_dir=tmp_path), "success")
    assert list(tmp_path.iterdir()) == []
