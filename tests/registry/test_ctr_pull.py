"""`ctr image pull` works against the embedded registry as against Debian's docker-registry.

The acceptance test of issue 3 with a real containerd: a private daemon (tests/registries.py
containerd_daemon: own root, state and socket under tmp_path, CRI off) pulls a small image with
one gzip layer over plain HTTP, unpacks it with its default (overlayfs) snapshotter, and must
list it under the pushed manifest digest with every blob complete. Each test runs against both
registries, so the embedded one is shown to behave as the reference does; the image is pushed
once as OCI and once as Docker schema 2, the two manifest kinds containerd resolves. Two more
tests push with ctr: by cross-repository mount, and by upload of an imported image (containerd's
Go client: POST, then one PUT with the body and a percent-encoded digest).

Needs root, containerd and runc (Debian packages); skipped without them unless CI is set.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import platform
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from registries import (
    DOCKER_MEDIA_TYPES,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    REGISTRIES,
    ContainerdDaemon,
    containerd_daemon,
    push_image,
    sha256_digest,
    start_registry,
)

FILES = {
    "etc/workbench-release": b"workbench test image\n",
    "srv/data/hello.txt": b"hello from the embedded registry\n" * 100,
}
GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}


def gzip_layer(files: dict[str, bytes]) -> tuple[bytes, bytes]:
    """(tar, gzip of tar) of the files, with fixed mtimes so the digests are stable."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = buffer.getvalue()
    return tar_bytes, gzip.compress(tar_bytes, mtime=0)


def image_config(diff_ids: list[str]) -> dict:
    """The host's platform: ctr unpacks only an image whose config matches it."""
    return {
        "architecture": GO_ARCH.get(platform.machine(), platform.machine()),
        "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }


@pytest.fixture(params=REGISTRIES)
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with start_registry(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[ContainerdDaemon]:
    with containerd_daemon(tmp_path) as daemon:
        yield daemon
    assert not Path(f"/proc/{daemon.pid}").exists(), "containerd outlived the test"
    with open("/proc/self/mountinfo") as mountinfo:
        left = [line.split()[4] for line in mountinfo if str(tmp_path) in line]
    assert left == [], f"mounts left behind: {left}"


def image_rows(daemon: ContainerdDaemon) -> dict[str, list[str]]:
    """`ctr image ls` as {ref: [type, digest, ...]}."""
    lines = daemon.ctr("image", "ls").splitlines()[1:]
    return {fields[0]: fields[1:] for fields in (line.split() for line in lines)}


@pytest.mark.slow
@pytest.mark.parametrize(
    "media_types",
    [(OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP), DOCKER_MEDIA_TYPES],
    ids=["oci", "docker-schema2"],
)
def test_ctr_pull_lists_the_pushed_digest_with_every_blob_complete(
    registry: str, containerd: ContainerdDaemon, media_types: tuple[str, str, str]
) -> None:
    tar_bytes, layer = gzip_layer(FILES)
    config = image_config([sha256_digest(tar_bytes)])
    manifest_digest = push_image(
        registry, "lib/hello", "v1", [layer], config, media_types=media_types
    )
    ref = registry.removeprefix("http://") + "/lib/hello:v1"

    containerd.ctr("image", "pull", "--plain-http", ref)

    row = image_rows(containerd)[ref]
    assert row[0] == media_types[0]
    assert row[1] == manifest_digest
    # REF TYPE DIGEST STATUS (blobs present/needed: config and layer) SIZE UNPACKED
    (check,) = [line.split() for line in containerd.ctr("image", "check").splitlines()[1:]]
    assert check[0] == ref
    assert check[3:5] == ["complete", "(2/2)"], check
    assert check[-1] == "true", check
    assert containerd.ctr_bytes("content", "get", sha256_digest(layer)) == layer


@pytest.mark.slow
def test_ctr_unpacked_the_layer_files(
    registry: str, containerd: ContainerdDaemon, tmp_path: Path
) -> None:
    tar_bytes, layer = gzip_layer(FILES)
    config = image_config([sha256_digest(tar_bytes)])
    push_image(
        registry,
        "lib/hello",
        "v1",
        [layer],
        config,
        media_types=(OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP),
    )
    ref = registry.removeprefix("http://") + "/lib/hello:v1"
    containerd.ctr("image", "pull", "--plain-http", ref)

    target = tmp_path / "rootfs"
    target.mkdir()
    containerd.ctr("image", "mount", ref, str(target))
    try:
        for name, data in FILES.items():
            assert (target / name).read_bytes() == data
    finally:
        containerd.ctr("image", "unmount", str(target))
    assert not os.path.ismount(target)


@pytest.mark.slow
def test_ctr_push_mounts_across_repositories_then_pulls_back(
    registry: str, containerd: ContainerdDaemon
) -> None:
    tar_bytes, layer = gzip_layer(FILES)
    config = image_config([sha256_digest(tar_bytes)])
    media_types = (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP)
    digest = push_image(registry, "lib/hello", "v1", [layer], config, media_types=media_types)
    host = registry.removeprefix("http://")
    containerd.ctr("image", "pull", "--plain-http", f"{host}/lib/hello:v1")

    copy = f"{host}/other/copy:v2"
    containerd.ctr("image", "tag", f"{host}/lib/hello:v1", copy)
    containerd.ctr("image", "push", "--plain-http", copy)
    containerd.ctr("image", "rm", "--sync", copy, f"{host}/lib/hello:v1")
    containerd.ctr("content", "prune", "references")
    containerd.ctr("image", "pull", "--plain-http", copy)

    assert image_rows(containerd)[copy][1] == digest


def oci_archive(layer: bytes, config: dict, ref_name: str) -> tuple[bytes, str]:
    """An OCI image layout as a tar, what `ctr image import` reads; and its manifest digest."""
    config_bytes = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": sha256_digest(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {"mediaType": OCI_LAYER_GZIP, "digest": sha256_digest(layer), "size": len(layer)}
        ],
    }
    manifest_bytes = json.dumps(manifest).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": sha256_digest(manifest_bytes),
                "size": len(manifest_bytes),
                "annotations": {"org.opencontainers.image.ref.name": ref_name},
            }
        ],
    }
    entries = {
        "oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
        "index.json": json.dumps(index).encode(),
        **{
            "blobs/sha256/" + sha256_digest(blob).removeprefix("sha256:"): blob
            for blob in (layer, config_bytes, manifest_bytes)
        },
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), sha256_digest(manifest_bytes)


@pytest.mark.slow
def test_ctr_push_uploads_an_imported_image(
    registry: str, containerd: ContainerdDaemon, tmp_path: Path
) -> None:
    # imported content has no distribution source, so ctr must upload every blob itself
    tar_bytes, layer = gzip_layer(FILES)
    ref = registry.removeprefix("http://") + "/imported/hello:v3"
    archive, digest = oci_archive(layer, image_config([sha256_digest(tar_bytes)]), ref)
    (tmp_path / "image.tar").write_bytes(archive)
    containerd.ctr(
        "image", "import", "--base-name", ref.rsplit(":", 1)[0], str(tmp_path / "image.tar")
    )

    containerd.ctr("image", "push", "--plain-http", ref)

    with httpx.Client(base_url=registry, timeout=30) as http:
        answer = http.get("/v2/imported/hello/manifests/v3", headers={"Accept": OCI_MANIFEST})
        assert answer.status_code == 200
        assert answer.headers["docker-content-digest"] == digest
        assert http.get(f"/v2/imported/hello/blobs/{sha256_digest(layer)}").content == layer
