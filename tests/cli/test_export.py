"""Tests of `workbench export`: the merged image of a config as a raw disk image."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from workbench.cli.image import export
from workbench.errors import ImageConfigError

TESTDATA = Path(__file__).resolve().parents[2].parent / "shared" / "testdata" / "overlaybd"
MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    not TESTDATA.is_dir(), reason=f"OverlayBD reference files not found at {TESTDATA}"
)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.v1.json"
    lowers = [{"file": str(TESTDATA / "layer1.lsmt")}, {"file": str(TESTDATA / "layer2.lsmt")}]
    path.write_text(json.dumps({"repoBlobUrl": "", "lowers": lowers, "upper": {}}))
    return path


def chunk_hashes(path: Path) -> list[str]:
    data = path.read_bytes()
    return [hashlib.sha256(data[i : i + MiB]).hexdigest() for i in range(0, len(data), MiB)]


@pytest.mark.parametrize("sparse", ["--sparse", "--no-sparse"])
def test_export_writes_the_merged_disk(config: Path, tmp_path: Path, sparse: str) -> None:
    manifest = json.loads((TESTDATA / "manifest.json").read_text())
    out = tmp_path / "disk.img"

    result = CliRunner().invoke(export, [str(config), str(out), sparse])

    assert result.exit_code == 0, result.output
    assert out.stat().st_size == manifest["virtual_size"]
    assert chunk_hashes(out) == manifest["expected"]["merged_layer1_layer2"]["chunk_sha256"]
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
