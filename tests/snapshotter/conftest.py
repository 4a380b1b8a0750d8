"""Images for the snapshotter tests: one folder tree as an OverlayBD image and as an OCI image.

The tree holds busybox (static, so it runs in an otherwise empty image) with a few applet
links, a text file, a binary file of a fixed random pattern and the folders a container
needs. `overlaybd_layer` is that tree in an ext4 file system (`mkfs.ext4 -d`), imported as
an lz4 ZFile layer in tar (`import_raw`); `oci_layer` is the same tree as a gzip tar layer.
Pushing them to a registry (`push_overlaybd`, `push_oci`) gives two images that a container
must see alike.
"""

from __future__ import annotations

import gzip
import io
import os
import platform
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from registries import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, push_image, sha256_digest

MiB = 1 << 20
APPLETS = ("sh", "cat", "ls", "echo", "md5sum", "sleep", "wc", "head", "true")
GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
TOOLS = ("losetup", "mkfs.ext4", "fusermount3", "containerd", "ctr", "runc")


def require(reason: str | None) -> None:
    """Skip with `reason` (fail under CI, which installs everything)."""
    if reason is None:
        return
    if os.environ.get("CI"):
        raise RuntimeError(f"{reason}; CI must run the snapshotter tests")
    pytest.skip(reason)


def mount_reason() -> str | None:
    if os.geteuid() != 0:
        return "the snapshotter tests need root (mounts, loop devices)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not os.path.exists("/bin/busybox"):
        return "busybox is missing (apt-get install busybox-static)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} missing; scripts/setup.sh installs them"
    return None


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(mount_reason())
    root = tmp_path_factory.mktemp("tree") / "rootfs"
    for folder in ("bin", "etc", "data/deep", "proc", "sys", "dev", "tmp", "run"):
        (root / folder).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "hello.txt").write_text("hello from the image\n")
    pattern = np.random.default_rng(6).integers(0, 256, MiB + 3, np.uint8).tobytes()
    (root / "data" / "random.bin").write_bytes(pattern)
    (root / "data" / "deep" / "small.txt").write_text("small\n" * 100)
    return root


@pytest.fixture(scope="session")
def overlaybd_layer(image_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """config.v1.json of one lz4 ZFile layer (tar-wrapped) holding the tree in ext4."""
    from workbench.image.commit import import_raw

    base = tmp_path_factory.mktemp("overlaybd")
    raw = base / "disk.raw"
    with open(raw, "wb") as file:
        file.truncate(32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(image_tree), str(raw)], check=True)
    import_raw(raw, base / "layer.tar", compress="lz4", tar=True)
    raw.unlink()
    config = base / "config.v1.json"
    config.write_text(f'{{"lowers": [{{"file": "{base / "layer.tar"}"}}]}}')
    return config


@pytest.fixture(scope="session")
def oci_layer(image_tree: Path) -> tuple[bytes, bytes]:
    """(tar, gzip) of the tree, owned by root, fixed mtimes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 1_700_000_000
            return info

        for entry in sorted(image_tree.iterdir()):
            tar.add(entry, arcname=entry.name, filter=normalize)
    tar_bytes = buffer.getvalue()
    return tar_bytes, gzip.compress(tar_bytes, mtime=0)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(host:port, storage folder) of an embedded registry."""
    from workbench.registry.server import EmbeddedRegistry

    storage = tmp_path_factory.mktemp("registry")
    with EmbeddedRegistry(storage) as served:
        yield served.url.removeprefix("http://"), storage


def push_overlaybd(registry: tuple[str, Path], config: Path, name: str) -> str:
    """Push the layer of `config` as an OverlayBD image; its reference."""
    from workbench.registry.image import push_image as push_overlaybd_image

    reference = f"{registry[0]}/{name}"
    push_overlaybd_image(config, reference)
    return reference


def push_oci(registry: tuple[str, Path], layer: tuple[bytes, bytes], name: str) -> str:
    """Push the gzip layer as an ordinary OCI image for this machine; its reference."""
    tar_bytes, gzip_bytes = layer
    repository, _, tag = name.partition(":")
    config = {
        "architecture": GO_ARCH.get(platform.machine(), platform.machine()),
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(tar_bytes)]},
    }
    media_types = (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP)
    push_image(
        f"http://{registry[0]}", repository, tag, [gzip_bytes], config, media_types=media_types
    )
    return f"{registry[0]}/{name}"
