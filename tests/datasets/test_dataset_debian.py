"""The Debian images for real: built, started in a chroot, ready through their own probes.

Opt-in: set WORKBENCH_SLOW_DATASETS=1. Building them needs root, the Debian mirror (and PyPI
for python-numpy-pandas) and takes minutes (debian about 1.5 min, wordpress about 3.5 min
on 2 cores); with an empty cache the whole module takes about 8 minutes, with a warm one
(``$WORKBENCH_DATASETS_DIR``, default ~/.cache/workbench/datasets) well under one. Without
the opt-in, CI skips them so that it stays minutes long; the engine itself is tested on the
tiny busybox image in test_dataset_build.py on every run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from dataset_support import need_builder

from workbench import datasets
from workbench.datasets.chroot import start, unpack
from workbench.datasets.probes import LineProbe

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("WORKBENCH_SLOW_DATASETS"),
        reason="the Debian images take minutes and the mirror; set WORKBENCH_SLOW_DATASETS=1",
    ),
]

DEBIAN = ["debian", "nginx", "redis", "postgres", "python-numpy-pandas", "wordpress"]


@pytest.mark.parametrize("name", DEBIAN)
def test_image_reaches_ready(name: str, tmp_path: Path) -> None:
    need_builder()
    layout = datasets.build(name, progress=True)
    manifest_entry = json.loads((layout / "index.json").read_text())["manifests"][0]
    assert manifest_entry["annotations"]["org.opencontainers.image.ref.name"] == name

    rootfs = unpack(layout, tmp_path / "bundle")
    workload = datasets.workload(name)
    with start(workload, rootfs, tmp_path / "run", net="private") as running:
        result = running.wait_ready()
    print(f"{name}: ready in {result.ready_at - running.started_at:.3f} s: {result.evidence}")


def test_images_share_the_debian_layer() -> None:
    need_builder()
    layers = {}
    for name in DEBIAN:
        layout = datasets.build(name)
        index = json.loads((layout / "index.json").read_text())
        blob = layout / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]
        layers[name] = json.loads(blob.read_text())["layers"]
    base = layers["debian"][0]
    assert all(found[0] == base for found in layers.values())


def test_python_imports_do_not_recompile(tmp_path: Path) -> None:
    need_builder()
    layout = datasets.build("python-numpy-pandas")
    rootfs = unpack(layout, tmp_path / "bundle")
    check = dataclasses.replace(
        datasets.workload("python-numpy-pandas"),
        command=(
            "/bin/sh",
            "-c",
            "echo stale=$(PYTHONDONTWRITEBYTECODE=1 python3 -v -c 'import pandas' 2>&1 "
            "| grep -c 'bytecode is stale')",
        ),
        probe=LineProbe.output(r"^stale=\d+$"),
    )
    with start(check, rootfs, tmp_path / "run") as running:
        result = running.wait_ready()
    assert result.evidence == "stale=0"


def test_debian_base_is_reproducible(tmp_path: Path) -> None:
    """debian built again in an empty cache gives the same layer and manifest digests."""
    need_builder()
    cached = datasets.build("debian")
    fresh = datasets.build("debian", cache_dir=tmp_path / "cache", progress=True)
    assert (fresh / "index.json").read_bytes() == (cached / "index.json").read_bytes()
