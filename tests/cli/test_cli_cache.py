"""`workbench cache stats|clear` on a cache filled through BlockCache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

from workbench.blobs.cache import MARKER_NAME, BlockCache
from workbench.cli.cache import cache

REFILL = 64 << 10
FIRST = "sha256:" + "11" * 32
SECOND = "sha256:" + "22" * 32


def invoke(*args: object) -> object:
    return CliRunner().invoke(cache, [str(arg) for arg in args])


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    """A cache with FIRST fully cached (2 blocks) and SECOND half cached (1 of 2 blocks)."""
    data = bytes(range(256)) * (2 * REFILL // 256)

    async def fetch(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    async def fill() -> None:
        with BlockCache(tmp_path, refill_size=REFILL) as block_cache:
            await block_cache.open_blob(FIRST, len(data), fetch).pread(0, len(data))
            await block_cache.open_blob(SECOND, len(data), fetch).pread(0, 10)

    trio.run(fill)
    return tmp_path


def test_stats_lists_blobs_and_totals(filled: Path) -> None:
    result = invoke("stats", "--cache-dir", filled)

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"cache {filled}: 2 blobs"
    assert FIRST in lines[2] and "100.0%" in lines[2]
    assert SECOND in lines[3] and "50.0%" in lines[3]
    assert lines[-1] == "total: 192.0 KiB present of 256.0 KiB in blobs"


def test_stats_as_json(filled: Path) -> None:
    result = invoke("stats", "--cache-dir", filled, "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [blob["digest"] for blob in report["blobs"]] == [FIRST, SECOND]
    assert [blob["present_bytes"] for blob in report["blobs"]] == [2 * REFILL, REFILL]
    assert report["total_present_bytes"] == 3 * REFILL


def test_stats_uses_the_environment_default(filled: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(filled))
    result = invoke("stats", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["blobs"]) == 2


def test_clear_one_blob_then_all(filled: Path) -> None:
    result = invoke("clear", "--cache-dir", filled, "--blob", SECOND)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"cleared blob {SECOND} from {filled} (64.0 KiB freed)"
    assert not (filled / f"sha256-{'22' * 32}.data").exists()
    assert (filled / f"sha256-{'11' * 32}.data").exists()

    result = invoke("clear", "--cache-dir", filled)
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in filled.iterdir()) == [MARKER_NAME]


def test_clear_of_an_unknown_blob_fails(filled: Path) -> None:
    result = invoke("clear", "--cache-dir", filled, "--blob", "sha256:" + "33" * 32)
    assert result.exit_code == 1
    assert "is not in the cache; nothing to clear" in result.output


def test_a_directory_without_the_marker_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")

    for command in ("stats", "clear"):
        result = invoke(command, "--cache-dir", tmp_path)
        assert result.exit_code == 1
        assert "not a workbench block cache (no WORKBENCH-CACHE marker file)" in result.output
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_clear_refuses_a_cache_in_use(filled: Path) -> None:
    with BlockCache(filled, refill_size=REFILL):
        result = invoke("clear", "--cache-dir", filled)
    assert result.exit_code == 1
    assert "in use by another process" in result.output
