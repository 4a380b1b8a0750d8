"""Tests of config.v1.json parsing, writing and lower resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.errors import ImageConfigError
from workbench.formats.config import (
    DownloadConfig,
    ImageConfig,
    LowerConfig,
    RemoteBlob,
    UpperConfig,
    load,
    loads,
)

# A config as the Go snapshotter writes it (field order and omitted empties included).
SNAPSHOTTER_CONFIG = {
    "repoBlobUrl": "https://registry-1.docker.io/v2/library/redis/blobs",
    "lowers": [
        {
            "digest": "sha256:" + "a" * 64,
            "size": 1234567,
            "dir": "/var/lib/overlaybd/snapshots/12/fs",
        },
        {"file": "/var/lib/overlaybd/snapshots/13/fs/overlaybd.commit"},
    ],
    "upper": {
        "index": "/var/lib/overlaybd/snapshots/14/block/writable_index",
        "data": "/var/lib/overlaybd/snapshots/14/block/writable_data",
        "vsize": 64,
    },
    "resultFile": "/var/lib/overlaybd/snapshots/14/block/init-debug.log",
}


# ---------------------------------------------------------------------------------------------
# Round trips


def test_parses_the_snapshotters_config() -> None:
    config = loads(json.dumps(SNAPSHOTTER_CONFIG))
    assert config.repo_blob_url.endswith("/redis/blobs")
    assert [lower.digest for lower in config.lowers] == ["sha256:" + "a" * 64, ""]
    assert config.lowers[0].size == 1234567
    assert config.upper.vsize == 64
    assert not config.upper.is_empty
    assert config.download is None


def test_round_trip_is_byte_for_byte_json_equal() -> None:
    config = loads(json.dumps(SNAPSHOTTER_CONFIG))
    assert json.loads(config.dumps()) == SNAPSHOTTER_CONFIG
    assert list(json.loads(config.dumps())) == list(SNAPSHOTTER_CONFIG)


def test_unknown_keys_survive_a_round_trip() -> None:
    text = json.dumps(
        {
            "lowers": [{"dir": "/x", "futureLowerKey": [1, 2]}],
            "upper": {"data": "d", "index": "i", "futureUpperKey": True},
            "futureTopKey": {"nested": "yes"},
            "download": {"enable": True, "futureDownloadKey": 3},
        }
    )
    again = json.loads(loads(text).dumps())
    assert again["lowers"][0]["futureLowerKey"] == [1, 2]
    assert again["upper"]["futureUpperKey"] is True
    assert again["futureTopKey"] == {"nested": "yes"}
    assert again["download"]["futureDownloadKey"] == 3
    assert again["download"]["enable"] is True


def test_output_always_has_upper_even_when_empty() -> None:
    out = json.loads(ImageConfig(lowers=[LowerConfig(dir="/l")]).dumps())
    assert out == {"repoBlobUrl": "", "lowers": [{"dir": "/l"}], "upper": {}, "resultFile": ""}


def test_optional_top_level_fields_appear_only_when_set() -> None:
    config = ImageConfig(acceleration_layer=True, record_trace_path="/t", download=DownloadConfig())
    out = json.loads(config.dumps())
    assert out["accelerationLayer"] is True
    assert out["recordTracePath"] == "/t"
    assert out["download"] == {
        "enable": False,
        "delay": 300,
        "delayExtra": 30,
        "maxMBps": 100,
        "tryCnt": 5,
        "blockSize": 262144,
    }


def test_download_fills_defaults_for_missing_keys() -> None:
    config = loads('{"lowers": [], "download": {"enable": true, "maxMBps": 5}}')
    assert config.download == DownloadConfig(enable=True, max_mbps=5)


def test_null_lowers_and_missing_upper_read_as_empty() -> None:
    """Go writes a nil slice as null; OverlayBD configs may leave the upper out."""
    config = loads('{"repoBlobUrl": "", "lowers": null, "resultFile": ""}')
    assert config.lowers == []
    assert config.upper == UpperConfig()
    assert config.upper.is_empty


def test_dump_and_load_a_file(tmp_path: Path) -> None:
    path = tmp_path / "config.v1.json"
    loads(json.dumps(SNAPSHOTTER_CONFIG)).dump(path)
    assert json.loads(path.read_text()) == SNAPSHOTTER_CONFIG
    assert not (tmp_path / "config.v1.json.tmp").exists()
    assert load(path).base_dir == tmp_path.resolve()


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"lowers": [{"dir": "/x", "size": "12"}]}, r"lowers\[0\]\.size must be an integer"),
        ({"lowers": [{"dir": "/x", "size": True}]}, r"lowers\[0\]\.size must be an integer"),
        ({"lowers": [{"dir": "/x", "size": -1}]}, r"lowers\[0\]\.size must be >= 0"),
        ({"lowers": [{"dir": 7}]}, r"lowers\[0\]\.dir must be a string, got an integer 7"),
        ({"lowers": ["/x"]}, r"lowers\[0\] must be an object"),
        ({"lowers": {"dir": "/x"}}, r"config\.lowers must be a list"),
        ({"lowers": [{"size": 3}]}, r"lowers\[0\] names no layer: it needs a 'file', a 'dir'"),
        ({"upper": {"index": "i"}}, r"upper has an 'index' but no 'data'"),
        ({"upper": []}, r"config\.upper must be an object"),
        ({"upper": {"data": "d", "vsize": 1.5}}, r"upper\.vsize must be an integer"),
        ({"accelerationLayer": "yes"}, r"config\.accelerationLayer must be a boolean"),
        ({"download": {"delay": "soon"}}, r"download\.delay must be an integer"),
        ({"download": {"enable": 1}}, r"download\.enable must be a boolean"),
    ],
)
def test_bad_fields_name_the_key_and_the_rule(document: dict, message: str) -> None:
    with pytest.raises(ImageConfigError, match=message):
        loads(json.dumps(document))


def test_too_many_lowers() -> None:
    document = {"lowers": [{"dir": f"/l{i}"} for i in range(257)]}
    with pytest.raises(ImageConfigError, match=r"config\.lowers has 257 layers; at most 256"):
        loads(json.dumps(document))
    assert len(loads(json.dumps({"lowers": document["lowers"][:256]})).lowers) == 256


def test_not_json_and_not_an_object() -> None:
    with pytest.raises(ImageConfigError, match=r"not valid JSON: .* at line 1 column"):
        loads("{lowers: []}")
    with pytest.raises(ImageConfigError, match=r"must be a JSON object, got list"):
        loads("[]")


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.v1.json"
    path.write_text('{"lowers": [{"dir": 1}]}')
    with pytest.raises(ImageConfigError, match=r"config\.v1\.json: lowers\[0\]\.dir must be"):
        load(path)
    with pytest.raises(ImageConfigError, match=r"missing\.json: image config not found"):
        load(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------
# Paths and lower resolution


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "layers").mkdir()
    (tmp_path / "layers" / "base.lsmt").write_bytes(b"x")
    path = tmp_path / "config.v1.json"
    path.write_text(json.dumps({"lowers": [{"file": "layers/base.lsmt"}]}))

    config = load(path)
    assert config.resolve_lower(0) == tmp_path.resolve() / "layers" / "base.lsmt"
    assert config.resolve_path("/abs/file") == Path("/abs/file")


@pytest.mark.parametrize(
    ("present", "expected"),
    [
        (["overlaybd.commit", ".commit", "overlaybd.sealed"], "overlaybd.commit"),
        ([".commit", "overlaybd.sealed"], ".commit"),
        (["overlaybd.sealed"], "overlaybd.sealed"),
    ],
)
def test_lower_dir_candidates_in_overlaybd_order(
    tmp_path: Path, present: list[str], expected: str
) -> None:
    for name in present:
        (tmp_path / name).write_bytes(b"x")
    config = ImageConfig(lowers=[LowerConfig(dir=str(tmp_path))])
    assert config.resolve_lower(config.lowers[0]) == tmp_path / expected


def test_lower_file_wins_over_dir(tmp_path: Path) -> None:
    (tmp_path / "overlaybd.commit").write_bytes(b"x")
    (tmp_path / "mine.lsmt").write_bytes(b"x")
    lower = LowerConfig(file=str(tmp_path / "mine.lsmt"), dir=str(tmp_path))
    assert ImageConfig(lowers=[lower]).resolve_lower(0) == tmp_path / "mine.lsmt"


def test_missing_file_falls_back_to_dir(tmp_path: Path) -> None:
    (tmp_path / "overlaybd.commit").write_bytes(b"x")
    lower = LowerConfig(file=str(tmp_path / "gone.lsmt"), dir=str(tmp_path))
    assert ImageConfig(lowers=[lower]).resolve_lower(0) == tmp_path / "overlaybd.commit"


def test_a_lower_found_nowhere_locally_is_a_remote_blob(tmp_path: Path) -> None:
    config = loads(json.dumps(SNAPSHOTTER_CONFIG))

    remote = config.resolve_lower(0)

    assert isinstance(remote, RemoteBlob)
    assert remote.digest == "sha256:" + "a" * 64
    assert remote.url == config.blob_url(config.lowers[0])
    assert remote.url.endswith("/redis/blobs/sha256:" + "a" * 64)


def test_lower_found_nowhere_lists_what_was_tried(tmp_path: Path) -> None:
    config = ImageConfig(lowers=[LowerConfig(dir=str(tmp_path))])
    with pytest.raises(ImageConfigError, match=r"not found: tried .*overlaybd\.commit.*\.commit"):
        config.resolve_lower(0)
