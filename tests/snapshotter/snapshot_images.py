"""Helpers of the snapshotter tests: skip reasons and pushing the test images.

The tree and both layers come from `workbench.snapshotter.images` (busybox, a text file, a
binary file of a fixed random pattern, the folders a container needs); conftest.py makes
them once per session. Pushing them to a registry (`push_overlaybd`, `push_oci`) gives two
images that a container must see alike.
"""

from __future__ import annotations

import os
import shutil
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
