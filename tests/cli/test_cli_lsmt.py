"""`workbench lsmt`: create, commit, import and seal from the command line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from reference import TESTDATA, needs_testdata

from workbench.cli.lsmt import lsmt
from workbench.formats.lsmt import HT_SPACE, LsmtHeader
from workbench.image.layer import ReadOnlyLayer
from workbench.image.writable import WritableLayer

MiB = 1 << 20


def run(*args: object) -> object:
    result = CliRunner().invoke(lsmt, [str(arg) for arg in args])
    return result


def test_create_makes_an_empty_writable_layer(tmp_path: Path) -> None:
    data, index = tmp_path / "data", tmp_path / "index"

    result = run("create", data, index, "--size", "64M", "--parent-uuid", "a" * 32)

    assert result.exit_code == 0, result.output
    header = LsmtHeader.unpack(data.read_bytes())
    assert (header.flags, header.virtual_size) == (0x03, 64 * MiB)
    assert header.parent_uuid == "AAAAAAAA-AAAA-AAAA-AAAA-AAAAAAAAAAAA"
    assert f"created {data}" in result.output


def test_create_sparse_and_sizes_in_bytes(tmp_path: Path) -> None:
    result = run("create", tmp_path / "d", tmp_path / "i", "--size", "1048576", "--sparse")

    assert result.exit_code == 0, result.output
    assert (tmp_path / "d").stat().st_size == HT_SPACE + MiB


@pytest.mark.parametrize(
    ("size", "message"),
    [("1000", "not a positive multiple of 512"), ("lots", "is not a size")],
)
def test_create_refuses_bad_sizes(tmp_path: Path, size: str, message: str) -> None:
    result = run("create", tmp_path / "d", tmp_path / "i", "--size", size)

    assert result.exit_code == 2
    assert message in result.output


def test_create_refuses_existing_files(tmp_path: Path) -> None:
    run("create", tmp_path / "d", tmp_path / "i", "--size", "1M")

    result = run("create", tmp_path / "d", tmp_path / "i", "--size", "1M")

    assert result.exit_code == 1
    assert "Error:" in result.output


@needs_testdata
def test_commit_writes_overlaybd_commit_bytes(tmp_path: Path) -> None:
    for suffix in ("data", "index"):
        shutil.copyfile(TESTDATA / f"layer1.rw.{suffix}", tmp_path / suffix)
    out = tmp_path / "layer.lsmt"
    args = ["commit", tmp_path / "data", tmp_path / "index", out]
    identity = ["--uuid", "aaaaaaaa-0000-4000-8000-000000000001", "-m", "layer1"]

    result = run(*args, *identity)

    assert result.exit_code == 0, result.output
    assert out.read_bytes() == (TESTDATA / "layer1.lsmt").read_bytes()

    # OUT exists now: refused without -f, replaced with it (compressed and tar-wrapped).
    refused = run(*args)
    assert refused.exit_code == 1
    assert "exists; pass -f" in refused.output
    forced = run(*args, *identity, "-f", "--algorithm", "zstd", "-t", "--block-size", "16K")
    assert forced.exit_code == 0, forced.output
    with ReadOnlyLayer.open(out) as layer:
        assert layer.wrapping == ("tar", "zfile")
        assert layer.file.pread(0, layer.file.size) == (TESTDATA / "layer1.lsmt").read_bytes()


def test_commit_reports_a_broken_layer_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "data").write_bytes(b"\0" * HT_SPACE)
    (tmp_path / "index").write_bytes(b"\0" * HT_SPACE)

    result = run("commit", tmp_path / "data", tmp_path / "index", tmp_path / "out")

    assert result.exit_code == 1
    assert "no LSMT magic" in result.output


def test_import_and_seal(tmp_path: Path) -> None:
    raw = bytes(MiB) + b"\x05" * MiB
    (tmp_path / "disk.img").write_bytes(raw)

    imported = run("import", tmp_path / "disk.img", tmp_path / "disk.lsmt", "-z", "-m", "disk")

    assert imported.exit_code == 0, imported.output
    with ReadOnlyLayer.open(tmp_path / "disk.lsmt") as layer:
        assert layer.wrapping == ("zfile",)
        assert layer.pread(0, 2 * MiB) == raw

    data, index = tmp_path / "data", tmp_path / "index"
    with WritableLayer.create(data, index, 2 * MiB) as rw:
        rw.pwrite(0, raw[MiB : MiB + 4096])
    sealed = run("seal", data, index)
    assert sealed.exit_code == 0, sealed.output
    with ReadOnlyLayer.open(data) as layer:
        assert layer.pread(0, 4096) == raw[MiB : MiB + 4096]


def test_help_explains_the_files() -> None:
    result = run("--help")

    assert result.exit_code == 0
    assert "DATA holds the written blocks" in result.output
    for command in ("create", "commit", "import", "seal"):
        assert command in result.output
