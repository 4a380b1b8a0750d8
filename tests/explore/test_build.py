"""Small ext4 images of local files: gather, mkfs.ext4 -d, import as a layer."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from workbench import explore

needs_mkfs = pytest.mark.skipif(
    shutil.which("mkfs.ext4", path="/usr/sbin:/sbin:" + os.environ.get("PATH", "")) is None
    and not os.environ.get("CI"),
    reason="mkfs.ext4 not installed (apt-get install e2fsprogs)",
)


def _tree(root: Path) -> Path:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "a.txt").write_text("alpha\n" * 1000)
    (root / "pkg" / "sub" / "b.bin").write_bytes(os.urandom(20000))
    (root / "top.txt").write_text("top\n")
    return root


def test_gather_copies_folders_and_files_under_their_names(tmp_path: Path) -> None:
    source = _tree(tmp_path / "source")
    root = explore.build.gather([source / "pkg", source / "top.txt"], tmp_path / "rootfs")
    assert (root / "pkg" / "sub" / "b.bin").read_bytes() == (source / "pkg/sub/b.bin").read_bytes()
    assert (root / "top.txt").read_text() == "top\n"
    files, nbytes = explore.build.tree_bytes(root)
    assert files == 3
    assert nbytes == 4096 * (2 + 5 + 1)  # 6000, 20000 and 4 bytes in 4 KiB blocks


@needs_mkfs
def test_make_ext4_and_import_give_a_layer_holding_the_files(tmp_path: Path) -> None:
    source = _tree(tmp_path / "source")
    raw = explore.build.make_ext4(source, tmp_path / "disk.img")
    assert raw.stat().st_size % (1 << 20) == 0

    # debugfs reads the file back out of the image: the tree went in as it was
    dumped = subprocess.run(
        ["debugfs", "-R", "cat /pkg/a.txt", str(raw)], capture_output=True, check=True
    ).stdout
    assert dumped == (source / "pkg" / "a.txt").read_bytes()

    layer = explore.build.import_layer(raw, tmp_path / "layer.tar")
    with explore.open(layer) as image:
        assert image.size == raw.stat().st_size
        assert image.pread(0, image.size) == raw.read_bytes()
        assert list(image.layers().wrapping) == ["tar+zfile"]


@needs_mkfs
def test_make_ext4_says_when_the_tree_does_not_fit(tmp_path: Path) -> None:
    source = _tree(tmp_path / "source")
    (source / "big.bin").write_bytes(os.urandom(3 << 20))
    with pytest.raises(RuntimeError, match="pass a larger size_bytes"):
        explore.build.make_ext4(source, tmp_path / "disk.img", size_bytes=1 << 20)
