"""The `workbench` command as a whole: inspect, demo, bench, and how errors are reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from reference import TESTDATA, needs_testdata

from workbench.cli import cli
from workbench.formats.zfile import compress


def run(*args: object):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


@needs_testdata
def test_inspect_describes_each_wrapping_of_a_layer(tmp_path: Path) -> None:
    wrapped = tmp_path / "layer2.tar"
    compress(TESTDATA / "layer2.lsmt", wrapped, algorithm="zstd", tar=True)

    result = run("inspect", "--json", wrapped)

    assert result.exit_code == 0, result.output
    layers = json.loads(result.output)["layers"]
    assert [layer["kind"] for layer in layers] == ["tar", "zfile", "lsmt committed layer"]
    assert layers[0]["payload_offset"] == 1536
    assert layers[1]["algorithm"] == "zstd"
    assert layers[1]["original_size"] == (TESTDATA / "layer2.lsmt").stat().st_size
    lsmt = layers[2]
    assert lsmt["uuid"] == "AAAAAAAA-0000-4000-8000-000000000002"
    assert lsmt["parent_uuid"] == "AAAAAAAA-0000-4000-8000-000000000001"
    assert lsmt["message"] == "layer2"
    assert lsmt["index"]["entries"] == 7
    assert lsmt["index"]["zeroed_entries"] == 3
    assert lsmt["index"]["padding_entries"] == 256 - 7


@needs_testdata
def test_inspect_text_of_a_writable_layer() -> None:
    data = run("inspect", TESTDATA / "layer1.rw.data")
    index = run("inspect", TESTDATA / "layer1.rw.index")

    assert data.exit_code == 0, data.output
    assert "lsmt writable data file" in data.output
    assert "0x03 (header, data)" in data.output
    assert "lsmt writable index file" in index.output
    assert "entries" in index.output


@needs_testdata
def test_inspect_reports_bad_input_as_one_line(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.zfile"
    bogus.write_bytes((TESTDATA / "layer2.lz4.crc.zfile").read_bytes()[:4096])

    result = run("inspect", bogus)

    assert result.exit_code == 1
    assert result.output.startswith("Error: ")
    assert "bogus.zfile" in result.output
    assert "Traceback" not in result.output


def test_inspect_of_a_plain_file_says_raw(tmp_path: Path) -> None:
    plain = tmp_path / "disk.img"
    plain.write_bytes(bytes(8192))

    result = run("inspect", "--json", plain)

    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["layers"] == [{"kind": "raw", "size": 8192}]


def test_demo_builds_and_checks_the_image(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"

    result = run("demo", "--workdir", workdir, "--keep")

    assert result.exit_code == 0, result.output
    assert "MATCH: image and model" in result.output
    assert "MATCH: lazily read image and model" in result.output
    assert "resultFile says: success" in result.output
    for name in ("base.tar", "app.zfile", "upper.data", "upper.index", "config.v1.json"):
        assert (workdir / name).is_file()


def test_demo_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")

    result = run("demo", "--workdir", tmp_path)

    assert result.exit_code != 0
    assert "not empty" in result.output
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 (e2fsprogs) is absent")
def test_bench_formats_quick_prints_every_section(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"

    result = run("bench", "formats", "--quick", "--image-size", "8M", "--json", report)

    assert result.exit_code == 0, result.output
    titles = [table["title"] for table in json.loads(report.read_text())]
    assert titles[0].startswith("Merged-index lookups")
    assert any(title.startswith("ZFile sequential read") for title in titles)
    assert any(title.startswith("Compressed size") for title in titles)
    assert any(title.startswith("Tracing hooks") for title in titles)
    assert "ratio (>= 0.85)" in result.output
