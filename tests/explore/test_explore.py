"""The notebook API against small images whose indexes are known: frames, traced reads, cache."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from registries import embedded_registry

from workbench import explore
from workbench.errors import ImageConfigError
from workbench.formats.config import ImageConfig, LowerConfig
from workbench.image.commit import commit_writable
from workbench.image.writable import WritableLayer
from workbench.tracing import recording

KiB = 1 << 10
MiB = 1 << 20
SIZE = 8 * MiB


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base.tar (lz4, tar) with [0, 1 MiB) and [4 MiB, +256 KiB); app.zfile (zstd) that
    overwrites [512 KiB, +64 KiB) and trims [4 MiB, +64 KiB); config.v1.json of both."""
    root = tmp_path_factory.mktemp("explore")
    rng = random.Random(7)
    with WritableLayer.create(root / "base.data", root / "base.index", SIZE) as base:
        base.pwrite(0, rng.randbytes(MiB))
        base.pwrite(
            4 * MiB, b"text of the base layer\n" * (256 * KiB // 23) + bytes(256 * KiB % 23)
        )
        commit_writable(base, root / "base.tar", compress="lz4", tar=True, message="base")
    with WritableLayer.create(root / "app.data", root / "app.index", SIZE) as app:
        app.pwrite(512 * KiB, rng.randbytes(64 * KiB))
        app.trim(4 * MiB, 64 * KiB)
        commit_writable(app, root / "app.zfile", compress="zstd", message="app")
    config = ImageConfig(lowers=[LowerConfig(file="base.tar"), LowerConfig(file="app.zfile")])
    config.dump(root / "config.v1.json")
    return root


EXPECTED_MERGED = [
    # offset, length, kind, layer
    (0, 512 * KiB, "data", "base.tar"),
    (512 * KiB, 64 * KiB, "data", "app.zfile"),
    (576 * KiB, 448 * KiB, "data", "base.tar"),
    (4 * MiB, 64 * KiB, "zeroed", "app.zfile"),
    (4 * MiB + 64 * KiB, 192 * KiB, "data", "base.tar"),
]


def test_open_config_layers_table(image_dir: Path) -> None:
    with explore.open(image_dir / "config.v1.json") as image:
        layers = image.layers()
    assert list(layers.name) == ["base.tar", "app.zfile"]
    assert list(layers.tag) == [1, 0]
    assert list(layers.wrapping) == ["tar+zfile", "zfile"]
    assert list(layers.compression) == ["lz4", "zstd"]
    assert list(layers.data_bytes) == [MiB + 256 * KiB, 64 * KiB]
    assert list(layers.zeroed_bytes) == [0, 64 * KiB]
    assert list(layers.remote) == [False, False]
    assert (layers.virtual_size == SIZE).all()


def test_merged_index_says_which_layer_serves(image_dir: Path) -> None:
    with explore.open(image_dir / "config.v1.json") as image:
        merged = image.merged_index()
    rows = list(merged[["offset", "length", "kind", "layer"]].itertuples(index=False, name=None))
    assert rows == EXPECTED_MERGED
    assert list(merged.columns) == ["offset", "length", "end", "kind", "moffset", "tag", "layer"]
    assert (merged.end == merged.offset + merged.length).all()
    assert (merged[merged.kind == "zeroed"].moffset == -1).all()


def test_layer_index_by_position_name_and_from_files(image_dir: Path) -> None:
    files = [image_dir / "base.tar", image_dir / "app.zfile"]
    with explore.open(files) as image:
        app = image.layer_index(1)
        assert image.layer_index("app.zfile").equals(app)
        base = image.layer_index(0)
        with pytest.raises(KeyError, match="no layer named 'nope'"):
            image.layer("nope")
        with pytest.raises(IndexError, match="the image has 2 layers"):
            image.layer(5)
    assert list(app.kind) == ["data", "zeroed"]
    assert list(app.offset) == [512 * KiB, 4 * MiB]
    assert set(app.layer) == {"app.zfile"} and set(app.tag) == {0}
    assert list(base.offset) == [0, 4 * MiB] and list(base.length) == [MiB, 256 * KiB]


def test_traced_read_names_layers_segments_blocks(image_dir: Path) -> None:
    with explore.open(image_dir / "config.v1.json") as image:
        read = image.read(0, MiB)
        assert read.data == image.pread(0, MiB)
    by_layer = read.served_by().loc
    assert by_layer["base.tar"].disk_bytes == MiB - 64 * KiB
    assert by_layer["base.tar"].runs == 2
    assert by_layer["app.zfile"].disk_bytes == 64 * KiB
    assert len(read.segments) == 3
    # 4 KiB ZFile blocks: 960 KiB of base and 64 KiB of app were decompressed
    assert len(read.blocks) == 256
    assert (read.blocks.nbytes == 4 * KiB).all()
    assert read.fetches.empty and read.fetched_bytes() == 0
    requests = read.requests()
    assert list(requests.kind) == ["explore.read"]
    assert "image segment" in read.tree()
    assert "TracedRead(read [0, +1048576) -> 1048576 bytes" in repr(read)
    assert "<table>" in read._repr_html_()


def test_tracing_block_gives_events_and_views(image_dir: Path) -> None:
    with explore.open(image_dir / "config.v1.json") as image, explore.tracing() as trace:
        image.pread(4 * MiB, 128 * KiB)
        assert trace.active and len(trace) > 0
    assert not trace.active
    events = trace.events
    assert {"image", "lsmt", "zfile"} <= set(events.layer.astype(str))
    segments = trace.segments
    assert list(segments.kind if "kind" in segments else segments.nbytes) == [0, 64 * KiB]
    summary = trace.summary()
    assert summary.loc[("image", "read")].events == 1
    assert "Trace('trace': events" in repr(trace)


def test_trace_load_reads_a_parquet_trace(image_dir: Path, tmp_path: Path) -> None:
    with explore.open(image_dir / "config.v1.json") as image, recording() as recorder:
        image.pread(0, 64 * KiB)
    recorder.to_parquet(str(tmp_path / "t.parquet"))
    loaded = explore.Trace.load(tmp_path / "t.parquet")
    assert len(loaded) == len(recorder)
    assert len(loaded.segments) == 1


def test_zfile_blocks_is_the_jump_table(image_dir: Path) -> None:
    with explore.open(image_dir / "config.v1.json") as image:
        blocks = image.zfile_blocks(0)
        zfile = image.stack.lowers[0].file
        with pytest.raises(ValueError, match="not read through a block cache"):
            image.blob_cache(0)
    assert list(blocks.columns) == ["block", "offset", "stored_offset", "stored_length", "ratio"]
    assert len(blocks) == zfile.block_count
    assert (np.diff(blocks.offset) == 4096).all()
    starts = zfile.block_offsets()
    assert list(blocks.stored_offset) == list(starts[:-1])
    assert int(blocks.stored_length.sum()) == int(starts[-1] - starts[0])


def test_open_refuses_what_it_cannot_open(tmp_path: Path) -> None:
    with pytest.raises(ImageConfigError, match="not a registry reference"):
        explore.open(tmp_path / "missing.json")


def test_reprs_of_existing_classes(image_dir: Path) -> None:
    with explore.open(image_dir / "config.v1.json") as image:
        assert repr(image).startswith("Image(")
        assert "2 lowers" in repr(image)
        html = image._repr_html_()
        assert "base.tar" in html and "<table>" in html
        assert "LayerStack" in image.stack._repr_html_()
        layer = image.stack.lowers[0]
        assert "tar+zfile" in layer._repr_html_()
        assert "512-byte sectors" in layer.index._repr_html_()
    with recording() as recorder:
        pass
    assert repr(recorder) == "Recorder(0 events, layers none)"


@pytest.fixture(scope="module")
def registry_image(image_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from workbench.registry.image import push_image

    root = tmp_path_factory.mktemp("registry")
    with embedded_registry(root) as url:
        reference = f"{url.split('://', 1)[1]}/explore/app:v1"
        push_image(image_dir / "config.v1.json", reference)
        yield reference, root


def test_registry_image_read_shows_fetches_and_cache(registry_image, tmp_path: Path) -> None:
    reference, _ = registry_image
    with explore.open(reference, cache_dir=tmp_path / "cache", readahead=False) as image:
        assert list(image.layers().remote) == [True, True]
        # [768 KiB, +64 KiB) of the base: random bytes in the middle of its blob, which
        # opening (header, index, trailer) did not fetch
        read = image.read(768 * KiB, 64 * KiB)
        again = image.read(768 * KiB, 64 * KiB)
        state = image.cache_state()
        view = image.blob_cache(0)
        presence = view.presence
        blocks = view.blocks()

    assert read.fetched_bytes() > 0 and len(read.fetches) >= 1
    assert (read.cache.hit == False).any()  # noqa: E712 - a nullable boolean column
    assert again.fetched_bytes() == 0
    assert list(state.columns[:5]) == [
        "key",
        "size",
        "blocks",
        "present_blocks",
        "fraction_present",
    ]
    assert (state.fraction_present < 1).any() and (state.fetches >= 1).all()
    assert presence.dtype == bool and presence.any()
    assert int(blocks.present.sum()) == int(presence.sum())
    assert int(blocks.length.sum()) == int(state.loc[0, "size"])
    assert "blocks of 256 KiB present" in repr(view)
    assert "<span" in view._repr_html_()


def test_cache_frames_of_a_session_and_a_directory(registry_image, tmp_path: Path) -> None:
    reference, _ = registry_image
    with explore.open(reference, cache_dir=tmp_path / "cache") as image:
        image.pread(0, 64 * KiB)
        frame = explore.cache_frame(image.session.cache)
    assert len(frame) == 2 and (frame.present_bytes > 0).all()
    on_disk = explore.inventory_frame(tmp_path / "cache")
    assert set(on_disk.key) == set(frame.key)
    assert isinstance(on_disk.fraction_present.iloc[0], float)


def test_plots_draw_figures(image_dir: Path, registry_image, tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with explore.open(image_dir / "config.v1.json") as image:
        figure = explore.plots.segment_map(image)
        assert len(figure.axes[0].get_yticklabels()) == 3
        figure = explore.plots.block_sizes(image.zfile_blocks(0))
        assert len(figure.axes[0].patches) == len(image.zfile_blocks(0))
    plt.close("all")

    reference, _ = registry_image
    with explore.open(reference, cache_dir=tmp_path / "cache") as image, explore.tracing() as trace:
        for offset in range(0, MiB, 128 * KiB):
            image.pread(offset, 4 * KiB)
    figure = explore.plots.access_pattern(trace)
    assert figure.axes[0].collections  # the dots
    figure = explore.plots.access_pattern(trace, layer="cache", op="read")
    figure = explore.plots.cache_filling(trace, total_bytes=2 * MiB)
    assert "MiB in" in figure.axes[0].get_title()
    with explore.open(reference, cache_dir=tmp_path / "cache") as image:
        view = image.blob_cache(0)
        figure = explore.plots.presence_map(view)
        assert (
            f"{int(view.presence.sum())} of {len(view.presence)} blocks"
            in figure.axes[0].get_title()
        )
    with pytest.raises(ValueError, match="no device/read events"):
        explore.plots.access_pattern(trace, layer="device")
    plt.close("all")
    assert isinstance(trace.events, pd.DataFrame)


def test_writable_upper_of_a_config_shows_in_the_indexes(image_dir: Path, tmp_path: Path) -> None:
    import shutil

    from workbench.formats.config import UpperConfig

    for name in ("base.tar", "app.zfile"):
        shutil.copy(image_dir / name, tmp_path / name)
    WritableLayer.create(tmp_path / "upper.data", tmp_path / "upper.index", SIZE).close()
    config = ImageConfig(
        lowers=[LowerConfig(file="base.tar"), LowerConfig(file="app.zfile")],
        upper=UpperConfig(data="upper.data", index="upper.index"),
    )
    config.dump(tmp_path / "config.v1.json")

    with explore.open(tmp_path / "config.v1.json", upper="writable") as image:
        image.pwrite(6 * MiB, b"u" * (8 * KiB))
        image.trim(0, 4 * KiB)
        layers = image.layers()
        upper = image.layer_index(2)
        merged = image.merged_index()
        read = image.read(0, 8 * KiB)
    assert list(layers.kind) == ["lower", "lower", "upper"] and layers.tag.iloc[2] == 2
    assert list(upper.kind) == ["zeroed", "data"] and set(upper.layer) == {"upper.data"}
    assert merged.iloc[0].to_dict() == {
        "offset": 0,
        "length": 4 * KiB,
        "end": 4 * KiB,
        "kind": "zeroed",
        "moffset": -1,
        "tag": 2,
        "layer": "upper.data",
    }
    assert merged.iloc[-1].layer == "upper.data" and merged.iloc[-1].offset == 6 * MiB
    assert set(read.served_by().index) == {"base.tar", "upper.data"}
    assert read.data[: 4 * KiB] == bytes(4 * KiB)


def test_a_trace_without_requests_says_how_to_get_one(image_dir: Path) -> None:
    with explore.open(image_dir / "config.v1.json") as image, explore.tracing() as trace:
        image.pread(0, 4 * KiB)
    assert trace.requests().empty
    with pytest.raises(KeyError, match=r"wrap the work in tracing\.request"):
        trace.tree()
    with explore.tracing() as empty:
        pass
    assert repr(empty) == "Trace('trace', no events)"
    assert "events" in empty._repr_html_()


def test_cache_statistics_html(registry_image, tmp_path: Path) -> None:
    reference, _ = registry_image
    with explore.open(reference, cache_dir=tmp_path / "cache") as image:
        html = image.session.cache.statistics()._repr_html_()
        assert "CacheStatistics" in html and "fetches" in html
        assert "block cache" in image._repr_html_()
