"""The applier's rules that need no mounts: names, media types, PAX times, debugfs scripts."""

from __future__ import annotations

import pytest

from workbench.convert.apply import ApplyReport, _pax_time, clean_name, layer_compression
from workbench.convert.ext4 import mkfs_arguments, normalize_script
from workbench.errors import LayerError, UnsupportedFormatError


@pytest.mark.parametrize(
    ("name", "cleaned"),
    [
        ("./etc/passwd", "etc/passwd"),
        ("/etc//passwd", "etc/passwd"),
        ("etc/../usr/bin", "usr/bin"),
        ("./", ""),
        ("a/b/../../c", "c"),
    ],
)
def test_clean_name(name: str, cleaned: str) -> None:
    assert clean_name(name) == cleaned


@pytest.mark.parametrize("name", ["../etc", "a/../../etc", "./../x", "/.."])
def test_clean_name_refuses_escapes(name: str) -> None:
    with pytest.raises(LayerError, match="escapes the image root"):
        clean_name(name)


def test_layer_compression_by_magic_and_media_type() -> None:
    gzip_type = "application/vnd.oci.image.layer.v1.tar+gzip"
    assert layer_compression(gzip_type, b"\x1f\x8b\x08\x00", "l") == "gzip"
    assert layer_compression("application/vnd.oci.image.layer.v1.tar", b"etc/", "l") == "tar"
    assert layer_compression("", b"\x28\xb5\x2f\xfd", "l") == "zstd"
    with pytest.raises(LayerError, match="does not start with the gzip magic"):
        layer_compression(gzip_type, b"etc/", "l")
    with pytest.raises(UnsupportedFormatError, match="media type 'text/plain'"):
        layer_compression("text/plain", b"", "l")


def test_pax_times_keep_nanoseconds() -> None:
    assert _pax_time("1700000000.123456789") == 1_700_000_000_123_456_789
    assert _pax_time("1700000000.5") == 1_700_000_000_500_000_000
    assert _pax_time("12") == 12 * 10**9
    assert _pax_time("-1.5") == -1_500_000_000
    assert _pax_time("garbage") is None


def test_normalize_script_sets_times_generations_and_superblock() -> None:
    report = ApplyReport("sha256:x", 0, 0, {12: 1_700_000_000_000_000_007}, [13])
    script = normalize_script(report).splitlines()
    assert "sif <12> ctime @1700000000" in script
    assert "sif <12> ctime_extra 28" in script  # 7 ns << 2
    assert "sif <12> generation 0" in script
    assert "sif <13> dtime @1" in script
    assert 'ssv last_mounted ""' in script


def test_mkfs_arguments_are_overlaybd_options_seeded() -> None:
    first, again, other = mkfs_arguments("a"), mkfs_arguments("a"), mkfs_arguments("b")
    assert first == again != other
    assert first[:4] == ["-O", "^has_journal,sparse_super,flex_bg", "-G", "1"]
    assert first[5].startswith("discard,hash_seed=")
