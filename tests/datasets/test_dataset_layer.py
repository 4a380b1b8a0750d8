"""Layer trees made reproducible and written as OCI tar+gzip: order, owners, times, whiteouts."""

from __future__ import annotations

import gzip
import importlib.util
import os
import py_compile
import stat
import sys
import tarfile
from pathlib import Path

import pytest
from dataset_support import need

from workbench.datasets.layer import finalize, write_layer

EPOCH = 1767225600
LATER = EPOCH + 86400 * 30 + 0.75


def _tree(root: Path) -> None:
    """A small upper directory with each kind of entry an overlay build leaves."""
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "b.conf").write_text("b\n")
    (root / "etc" / "a.conf").write_text("a\n")
    os.link(root / "etc" / "a.conf", root / "etc" / "a-link.conf")
    (root / "etc" / "hostname").write_text("build-host\n")
    (root / "etc" / "shadow").write_text("root:*:20000:0:99999:7:::\nbin:*::0:99999:7:::\n")
    (root / "var" / "log" / "apt").mkdir(parents=True)
    (root / "var" / "log" / "dpkg.log").write_text("2026-12-03 install ...\n")
    (root / "var" / "log" / "apt" / "history.log").write_text("Start-Date: ...\n")
    (root / "bin").mkdir()
    os.symlink("../etc/a.conf", root / "bin" / "link")
    os.mkfifo(root / "bin" / "fifo")
    (root / "empty").mkdir()
    for path in (root / "etc" / "b.conf", root / "bin" / "link", root / "etc"):
        os.utime(path, (LATER, LATER), follow_symlinks=False)
    os.utime(root / "etc" / "a.conf", (EPOCH - 100.5, EPOCH - 100.5))


def _overlay_marks(root: Path) -> None:
    """A whiteout (char 0:0) and an opaque directory, as overlayfs writes them (root only)."""
    os.mknod(root / "etc" / "removed", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.setxattr(root / "empty", "trusted.overlay.opaque", b"y")


def _members(blob: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(blob, "r:gz") as tar:
        return tar.getmembers()


def test_same_tree_same_digests_and_clean_entries(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "whiteouts (mknod) and trusted xattrs need root")
    trees = [tmp_path / "one", tmp_path / "two"]
    blobs = []
    for tree in trees:
        _tree(tree)
        _overlay_marks(tree)
        finalize(tree, EPOCH)
        blobs.append(write_layer(tree, tmp_path / "blobs", EPOCH))
    assert blobs[0].digest == blobs[1].digest and blobs[0].diff_id == blobs[1].diff_id

    members = _members(blobs[0].path)
    names = [m.name for m in members]
    assert names == [
        "bin",
        "bin/fifo",
        "bin/link",
        "empty",
        "empty/.wh..wh..opq",
        "etc",
        "etc/.wh.removed",
        "etc/a-link.conf",
        "etc/a.conf",
        "etc/b.conf",
        "etc/hostname",
        "etc/shadow",
        "var",
        "var/log",
        "var/log/apt",
    ]
    by_name = {m.name: m for m in members}
    assert all(m.uname == "" and m.gname == "" for m in members)
    assert all(m.mtime <= EPOCH for m in members)
    assert by_name["etc/b.conf"].mtime == EPOCH
    assert by_name["etc/a.conf"].mtime == EPOCH - 101  # truncated, not rounded
    assert by_name["etc/a-link.conf"].isreg() and by_name["etc/a.conf"].islnk()
    assert by_name["etc/a.conf"].linkname == "etc/a-link.conf"
    assert by_name["bin/link"].issym() and by_name["bin/fifo"].isfifo()
    assert not any("trusted.overlay" in key for m in members for key in m.pax_headers)

    # Scrubbed: logs gone, host name emptied, shadow's last-change day set to the epoch's.
    with tarfile.open(blobs[0].path, "r:gz") as tar:
        assert tar.extractfile("etc/hostname").read() == b""
        shadow = tar.extractfile("etc/shadow").read().decode()
    assert shadow == f"root:*:{EPOCH // 86400}:0:99999:7:::\nbin:*::0:99999:7:::\n"

    # gzip header: mtime 0, no file name.
    header = blobs[0].path.read_bytes()[:10]
    assert header[3] == 0 and header[4:8] == b"\0\0\0\0"


def test_xattrs_kept_as_pax_records(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "tool").write_bytes(b"#!/bin/sh\n")
    try:
        os.setxattr(tree / "tool", "user.note", b"\x01\xffbinary")
    except OSError as exc:
        pytest.skip(f"user xattrs not supported on {tmp_path}: {exc}")
    blob = write_layer(tree, tmp_path / "blobs", EPOCH)
    with tarfile.open(blob.path, "r:gz") as tar:
        member = tar.getmember("tool")
    value = member.pax_headers["SCHILY.xattr.user.note"]
    assert value.encode("utf-8", "surrogateescape") == b"\x01\xffbinary"


def test_pyc_header_follows_clamped_source(tmp_path: Path) -> None:
    tree = tmp_path / "tree" / "app"
    tree.mkdir(parents=True)
    source = tree / "mod.py"
    source.write_text("VALUE = 1\n")
    os.utime(source, (LATER, LATER))
    cached = Path(importlib.util.cache_from_source(str(source)))
    py_compile.compile(str(source), cfile=str(cached), doraise=True)

    finalize(tmp_path / "tree", EPOCH)

    header = cached.read_bytes()[:16]
    assert int(source.stat().st_mtime) == EPOCH
    assert int.from_bytes(header[8:12], "little") == EPOCH  # still valid: no recompile
    assert cached.stat().st_mtime == EPOCH

    # And Python agrees: importing it does not rewrite the .pyc.
    before = cached.read_bytes()
    sys.path.insert(0, str(tree))
    try:
        sys.dont_write_bytecode = False
        import mod

        assert Path(mod.__cached__) == cached
    finally:
        sys.path.remove(str(tree))
        sys.modules.pop("mod", None)
    assert cached.read_bytes() == before


def test_stale_pyc_left_alone(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    source = tree / "old.py"
    source.write_text("X = 1\n")
    cached = Path(importlib.util.cache_from_source(str(source)))
    py_compile.compile(str(source), cfile=str(cached), doraise=True)
    os.utime(source, (LATER, LATER))  # edited after compiling: the .pyc was stale already

    finalize(tree, EPOCH)

    recorded = int.from_bytes(cached.read_bytes()[8:12], "little")
    assert recorded != EPOCH


def test_gzip_reads_back_as_the_tar(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(1 << 20))
    blob = write_layer(tree, tmp_path / "blobs", EPOCH)
    raw = gzip.decompress(blob.path.read_bytes())
    import hashlib

    assert blob.tar_size == len(raw)
    assert blob.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert blob.path.name == blob.digest.split(":")[1]
