"""OverlayBD images in a registry: push a config's layers, resolve the image back to a config.

The image is built with the workbench's own tools (two writable layers committed as
tar(ZFile(LSMT)), lz4 and zstd). Round trips run against the embedded registry and Debian's
docker-registry; skopeo, a real client, inspects and copies what was pushed. Images the
workbench must refuse (plain OCI, TurboOCI, inconsistent annotations) are written by hand with
httpx, not with the code under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import registries
from click.testing import CliRunner
from registries import OCI_CONFIG, OCI_MANIFEST, REGISTRIES, push_blob, start_registry

from workbench.cli import cli
from workbench.errors import (
    FormatError,
    ImageConfigError,
    ImageReferenceError,
    ManifestError,
    ManifestNotFoundError,
    UnsupportedFormatError,
)
from workbench.formats.config import ImageConfig, LowerConfig, UpperConfig
from workbench.image.commit import commit_writable
from workbench.image.open import open_image
from workbench.image.writable import WritableLayer
from workbench.registry.image import (
    ACCELERATION_LAYER,
    BLOB_DIGEST,
    BLOB_FS_TYPE,
    BLOB_SIZE,
    OCI_LAYER_TAR,
    VERSION,
    UnsupportedImageError,
    push_image,
    resolve_image,
    write_image_config,
)
from workbench.registry.server import OCI_INDEX
from workbench.registry.session import RegistrySession

MiB = 1 << 20
VIRTUAL_SIZE = 8 * MiB
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


# ---------------------------------------------------------------------------------------------
# Fixtures


@dataclass(frozen=True)
class LocalImage:
    """Two committed layers, the config that stacks them, and the disk they make."""

    config: Path
    layers: tuple[Path, ...]
    disk: bytes

    @property
    def digests(self) -> list[str]:
        return [digest_of(path.read_bytes()) for path in self.layers]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def local_image(tmp_path_factory: pytest.TempPathFactory) -> LocalImage:
    """base.tar (lz4) and app.tar (zstd, overwrites and trims part of base), both tar-wrapped."""
    where = tmp_path_factory.mktemp("image")
    rng = random.Random(11)
    disk = bytearray(VIRTUAL_SIZE)

    def write(layer: WritableLayer, offset: int, data: bytes) -> None:
        layer.pwrite(offset, data)
        disk[offset : offset + len(data)] = data

    with WritableLayer.create(where / "base.data", where / "base.index", VIRTUAL_SIZE) as base:
        write(base, 0, rng.randbytes(MiB))
        write(base, 3 * MiB, (b"overlaybd layer text\n" * 50_000)[:MiB])
        write(base, VIRTUAL_SIZE - 64 * 1024, rng.randbytes(64 * 1024))
        base.flush()
        commit_writable(base, where / "base.tar", message="base", compress="lz4", tar=True)
        base_uuid = base.uuid

    with WritableLayer.create(
        where / "app.data", where / "app.index", VIRTUAL_SIZE, parent_uuid=base_uuid
    ) as app:
        write(app, 512 * 1024, rng.randbytes(MiB))
        app.trim(3 * MiB + 4096, 64 * 1024)
        disk[3 * MiB + 4096 : 3 * MiB + 4096 + 64 * 1024] = bytes(64 * 1024)
        app.flush()
        commit_writable(app, where / "app.tar", message="app", compress="zstd", tar=True)

    layers = (where / "base.tar", where / "app.tar")
    config = ImageConfig(lowers=[LowerConfig(file=str(path)) for path in layers])
    config.dump(where / "config.v1.json")
    return LocalImage(where / "config.v1.json", layers, bytes(disk))


@pytest.fixture(params=REGISTRIES)
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with start_registry(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[str]:
    with start_registry("embedded", tmp_path) as url:
        yield url


@pytest.fixture
def session(tmp_path: Path) -> Iterator[RegistrySession]:
    with RegistrySession(tmp_path / "cache") as active:
        yield active


def host(url: str) -> str:
    return url.removeprefix("http://")


def read_disk(config: ImageConfig | Path, session: RegistrySession | None = None) -> bytes:
    with open_image(config, upper="none", session=session) as image:
        return image.pread(0, image.size)


def get_manifest(url: str, repo: str, reference: str) -> httpx.Response:
    response = httpx.get(
        f"{url}/v2/{repo}/manifests/{reference}", headers={"Accept": OCI_MANIFEST}, timeout=30
    )
    assert response.status_code == 200, response.text
    return response


def put_image(url: str, repo: str, tag: str, layers: list[tuple[bytes, str, dict]]) -> str:
    """An image written by hand: (blob, media type, annotations) per layer; its digest."""
    descriptors = []
    for data, media_type, layer_annotations in layers:
        digest = push_blob(url, repo, data)
        descriptors.append(
            {
                "mediaType": media_type,
                "digest": digest,
                "size": len(data),
                "annotations": layer_annotations,
            }
        )
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descriptors]},
        }
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": push_blob(url, repo, config),
            "size": len(config),
        },
        "layers": descriptors,
    }
    body = json.dumps(manifest).encode()
    response = httpx.put(
        f"{url}/v2/{repo}/manifests/{tag}",
        content=body,
        headers={"Content-Type": OCI_MANIFEST},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return digest_of(body)


def overlaybd_annotations(data: bytes, **extra: str) -> dict[str, str]:
    return {
        BLOB_DIGEST: digest_of(data),
        BLOB_SIZE: str(len(data)),
        BLOB_FS_TYPE: "ext4",
        VERSION: "0.1.0",
        **extra,
    }


def trace_layer() -> bytes:
    """An acceleration layer as `ctr record-trace` builds it: a tar holding one file `trace`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("trace")
        info.size, info.mode = 24, 0o444
        tar.addfile(info, io.BytesIO(bytes(24)))
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Push and resolve, against both registries


def test_push_then_resolve_reads_the_same_disk(
    registry: str, local_image: LocalImage, session: RegistrySession, tmp_path: Path
) -> None:
    ref = f"{host(registry)}/lib/app:v1"
    digest = push_image(local_image.config, ref, session)
    assert digest == get_manifest(registry, "lib/app", "v1").headers["docker-content-digest"]

    config = resolve_image(ref, session)
    assert config.repo_blob_url == f"{registry}/v2/lib/app/blobs"
    assert [lower.digest for lower in config.lowers] == local_image.digests
    assert [lower.size for lower in config.lowers] == [p.stat().st_size for p in local_image.layers]
    assert config.upper.is_empty
    assert not config.acceleration_layer

    assert read_disk(local_image.config) == local_image.disk
    assert read_disk(config, session) == local_image.disk

    # By digest too, and written to a file that open_image takes as it is.
    path = tmp_path / "remote" / "config.v1.json"
    path.parent.mkdir()
    written = write_image_config(f"{host(registry)}/lib/app@{digest}", path, session)
    assert ImageConfig.load(path).to_json() == written.to_json() == config.to_json()
    assert read_disk(path, session) == local_image.disk


def test_pushed_manifest_is_an_overlaybd_image(registry: str, local_image: LocalImage) -> None:
    push_image(local_image.config, f"{host(registry)}/lib/app:v1", fs_type="erofs")

    response = get_manifest(registry, "lib/app", "v1")
    assert response.headers["content-type"] == OCI_MANIFEST
    manifest = response.json()
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == OCI_MANIFEST
    sizes = [path.stat().st_size for path in local_image.layers]
    assert manifest["layers"] == [
        {
            "mediaType": OCI_LAYER_TAR,
            "digest": digest,
            "size": size,
            "annotations": {
                BLOB_DIGEST: digest,
                BLOB_SIZE: str(size),
                BLOB_FS_TYPE: "erofs",
                VERSION: "0.1.0",
            },
        }
        for digest, size in zip(local_image.digests, sizes, strict=True)
    ]

    assert manifest["config"]["mediaType"] == OCI_CONFIG
    blob = httpx.get(f"{registry}/v2/lib/app/blobs/{manifest['config']['digest']}").content
    assert digest_of(blob) == manifest["config"]["digest"]
    assert json.loads(blob) == {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": local_image.digests},
    }
    for path, digest in zip(local_image.layers, local_image.digests, strict=True):
        assert httpx.get(f"{registry}/v2/lib/app/blobs/{digest}").content == path.read_bytes()


def test_a_second_push_uploads_nothing(
    registry: str,
    local_image: LocalImage,
    session: RegistrySession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref = f"{host(registry)}/lib/app:v1"
    first = push_image(local_image.config, ref, session)

    uploads = []
    original = session.client.push_blob

    async def counting(*args: object) -> str:
        uploads.append(args)
        return await original(*args)

    monkeypatch.setattr(session.client, "push_blob", counting)
    assert push_image(local_image.config, f"{host(registry)}/lib/app:v2", session) == first
    assert uploads == []
    assert get_manifest(registry, "lib/app", "v2").headers["docker-content-digest"] == first


def test_a_resolved_image_pushes_to_another_tag_and_repository(
    registry: str, local_image: LocalImage, session: RegistrySession
) -> None:
    """Remote lowers: referenced in their own repository, copied into another one."""
    first = push_image(local_image.config, f"{host(registry)}/lib/app:v1", session)
    resolved = resolve_image(f"{host(registry)}/lib/app:v1", session)

    assert push_image(resolved, f"{host(registry)}/lib/app:v2", session) == first
    copied = push_image(resolved, f"{host(registry)}/other/copy:v1", session)
    assert copied == first  # same layers, same config: the same manifest

    config = resolve_image(f"{host(registry)}/other/copy:v1", session)
    assert config.repo_blob_url == f"{registry}/v2/other/copy/blobs"
    assert read_disk(config, session) == local_image.disk


def test_a_plain_oci_image_is_refused(registry: str) -> None:
    layer = trace_layer()
    registries.push_image(registry, "lib/plain", "v1", [layer])
    message = (
        rf"^image {host(registry)}/lib/plain:v1 \(manifest sha256:[0-9a-f]{{64}}\): "
        rf"layer 0 \({digest_of(layer)}, {OCI_LAYER_TAR}\) has no {BLOB_DIGEST} annotation: "
        r"it is not an OverlayBD layer .*convert it to OverlayBD first"
    )
    with pytest.raises(UnsupportedImageError, match=message):
        resolve_image(f"{host(registry)}/lib/plain:v1")


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_skopeo_inspects_and_copies_the_pushed_image(
    registry: str, local_image: LocalImage, tmp_path: Path
) -> None:
    """A real client takes the manifest, the config and the layers as a valid OCI image."""
    digest = push_image(local_image.config, f"{host(registry)}/lib/app:v1")
    remote = f"docker://{host(registry)}/lib/app:v1"

    inspected = json.loads(skopeo("inspect", "--tls-verify=false", remote))
    assert inspected["Digest"] == digest
    assert (inspected["Os"], inspected["Architecture"]) == ("linux", "amd64")
    assert inspected["Layers"] == local_image.digests
    raw = skopeo("inspect", "--tls-verify=false", "--raw", remote)
    assert digest_of(raw.encode()) == digest
    annotations = [layer["annotations"] for layer in json.loads(raw)["layers"]]
    assert [a[BLOB_DIGEST] for a in annotations] == local_image.digests

    skopeo(
        "copy", "--preserve-digests", "--src-tls-verify=false", remote, f"oci:{tmp_path / 'out'}:v1"
    )
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == digest
    blobs = tmp_path / "out" / "blobs" / "sha256"
    for path, layer_digest in zip(local_image.layers, local_image.digests, strict=True):
        assert (blobs / layer_digest.removeprefix("sha256:")).read_bytes() == path.read_bytes()


def skopeo(*args: str) -> str:
    result = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


# ---------------------------------------------------------------------------------------------
# Resolve: what else an image may be (embedded registry)


def test_an_index_is_resolved_to_the_platform(
    embedded: str, local_image: LocalImage, session: RegistrySession
) -> None:
    digest = push_image(local_image.config, f"{host(embedded)}/lib/app:amd64", session)
    size = len(get_manifest(embedded, "lib/app", digest).content)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest,
                "size": size,
                "platform": {"architecture": "amd64", "os": "linux"},
            }
        ],
    }
    response = httpx.put(
        f"{embedded}/v2/lib/app/manifests/multi",
        content=json.dumps(index).encode(),
        headers={"Content-Type": OCI_INDEX},
    )
    assert response.status_code == 201

    config = resolve_image(f"{host(embedded)}/lib/app:multi", session)
    assert [lower.digest for lower in config.lowers] == local_image.digests
    with pytest.raises(ManifestError, match="no manifest for platform"):
        resolve_image(f"{host(embedded)}/lib/app:multi", session, platform="linux/arm64")


def test_an_acceleration_layer_on_top_is_the_last_lower(
    embedded: str, local_image: LocalImage, session: RegistrySession, tmp_path: Path
) -> None:
    (tmp_path / "trace.tar").write_bytes(trace_layer())
    config = ImageConfig(
        lowers=[
            *(LowerConfig(file=str(path)) for path in local_image.layers),
            LowerConfig(file=str(tmp_path / "trace.tar")),
        ],
        acceleration_layer=True,
    )
    push_image(config, f"{host(embedded)}/lib/app:fast", session)
    top = get_manifest(embedded, "lib/app", "fast").json()["layers"][-1]
    assert top["annotations"][ACCELERATION_LAYER] == "yes"

    resolved = resolve_image(f"{host(embedded)}/lib/app:fast", session)
    assert resolved.acceleration_layer
    assert [lower.digest for lower in resolved.lowers] == [
        *local_image.digests,
        digest_of(trace_layer()),
    ]
    assert read_disk(resolved, session) == local_image.disk


def test_an_acceleration_layer_below_the_top_is_refused(
    embedded: str, local_image: LocalImage
) -> None:
    base = local_image.layers[0].read_bytes()
    trace = trace_layer()
    put_image(
        embedded,
        "lib/odd",
        "v1",
        [
            (trace, OCI_LAYER_TAR, overlaybd_annotations(trace, **{ACCELERATION_LAYER: "yes"})),
            (base, OCI_LAYER_TAR, overlaybd_annotations(base)),
        ],
    )
    with pytest.raises(UnsupportedImageError, match=r"layer 0 .* acceleration \(trace\) layer"):
        resolve_image(f"{host(embedded)}/lib/odd:v1")


def test_a_turbo_oci_layer_is_refused(embedded: str) -> None:
    meta = trace_layer()
    annotations = overlaybd_annotations(
        meta,
        **{
            VERSION: "0.1.0-turbo.ociv1",
            "containerd.io/snapshot/overlaybd/turbo-oci/target-digest": "sha256:" + "1" * 64,
            "containerd.io/snapshot/overlaybd/turbo-oci/target-media-type": OCI_LAYER_GZIP,
        },
    )
    put_image(embedded, "lib/turbo", "v1", [(meta, OCI_LAYER_GZIP, annotations)])
    with pytest.raises(
        UnsupportedImageError,
        match=rf"layer 0 \({digest_of(meta)}, .*\) is a TurboOCI layer .*convert the image",
    ):
        resolve_image(f"{host(embedded)}/lib/turbo:v1")


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        (BLOB_SIZE, "12", r"blob-size is '12', the descriptor says \d+ bytes"),
        (BLOB_SIZE, "", r"blob-size is 'missing'"),
        (BLOB_DIGEST, "sha256:" + "2" * 64, r"blob-digest is sha256:2{64}, the descriptor's"),
    ],
)
def test_annotations_must_agree_with_the_descriptor(
    embedded: str, local_image: LocalImage, key: str, value: str, rule: str
) -> None:
    base = local_image.layers[0].read_bytes()
    annotations = overlaybd_annotations(base)
    if value:
        annotations[key] = value
    else:
        del annotations[key]
    put_image(embedded, "lib/bad", "v1", [(base, OCI_LAYER_TAR, annotations)])
    with pytest.raises(UnsupportedImageError, match=rf"layer 0 .*{rule}"):
        resolve_image(f"{host(embedded)}/lib/bad:v1")


# ---------------------------------------------------------------------------------------------
# Bad references and bad configs


@pytest.mark.parametrize("text", ["", "Upper/Case:v1", "127.0.0.1:5000/app:bad tag", "a@sha256:1"])
def test_a_bad_reference_is_refused(text: str) -> None:
    with pytest.raises(ImageReferenceError, match="image reference"):
        resolve_image(text)


def test_an_unknown_tag_is_not_found(embedded: str) -> None:
    with pytest.raises(ManifestNotFoundError, match=r"manifest nope.*HTTP 404"):
        resolve_image(f"{host(embedded)}/lib/none:nope")


def test_a_push_needs_a_tag(local_image: LocalImage) -> None:
    with pytest.raises(ImageReferenceError, match="a push needs a tag, not a digest"):
        push_image(local_image.config, "127.0.0.1:1/lib/app@sha256:" + "0" * 64)


def test_a_push_refuses_configs_it_cannot_push(
    embedded: str, local_image: LocalImage, tmp_path: Path
) -> None:
    ref = f"{host(embedded)}/lib/app:v1"
    with pytest.raises(ImageConfigError, match="the config has no lowers"):
        push_image(ImageConfig(), ref)

    turbo = ImageConfig(lowers=[LowerConfig(file=str(local_image.layers[0]), target_file="t")])
    with pytest.raises(UnsupportedFormatError, match=r"lowers\[0\] is a TurboOCI layer"):
        push_image(turbo, ref)

    (tmp_path / "junk").write_bytes(b"not a layer" * 1000)
    with pytest.raises(FormatError):
        push_image(ImageConfig(lowers=[LowerConfig(file=str(tmp_path / "junk"))]), ref)

    with pytest.raises(ValueError, match="is not 'os/arch"):
        push_image(local_image.config, ref, platform="linux")
    assert httpx.get(f"{embedded}/v2/lib/app/tags/list").status_code == 404  # nothing pushed


def test_the_writable_layer_is_not_pushed(
    embedded: str, local_image: LocalImage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    WritableLayer.create(tmp_path / "upper.data", tmp_path / "upper.index", VIRTUAL_SIZE).close()
    config = ImageConfig.load(local_image.config)
    config.upper = UpperConfig(data=str(tmp_path / "upper.data"), index="upper.index")
    with caplog.at_level("WARNING", logger="workbench.registry.image"):
        push_image(config, f"{host(embedded)}/lib/app:v1")
    assert "writable layer" in caplog.text
    assert len(get_manifest(embedded, "lib/app", "v1").json()["layers"]) == 2


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_push_and_config(embedded: str, local_image: LocalImage, tmp_path: Path) -> None:
    runner = CliRunner()
    ref = f"{host(embedded)}/lib/app:v1"
    pushed = runner.invoke(cli, ["registry", "push", str(local_image.config), ref])
    assert pushed.exit_code == 0, pushed.output
    digest = pushed.output.strip()
    assert digest == get_manifest(embedded, "lib/app", "v1").headers["docker-content-digest"]

    printed = runner.invoke(cli, ["registry", "config", ref])
    assert printed.exit_code == 0, printed.output
    config = ImageConfig.loads(printed.stdout)
    assert [lower.digest for lower in config.lowers] == local_image.digests

    out = tmp_path / "config.v1.json"
    cache = str(tmp_path / "cache")
    written = runner.invoke(
        cli, ["registry", "config", ref, "-o", str(out), "--check", "--cache-dir", cache]
    )
    assert written.exit_code == 0, written.output
    assert f"2 layers, virtual size {VIRTUAL_SIZE}" in written.stderr
    assert ImageConfig.load(out).to_json() == config.to_json()
    with RegistrySession(tmp_path / "read-cache") as session:
        assert read_disk(out, session) == local_image.disk


def test_cli_reports_an_image_it_cannot_read(embedded: str) -> None:
    registries.push_image(embedded, "lib/plain", "v1", [trace_layer()])
    result = CliRunner().invoke(cli, ["registry", "config", f"{host(embedded)}/lib/plain:v1"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: image ")
    assert "convert it to OverlayBD first" in result.output
