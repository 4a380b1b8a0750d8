"""`workbench zfile` compress / decompress / verify, through click's test runner."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from workbench.cli.zfile import zfile
from workbench.formats.detect import open_blob


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "layer.bin"
    path.write_bytes(b"some layer content, fairly compressible\n" * 5000 + bytes(range(256)) * 40)
    return path


def run(*args: object) -> object:
    return CliRunner().invoke(zfile, [str(arg) for arg in args], catch_exceptions=False)


def test_compress_decompress_round_trip(source: Path, tmp_path: Path) -> None:
    result = run("compress", source, tmp_path / "c.zfile", "--algorithm", "zstd")
    assert result.exit_code == 0, result.output
    assert "blocks of 4096 B, zstd" in result.output
    result = run("decompress", tmp_path / "c.zfile", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out").read_bytes() == source.read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_compress_with_tar_and_options(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.tar"
    args = ["--block-size", "16384", "--no-verify", "--overwrite-header", "-t"]
    result = run("compress", source, out, *args)
    assert result.exit_code == 0, result.output
    assert tarfile.is_tarfile(out)
    with open_blob(out) as blob:
        assert blob.layers == ("tar", "zfile")
        assert blob.zfile.block_size == 16384 and not blob.zfile.verify
        assert blob.zfile.header.flags == 0x1B
        assert blob.file.pread(0, blob.file.size) == source.read_bytes()
    result = run("decompress", out, tmp_path / "plain")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "plain").read_bytes() == source.read_bytes()


def test_refuses_to_overwrite_without_force(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.zfile"
    out.write_bytes(b"precious")
    result = run("compress", source, out)
    assert result.exit_code != 0
    assert "exists; pass -f/--force to overwrite it" in result.output
    assert out.read_bytes() == b"precious"
    assert run("compress", source, out, "-f").exit_code == 0
    assert out.read_bytes() != b"precious"


def test_bad_block_size_is_refused(source: Path, tmp_path: Path) -> None:
    result = run("compress", source, tmp_path / "c.zfile", "--block-size", "5000")
    assert result.exit_code == 2 and "4096" in result.output


def test_decompress_of_a_non_zfile_leaves_no_output(source: Path, tmp_path: Path) -> None:
    result = run("decompress", source, tmp_path / "out")
    assert result.exit_code == 1
    assert "not a ZFile" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_verify_ok_and_damaged(source: Path, tmp_path: Path) -> None:
    packed = tmp_path / "c.zfile"
    assert run("compress", source, packed).exit_code == 0
    result = run("verify", packed)
    assert result.exit_code == 0 and ": ok: zfile, lz4" in result.output

    blob = bytearray(packed.read_bytes())
    blob[520] ^= 0x10  # inside block 0 (blocks of this text compress to about 66 bytes)
    packed.write_bytes(bytes(blob))
    result = CliRunner().invoke(zfile, ["verify", str(packed)])
    assert result.exit_code == 1
    assert "FAILED" in result.output and "block 0 at offset 512: CRC mismatch" in result.output


def test_help_says_what_a_zfile_is() -> None:
    result = run("--help")
    assert "compressed in fixed-size blocks" in result.output
