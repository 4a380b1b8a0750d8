"""Small images from this machine's files, for notebooks and tests: a tree made into ext4.

    rootfs = explore.build.gather(["/usr/lib/python3.11/json"], workdir / "rootfs")
    raw = explore.build.make_ext4(rootfs, workdir / "disk.img")        # mkfs.ext4 -d
    layer = explore.build.import_layer(raw, workdir / "layer.tar")     # LSMT (ZFile, tar)

`gather` copies directories (or files) into one tree, `make_ext4` makes an ext4 image of a
tree with ``mkfs.ext4 -d`` (no root needed, no mount), sized to fit it and with the options
OverlayBD's snapshotter uses (no journal, one block group per flex group), and `import_layer`
turns the raw image into a committed layer with `workbench.image.commit.import_raw`, leaving
out all-zero blocks as ``workbench lsmt import`` does.

Caveats:
- ``mkfs.ext4`` (e2fsprogs) must be installed (`scripts/setup.sh` does it); `make_ext4`
  raises `FileNotFoundError` naming the package otherwise;
- the size estimate (files rounded up to 4 KiB blocks, plus a third, plus 4 MiB of metadata)
  suits small trees of small files; pass `size_bytes` for anything unusual;
- file owners become root (``-E root_owner=0:0``); times and modes are kept.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from workbench.image.commit import import_raw

__all__ = ["gather", "import_layer", "make_ext4", "tree_bytes"]

log = logging.getLogger(__name__)

BLOCK = 4096
MiB = 1 << 20

OVERLAYBD_FEATURES = "^has_journal,sparse_super,flex_bg"
"""The ext4 features OverlayBD's snapshotter makes its file systems with (with ``-G 1``)."""


def gather(sources: Iterable[str | os.PathLike[str]], root: str | os.PathLike[str]) -> Path:
    """Copy each source (a directory or a file) into `root` under its own name; returns root.

    Symbolic links are copied as links; ``__pycache__`` folders are kept (they are part of
    what an installed package holds).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for source in map(Path, sources):
        target = root / source.name
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)
    return root


def tree_bytes(root: str | os.PathLike[str]) -> tuple[int, int]:
    """(files, bytes rounded up to 4 KiB blocks) of a tree."""
    files = blocks = 0
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                files += 1
                blocks += -(-os.path.getsize(path) // BLOCK)
    return files, blocks * BLOCK


def make_ext4(
    root: str | os.PathLike[str],
    raw_path: str | os.PathLike[str],
    size_bytes: int | None = None,
    label: str = "workbench",
) -> Path:
    """An ext4 image of the tree at `root` (``mkfs.ext4 -d``), 4 KiB blocks; returns its path."""
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
    if mkfs is None:
        raise FileNotFoundError(
            "mkfs.ext4 not found; install e2fsprogs (apt-get install e2fsprogs)"
        )
    if size_bytes is None:
        files, data = tree_bytes(root)
        size_bytes = data + data // 3 + files * 2 * BLOCK + 4 * MiB
    size_bytes = -(-size_bytes // MiB) * MiB

    raw_path = Path(raw_path)
    raw_path.unlink(missing_ok=True)
    command = [mkfs, "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-L", label, "-d", str(root)]
    command += ["-O", OVERLAYBD_FEATURES, "-G", "1", "-E", "root_owner=0:0"]
    command += [str(raw_path), f"{size_bytes // 1024}k"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"mkfs.ext4 -d {root} failed (exit {done.returncode}): {done.stderr.strip()}; "
            "pass a larger size_bytes if the tree does not fit"
        )
    log.info("made ext4 image %s of %s: %d bytes", raw_path, root, size_bytes)
    return raw_path


def import_layer(
    raw_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    compress: str | None = "zstd",
    tar: bool = True,
    block_size: int = 4096,
    message: str = "",
) -> Path:
    """A raw disk image as a committed layer (`import_raw`); returns `out_path`."""
    import_raw(
        raw_path, out_path, compress=compress, tar=tar, block_size=block_size, message=message
    )
    return Path(out_path)
