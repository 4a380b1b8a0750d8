"""Small container images to try the snapshotter with: one tree, as OverlayBD and as OCI.

    tree = busybox_tree(work / "rootfs")                 # busybox + applets, a few files
    config = overlaybd_layer(tree, work / "obd")          # ext4 of it, one lz4 ZFile layer
    push_image(config, "127.0.0.1:5000/obd/busybox:v1")   # workbench.registry.image
    push_oci_image(oci_layer(tree), "127.0.0.1:5000/oci/busybox:v1")

The tree holds Debian's static busybox (it runs in an otherwise empty image) with links for
`APPLETS`, ``/etc/hello.txt``, ``/data/random.bin`` (a fixed random pattern of 1 MiB and 3
bytes), ``/data/deep/small.txt``, and the folders a container needs. The tests of the
snapshotter run it both ways and compare what containers print; `workbench bench
snapshotter` starts containers of both.

Caveats:
- the OCI image is for this machine's platform only, its layer one gzip tar with root as
  owner and fixed times (the same tree always gives the same digests);
- the OverlayBD layer differs on every build (mkfs.ext4 writes a fresh UUID and times).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Final

import numpy as np

from workbench.image.commit import import_raw
from workbench.registry.client import OCI_MANIFEST
from workbench.registry.image import OCI_CONFIG
from workbench.registry.reference import ImageReference
from workbench.registry.session import RegistrySession

__all__ = ["APPLETS", "busybox_tree", "oci_layer", "overlaybd_layer", "push_oci_image"]

APPLETS: Final = ("sh", "cat", "ls", "echo", "md5sum", "sleep", "wc", "head", "true")
BUSYBOX: Final = Path("/bin/busybox")
"""Debian's busybox-static puts a static binary here."""

OCI_LAYER_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
_GO_ARCH: Final = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}
_MTIME: Final = 1_700_000_000


def busybox_tree(root: Path) -> Path:
    """Make the image tree at `root` (see the module docstring); returns `root`."""
    if not BUSYBOX.is_file():
        raise FileNotFoundError(f"{BUSYBOX} is missing; apt-get install busybox-static")
    for folder in ("bin", "etc", "data/deep", "proc", "sys", "dev", "tmp", "run"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "hello.txt").write_text("hello from the image\n")
    pattern = np.random.default_rng(6).integers(0, 256, (1 << 20) + 3, np.uint8).tobytes()
    (root / "data" / "random.bin").write_bytes(pattern)
    (root / "data" / "deep" / "small.txt").write_text("small\n" * 100)
    return root


def overlaybd_layer(tree: Path, out_dir: Path, disk_size: int = 32 << 20) -> Path:
    """A config.v1.json of one layer (lz4 ZFile in tar) holding `tree` in ext4."""
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "disk.raw"
    with open(raw, "wb") as file:
        file.truncate(disk_size)
    try:
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-d", str(tree), str(raw)], check=True, capture_output=True
        )
        import_raw(raw, out_dir / "layer.tar", compress="lz4", tar=True)
    finally:
        raw.unlink(missing_ok=True)
    config = out_dir / "config.v1.json"
    config.write_text(json.dumps({"lowers": [{"file": str(out_dir / "layer.tar")}]}))
    return config


def oci_layer(tree: Path) -> tuple[bytes, bytes]:
    """(tar, gzip of it) of `tree`, owned by root, with fixed times."""

    def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = _MTIME
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(tree.iterdir()):
            tar.add(entry, arcname=entry.name, filter=normalize)
    tar_bytes = buffer.getvalue()
    return tar_bytes, gzip.compress(tar_bytes, mtime=0)


def push_oci_image(
    layer: tuple[bytes, bytes],
    reference: ImageReference | str,
    session: RegistrySession | None = None,
) -> str:
    """Push a one-layer OCI image (``PATH=/bin``, ``/bin/sh``); the manifest digest."""
    ref = reference if isinstance(reference, ImageReference) else ImageReference.parse(reference)
    tar_bytes, gzip_bytes = layer
    config = {
        "architecture": _GO_ARCH.get(platform.machine(), platform.machine()),
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [_digest(tar_bytes)]},
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": _digest(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {"mediaType": OCI_LAYER_GZIP, "digest": _digest(gzip_bytes), "size": len(gzip_bytes)}
        ],
    }
    active = (session if session is not None else RegistrySession(use_cache=False)).start()
    try:
        for blob in (gzip_bytes, config_bytes):
            active.run(active.client.push_blob, ref, blob)
        raw = json.dumps(manifest, indent=2).encode()
        return active.run(active.client.push_manifest, ref, raw, OCI_MANIFEST)
    finally:
        if session is None:
            active.close()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
