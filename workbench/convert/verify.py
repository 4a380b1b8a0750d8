"""Verifying a converted image against its source, path by path.

`verify_image(source, converted)`:

    1. extracts the source image (registry reference or ``oci:DIR[:TAG]``) layer by layer
       into a plain directory with the converter's own OCI applier
       (`workbench.convert.apply`), the root made as mkfs makes it (0755, root, `FIXED_TIME`);
    2. mounts the converted image read-only through the device layer: a registry reference
       is read lazily (`mount_image` resolves it), an ``oci:`` layout from its blob files;
    3. walks both trees and compares, for every path: type, permission bits, owner, group,
       size and sha256 of regular files, symlink target, device numbers, xattrs, mtime (ns),
       and which paths share an inode (hard links).

The result is a `VerifyReport` whose `differences` is empty when the trees are equal. The
file system's own ``lost+found`` is left out unless the source has one.

Caveats:
- both trees are read whole (every file hashed): time is that of reading the image once
  from the registry, plus the extraction;
- atimes and ctimes are not compared (the kernel sets them on read and on change).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
from pathlib import Path
from typing import Any

from workbench.convert.apply import FIXED_TIME, apply_layer, layer_compression
from workbench.convert.oci import open_source, parse_layout
from workbench.registry.session import RegistrySession

__all__ = ["Difference", "VerifyReport", "verify_image", "walk_tree"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Difference:
    """One path where the trees differ: what differs, the source's and the converted value."""

    path: str
    what: str
    expected: Any
    actual: Any

    def __str__(self) -> str:
        return (
            f"{self.path}: {self.what} {self.expected!r} in the source, {self.actual!r} converted"
        )


@dataclasses.dataclass
class VerifyReport:
    source: str
    converted: str
    paths: int
    differences: list[Difference]

    @property
    def ok(self) -> bool:
        return not self.differences


def verify_image(
    source: str,
    converted: str,
    *,
    session: RegistrySession | None = None,
    workdir: str | os.PathLike[str] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    platform: str = "linux/amd64",
) -> VerifyReport:
    """Compare the converted image `converted` with its source `source` (module docstring)."""
    from workbench.convert.convert import _workdir
    from workbench.device.mount import mount_image, unmount
    from workbench.registry.image import _session

    with _session(session) as active, _workdir(workdir, "workbench-verify-") as work:
        expected_root = work / "source-rootfs"
        _extract(source, expected_root, work, active, platform)
        expected = walk_tree(expected_root)

        mountpoint = work / "converted"
        mountpoint.mkdir()
        run = Path(run_dir) if run_dir is not None else work / "run"
        image = _converted_config(converted, work, active, platform)
        # A cache folder of its own: the default one may be in use by another process.
        mount_image(image, mountpoint, run_dir=run, cache_dir=work / "cache")
        try:
            actual = walk_tree(mountpoint)
        finally:
            unmount(mountpoint, run)
        if "lost+found" not in expected:
            actual = {path: entry for path, entry in actual.items() if path != "lost+found"}

    differences = compare_trees(expected, actual)
    log.info(
        "verified %s against %s: %d paths, %d differences",
        converted,
        source,
        len(expected),
        len(differences),
    )
    return VerifyReport(source, converted, len(expected), differences)


def _extract(source: str, root: Path, work: Path, session: RegistrySession, platform: str) -> None:
    image = open_source(source, session, platform)
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    os.utime(root, ns=(FIXED_TIME * 10**9, FIXED_TIME * 10**9))
    for position, layer in enumerate(image.layers):
        where = f"image {image.name}: layer {position} ({layer.digest})"
        blob = work / f"verify-{position}.blob"
        image.fetch_layer(position, blob)
        with blob.open("rb") as head:
            compression = layer_compression(layer.media_type, head.read(4), where)
        apply_layer(blob, root, compression=compression, where=where)
        blob.unlink()


def _converted_config(converted: str, work: Path, session: RegistrySession, platform: str) -> str:
    """What `mount_image` takes for `converted`: the reference, or a config of layout blobs."""
    layout = parse_layout(converted)
    if layout is None:
        return converted
    from workbench.formats.config import ImageConfig, LowerConfig

    image = open_source(converted, session, platform)
    store = layout[0] / "blobs" / "sha256"
    lowers = [
        LowerConfig(file=str(store / layer.digest.partition(":")[2])) for layer in image.layers
    ]
    path = work / "converted.config.v1.json"
    ImageConfig(lowers=lowers).dump(path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Trees


def walk_tree(root: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Every path under `root` ("" is the root) -> what `verify_image` compares."""
    entries: dict[str, dict[str, Any]] = {}
    inodes: dict[int, str] = {}

    def visit(path: str, relative: str) -> None:
        info = os.lstat(path)
        entry = _describe(path, info)
        if not stat.S_ISDIR(info.st_mode):
            entry["hardlink"] = inodes.setdefault(info.st_ino, relative)
        entries[relative] = entry
        if stat.S_ISDIR(info.st_mode):
            with os.scandir(path) as children:
                names = sorted(child.name for child in children)
            for name in names:
                visit(os.path.join(path, name), f"{relative}/{name}" if relative else name)

    visit(os.fspath(root), "")
    return entries


def _describe(path: str, info: os.stat_result) -> dict[str, Any]:
    kind = stat.S_IFMT(info.st_mode)
    entry: dict[str, Any] = {
        "type": _TYPE_NAMES.get(kind, oct(kind)),
        "mode": oct(stat.S_IMODE(info.st_mode)),
        "uid": info.st_uid,
        "gid": info.st_gid,
        "xattrs": _xattrs(path),
        "mtime_ns": info.st_mtime_ns,
    }
    if stat.S_ISREG(info.st_mode):
        entry["size"] = info.st_size
        entry["sha256"] = _hash_file(path)
    elif stat.S_ISLNK(info.st_mode):
        entry["target"] = os.readlink(path)
    elif stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
        entry["rdev"] = (os.major(info.st_rdev), os.minor(info.st_rdev))
    return entry


_TYPE_NAMES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def _xattrs(path: str) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {name: os.getxattr(path, name, follow_symlinks=False).hex() for name in sorted(names)}


def _hash_file(path: str) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


def compare_trees(
    expected: dict[str, dict[str, Any]], actual: dict[str, dict[str, Any]]
) -> list[Difference]:
    """The differences between two `walk_tree` results, in path order."""
    differences = []
    for path in sorted(set(expected) | set(actual)):
        want, got = expected.get(path), actual.get(path)
        if want is None or got is None:
            differences.append(
                Difference(path or "/", "presence", want is not None, got is not None)
            )
            continue
        for key in sorted(set(want) | set(got)):
            if want.get(key) != got.get(key):
                differences.append(Difference(path or "/", key, want.get(key), got.get(key)))
    return differences
