"""Images for the snapshotter tests: one folder tree as an OverlayBD image and as an OCI image.

The tree and both layers come from `workbench.snapshotter.images` (busybox, a text file, a
binary file of a fixed random pattern, the folders a container needs). Pushing them to the
module's embedded registry (`push_overlaybd`, `push_oci`) gives two images that a container
must see alike.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from workbench.snapshotter import images

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
    if not images.BUSYBOX.is_file():
        return f"{images.BUSYBOX} is missing (apt-get install busybox-static)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} missing; scripts/setup.sh installs them"
    return None


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(mount_reason())
    return images.busybox_tree(tmp_path_factory.mktemp("tree") / "rootfs")


@pytest.fixture(scope="session")
def overlaybd_layer(image_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """config.v1.json of one lz4 ZFile layer (tar-wrapped) holding the tree in ext4."""
    return images.overlaybd_layer(image_tree, tmp_path_factory.mktemp("overlaybd"))


@pytest.fixture(scope="session")
def oci_layer(image_tree: Path) -> tuple[bytes, bytes]:
    return images.oci_layer(image_tree)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(host:port, storage folder) of an embedded registry."""
    from workbench.registry.server import EmbeddedRegistry

    storage = tmp_path_factory.mktemp("registry")
    with EmbeddedRegistry(storage) as served:
        yield served.url.removeprefix("http://"), storage


def push_overlaybd(registry: tuple[str, Path], config: Path, name: str) -> str:
    """Push the layer of `config` as an OverlayBD image; its reference."""
    from workbench.registry.image import push_image

    reference = f"{registry[0]}/{name}"
    push_image(config, reference)
    return reference


def push_oci(registry: tuple[str, Path], layer: tuple[bytes, bytes], name: str) -> str:
    """Push the gzip layer as an ordinary OCI image for this machine; its reference."""
    reference = f"{registry[0]}/{name}"
    images.push_oci_image(layer, reference)
    return reference
