"""Tests of `workbench export`: the merged image of a config as a raw disk image."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from reference import TESTDATA, chunk_hashes, needs_testdata

from workbench.cli.image import export
from workbench.errors import ImageConfigError
from workbench.image.layer import ReadOnlyLayer
from workbench.image.writable import WritableLayer

MiB = 1 << 20

pytestmark = needs_testdata


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.v1.json"
    lowers = [{"file": str(TESTDATA / "layer1.lsmt")}, {"file": str(TESTDATA / "layer2.lsmt")}]
    path.write_text(json.dumps({"repoBlobUrl": "", "lowers": lowers, "upper": {}}))
    return path


@pytest.mark.parametrize("sparse", ["--sparse", "--no-sparse"])
def test_export_writes_the_merged_disk(config: Path, tmp_path: Path, sparse: str) -> None:
    manifest = json.loads((TESTDATA / "manifest.json").read_text())
    out = tmp_path / "disk.img"

    result = CliRunner().invoke(export, [str(config), str(out), sparse])

    assert result.exit_code == 0, result.output
    assert out.stat().st_size == manifest["virtual_size"]
    assert (
        chunk_hashes(out.read_bytes())
        == manifest["expected"]["merged_layer1_layer2"]["chunk_sha256"]
    )
    assert not (tmp_path / "disk.img.tmp").exists()


def test_sparse_export_leaves_holes(config: Path, tmp_path: Path) -> None:
    CliRunner().invoke(export, [str(config), str(tmp_path / "sparse.img")])
    CliRunner().invoke(export, [str(config), str(tmp_path / "full.img"), "--no-sparse"])
    sparse_blocks = os.stat(tmp_path / "sparse.img").st_blocks
    full_blocks = os.stat(tmp_path / "full.img").st_blocks
    if full_blocks * 512 < 64 * MiB:
        pytest.skip("this file system does not allocate written zeros; cannot see holes")
    assert sparse_blocks * 512 < 16 * MiB  # about 8 MiB of data in a 64 MiB disk


def test_export_refuses_to_overwrite_without_force(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "disk.img"
    out.write_bytes(b"keep me")

    result = CliRunner().invoke(export, [str(config), str(out)])
    assert result.exit_code != 0
    assert "exists; pass -f to overwrite it" in result.output
    assert out.read_bytes() == b"keep me"

    result = CliRunner().invoke(export, [str(config), str(out), "-f"])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size == 64 * MiB


def test_export_of_a_broken_config_leaves_no_output(tmp_path: Path) -> None:
    path = tmp_path / "config.v1.json"
    path.write_text(json.dumps({"lowers": [{"dir": "nowhere"}]}))
    out = tmp_path / "disk.img"

    result = CliRunner().invoke(export, [str(path), str(out)])
    assert isinstance(result.exception, ImageConfigError)
    assert not out.exists()
    assert not (tmp_path / "disk.img.tmp").exists()


@pytest.mark.parametrize("torn", [False, True], ids=["clean", "torn-tail"])
def test_export_never_modifies_the_writable_layer(tmp_path: Path, torn: bool) -> None:
    data, index = tmp_path / "upper.data", tmp_path / "upper.index"
    with WritableLayer.create(data, index, 64 * MiB) as rw:
        rw.pwrite(0, b"\x5a" * 4096)
        rw.flush()
        rw.pwrite(4096, b"\xa5" * 4096)
    if torn:
        # A crash: the second write's data never reached the data file, and a partial
        # entry follows its entry. A writable open would cut both off the index file.
        os.truncate(data, os.path.getsize(data) - 4096)
        with open(index, "ab") as index_file:
            index_file.write(b"\x01" * 7)
    for path in (data, index):
        path.chmod(0o444)
    before = [(path.read_bytes(), path.stat().st_mtime_ns) for path in (data, index)]
    config = tmp_path / "config.v1.json"
    lower = TESTDATA / "layer1.lsmt"
    upper = {"data": str(data), "index": str(index)}
    config.write_text(json.dumps({"lowers": [{"file": str(lower)}], "upper": upper}))
    out = tmp_path / "disk.img"

    result = CliRunner().invoke(export, [str(config), str(out)])

    assert result.exit_code == 0, result.output
    assert [(path.read_bytes(), path.stat().st_mtime_ns) for path in (data, index)] == before
    with open(out, "rb") as image:
        assert image.read(4096) == b"\x5a" * 4096
        second = image.read(4096)
    with ReadOnlyLayer.open(lower) as layer1:
        # The lost write never happened: the lower shows through where it would have been.
        assert second == (layer1.pread(4096, 4096) if torn else b"\xa5" * 4096)
