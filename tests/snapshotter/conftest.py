"""Fixtures of the snapshotter tests: the image tree, its two layers, an embedded registry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from snapshot_images import mount_reason, require

from workbench.snapshotter import images


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
