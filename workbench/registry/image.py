"""OverlayBD images in a registry: push a config's layers as an image, resolve an image to a config.

An OverlayBD image is an ordinary OCI image whose layer blobs are OverlayBD layer files (tar
around ZFile around LSMT, shared/specs/overlaybd-formats.md sections 0 and 3) and whose layer
descriptors carry the snapshotter's annotations (section 4.3). The snapshotter never unpacks
those blobs: it reads the annotations and writes a config.v1.json whose lowers name the blobs
by digest and size under ``repoBlobUrl`` (section 4.1), and the block device reads them
lazily. This module does both halves of that:

    digest = push_image("config.v1.json", "127.0.0.1:5000/app:v1")
    config = resolve_image("127.0.0.1:5000/app:v1")        # an ImageConfig, remote lowers
    write_image_config("127.0.0.1:5000/app:v1", "remote/config.v1.json")

What `push_image` writes, for lowers ``lowers[0]`` (bottom) to ``lowers[n-1]``:
- one blob per lower: the layer file's bytes as stored (normally the tar-wrapped ZFile);
- an OCI image config blob: ``architecture``/``os`` (and ``variant``) from `platform`,
  ``rootfs`` = ``{"type": "layers", "diff_ids": [layer digests]}`` (the blobs are
  uncompressed tar, so each diff_id is the blob's own digest);
- an OCI image manifest (`OCI_MANIFEST`) listing the layers bottom first, each with media
  type `OCI_LAYER_TAR` and the annotations `BLOB_DIGEST`, `BLOB_SIZE`, `BLOB_FS_TYPE` and
  `VERSION` (``"0.1.0"``); an acceleration layer (the config's last lower when
  ``accelerationLayer`` is set) also gets `ACCELERATION_LAYER` = ``"yes"``;
- the manifest is tagged with the reference's tag; the call returns its digest.
A blob the repository already has (HEAD answers) is not uploaded again.

Lowers that live in a registry (``repoBlobUrl`` + digest, no local file): a blob of the same
repository is referenced as it is; a blob of another repository or registry is copied (read
through the session, its digest checked, uploaded). The writable layer (``upper``) is not
part of an image and is not pushed; a config that has one gets a warning.

What `resolve_image` accepts: an image (an index is resolved to `platform` by the client)
whose every layer has `BLOB_DIGEST` equal to its descriptor digest and `BLOB_SIZE` equal to
its descriptor size. It refuses, with `UnsupportedImageError` naming the image, the layer
index and digest and what to do: a layer without the annotations (a plain OCI image), a
TurboOCI or FastOCI layer (a meta layer over the original OCI layer), and an acceleration
layer anywhere but on top. The config it returns has ``repoBlobUrl`` =
``<scheme>://<host>/v2/<repository>/blobs`` with the scheme the client uses for that host
(plain HTTP for loopback and hosts the session lists as insecure), one ``{digest, size}``
lower per layer, bottom first, no upper, and ``accelerationLayer`` when the top layer is a
trace layer, as the snapshotter writes it.

Caveats:
- each layer is read whole into memory before it is uploaded (`RegistryClient.push_blob`
  takes bytes and uploads monolithically: one POST, one PUT); layers of several GiB need that
  much memory. Layers already in the repository are only hashed, streaming from the file;
- blobs of another repository are copied, not mounted (the client has no cross-repository
  mount request), even when they are on the same registry;
- only OCI manifests are written (no Docker schema 2 variant, no index); Docker manifests are
  read, whatever their layer media type, since the snapshotter looks only at annotations;
- without `image_config` the image config has no ``history`` nor ``created``, so that pushing
  the same layers twice gives the same manifest digest; tools that show history show none;
- ``blob-fs-type`` is written as given and not checked against the layers (the workbench does
  not look inside the filesystem), and `resolve_image` does not carry it into the config
  (config.v1.json has no field for it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from workbench.errors import (
    BlobNotFoundError,
    DigestMismatchError,
    ImageConfigError,
    ImageReferenceError,
    UnsupportedFormatError,
    UnsupportedImageError,
)
from workbench.formats.config import ImageConfig, LowerConfig, RemoteBlob
from workbench.registry.client import OCI_MANIFEST, Descriptor, Manifest
from workbench.registry.reference import ImageReference
from workbench.registry.session import RegistrySession, reference_from_blob_url

__all__ = [
    "ACCELERATION_LAYER",
    "BLOB_DIGEST",
    "BLOB_FS_TYPE",
    "BLOB_SIZE",
    "OCI_CONFIG",
    "OCI_LAYER_TAR",
    "OVERLAYBD_VERSION",
    "VERSION",
    "UnsupportedImageError",
    "image_documents",
    "push_image",
    "resolve_image",
    "write_image_config",
]

log = logging.getLogger(__name__)

OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
"""Media type of the image config blob."""

OCI_LAYER_TAR: Final = "application/vnd.oci.image.layer.v1.tar"
"""Media type of an OverlayBD layer: the blob is an uncompressed tar (around a ZFile)."""

_PREFIX: Final = "containerd.io/snapshot/overlaybd"

BLOB_DIGEST: Final = f"{_PREFIX}/blob-digest"
"""Layer annotation: the layer blob's digest (equal to the descriptor's)."""

BLOB_SIZE: Final = f"{_PREFIX}/blob-size"
"""Layer annotation: the layer blob's size in bytes, as decimal text."""

BLOB_FS_TYPE: Final = f"{_PREFIX}/blob-fs-type"
"""Layer annotation: the filesystem on the image's disk (ext4, erofs, ...)."""

VERSION: Final = f"{_PREFIX}/version"
"""Layer annotation: the OverlayBD blob format version."""

ACCELERATION_LAYER: Final = f"{_PREFIX}/acceleration-layer"
"""Layer annotation, ``"yes"`` on a trace layer (the top one) that prefetch replays."""

OVERLAYBD_VERSION: Final = "0.1.0"
"""`VERSION` of a plain OverlayBD layer, the only kind this module writes."""

_TURBO_VERSIONS: Final = ("0.1.0-turbo.ociv1", "0.1.0-fastoci")
"""`VERSION` values of TurboOCI meta layers (and their legacy FastOCI name)."""

_TURBO_TARGET_DIGESTS: Final = (
    f"{_PREFIX}/turbo-oci/target-digest",
    f"{_PREFIX}/fastoci/target-digest",
)
"""Annotations naming the original OCI layer a TurboOCI (FastOCI) meta layer indexes."""

_HASH_CHUNK: Final = 1 << 20


@dataclass(frozen=True)
class _Layer:
    """One layer as it goes into the manifest: its blob and whether it is a trace layer."""

    digest: str
    size: int
    acceleration: bool = False


# ---------------------------------------------------------------------------------------------
# Push


def push_image(
    config: ImageConfig | str | os.PathLike[str],
    reference: ImageReference | str,
    session: RegistrySession | None = None,
    *,
    fs_type: str = "ext4",
    platform: str = "linux/amd64",
    image_config: Mapping[str, Any] | None = None,
) -> str:
    """Push the lowers of a config.v1.json as an OverlayBD image and tag it.

    Parameters
    ----------
    config
        A config.v1.json path or a parsed `ImageConfig`; its lowers, bottom first, become the
        image's layers. Local lowers are uploaded as stored; remote ones (``repoBlobUrl`` +
        digest) are referenced (same repository) or copied (another one).
    reference
        Where to push: ``host[:port]/repository:tag``. A digest is refused (the manifest's
        digest is known only once it is written).
    session
        The `RegistrySession` to push through (its credentials, insecure hosts); a private
        one without a block cache is used and closed when None.
    fs_type
        The `BLOB_FS_TYPE` annotation of every layer.
    platform
        ``os/arch[/variant]`` of the image config.
    image_config
        The image config to keep (an OCI/Docker config as JSON: env, entrypoint, cmd,
        history, ...), e.g. that of the image the layers were converted from; its ``rootfs``
        is replaced, its platform kept. None writes a minimal config of `platform`.

    Returns
    -------
    str
        The manifest's digest, ``sha256:...``.

    Raises
    ------
    ImageReferenceError
        For a reference that does not parse or names a digest.
    ImageConfigError
        For a config without lowers, or a lower that cannot be found.
    UnsupportedFormatError
        For a TurboOCI lower.
    FormatError
        For a local lower that is not a valid OverlayBD layer file.
    RegistryError
        When the registry refuses an upload (the message names registry, repository, blob).
    """
    ref = _push_reference(reference)
    if not isinstance(config, ImageConfig):
        config = ImageConfig.load(config)
    image_os, arch, variant = _split_platform(platform)
    if not config.lowers:
        raise ImageConfigError(f"pushing {ref}: the config has no lowers; there is no image")
    if not config.upper.is_empty:
        log.warning(
            "pushing %s: the config's writable layer (%s) is not part of the image and is not "
            "pushed; commit it to a lower first to include it",
            ref,
            config.upper.data,
        )

    with _session(session) as active:
        # Layer blobs, bottom first.
        uploaded = 0
        layers: list[_Layer] = []
        for position, lower in enumerate(config.lowers):
            acceleration = config.acceleration_layer and position == len(config.lowers) - 1
            digest, size, sent = _push_lower(active, ref, config, position, lower, acceleration)
            layers.append(_Layer(digest, size, acceleration))
            uploaded += sent

        # The image config, then the manifest that names it and the layers.
        config_blob, manifest = image_documents(
            [(layer.digest, layer.size, layer.acceleration) for layer in layers],
            fs_type=fs_type,
            platform=f"{image_os}/{arch}" + (f"/{variant}" if variant else ""),
            image_config=image_config,
        )
        _config_digest, sent = _push_bytes(active, ref, config_blob, "image config")
        uploaded += sent
        digest = active.run(active.client.push_manifest, ref, manifest, OCI_MANIFEST)

    log.info(
        "pushed %s: %d layers, %d bytes uploaded, manifest %s",
        ref,
        len(layers),
        uploaded,
        digest,
    )
    return digest


def _push_reference(reference: ImageReference | str) -> ImageReference:
    ref = reference if isinstance(reference, ImageReference) else ImageReference.parse(reference)
    if ref.digest is not None:
        raise ImageReferenceError(
            f"image reference {ref}: a push needs a tag, not a digest (the manifest's digest "
            "is known only once it is written); give REPOSITORY:TAG"
        )
    return ref


def _push_lower(
    session: RegistrySession,
    ref: ImageReference,
    config: ImageConfig,
    position: int,
    lower: LowerConfig,
    acceleration: bool,
) -> tuple[str, int, int]:
    """Put lower `position` into `ref`'s repository: (digest, size, bytes uploaded)."""
    where = f"pushing {ref}: lowers[{position}]"
    if lower.target_file or lower.target_digest or lower.gzip_index:
        raise UnsupportedFormatError(
            f"{where} is a TurboOCI layer (targetFile, targetDigest or gzipIndex): the "
            "workbench pushes OverlayBD block layers only"
        )

    source = config.resolve_lower(lower)
    if isinstance(source, RemoteBlob):
        return _push_remote_lower(session, ref, source, where)

    # A local layer file: check it is one (an acceleration layer is a plain tar of a trace),
    # hash it, upload it unless the repository has it.
    path = Path(source)
    if not acceleration:
        _check_layer_file(path, where)
    digest, size = _file_digest(path)
    if lower.digest and lower.digest != digest:
        log.warning(
            "%s: the config says digest %s, the file %s hashes to %s; pushing the file",
            where,
            lower.digest,
            path,
            digest,
        )
    if _has_blob(session, ref, digest):
        log.debug("%s: %s already in %s, not uploaded", where, digest, ref.repository)
        return digest, size, 0

    data = path.read_bytes()
    pushed = session.run(session.client.push_blob, ref, data)
    if pushed != digest:
        raise DigestMismatchError(
            f"{where}: {path} changed while it was pushed: hashed to {digest}, uploaded as "
            f"{pushed}; push again once nothing writes to it"
        )
    log.debug("%s: uploaded %s (%d bytes) from %s", where, digest, size, path)
    return digest, size, size


def _push_remote_lower(
    session: RegistrySession, ref: ImageReference, blob: RemoteBlob, where: str
) -> tuple[str, int, int]:
    """A lower that is a registry blob: reference it if `ref`'s repository has it, else copy."""
    if _has_blob(session, ref, blob.digest):
        size = session.run(session.client.blob_size, ref, blob.digest)
        if blob.size and blob.size != size:
            raise ImageConfigError(
                f"{where}: the config says blob {blob.digest} has {blob.size} bytes, "
                f"{ref.host}/{ref.repository} has it with {size}; fix the config"
            )
        log.debug("%s: %s already in %s, referenced", where, blob.digest, ref.repository)
        return blob.digest, size, 0

    source, _ = reference_from_blob_url(blob.repo_blob_url)
    log.debug("%s: copying %s from %s/%s", where, blob.digest, source.host, source.repository)
    with session.open_blob(blob.repo_blob_url, blob.digest, blob.size or None) as remote:
        data = remote.pread(0, remote.size)
    pushed = session.run(session.client.push_blob, ref, data)
    if pushed != blob.digest:
        raise DigestMismatchError(
            f"{where}: blob {blob.digest} of {blob.repo_blob_url} read back as {len(data)} "
            f"bytes hashing to {pushed}; the source registry served other bytes"
        )
    return blob.digest, len(data), len(data)


def _push_bytes(
    session: RegistrySession, ref: ImageReference, data: bytes, what: str
) -> tuple[str, int]:
    """Upload `data` unless the repository has it: (digest, bytes uploaded)."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if _has_blob(session, ref, digest):
        log.debug("pushing %s: %s %s already present", ref, what, digest)
        return digest, 0
    session.run(session.client.push_blob, ref, data)
    return digest, len(data)


def _has_blob(session: RegistrySession, ref: ImageReference, digest: str) -> bool:
    """Whether `ref`'s repository has blob `digest` (one HEAD, cached when it does)."""
    try:
        session.run(session.client.blob_size, ref, digest)
    except BlobNotFoundError:
        return False
    return True


def _check_layer_file(path: Path, where: str) -> None:
    """Open `path` as a read-only layer (raises `FormatError` if it is not one)."""
    from workbench.image.layer import ReadOnlyLayer

    with ReadOnlyLayer.open(path) as layer:
        wrapping = layer.wrapping
    if "tar" not in wrapping:
        log.warning(
            "%s: %s is not tar-wrapped (%s); it is pushed as a tar layer all the same, which "
            "OverlayBD reads but tools that unpack layers do not (commit with tar=True / -t)",
            where,
            path,
            "+".join(wrapping) or "raw LSMT",
        )


def _file_digest(path: Path) -> tuple[str, int]:
    """sha256 digest and size of a file, read in chunks."""
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return "sha256:" + hasher.hexdigest(), size


def _split_platform(platform: str) -> tuple[str, str, str]:
    image_os, _, rest = platform.partition("/")
    arch, _, variant = rest.partition("/")
    if not image_os or not arch or "/" in variant:
        raise ValueError(f"platform {platform!r} is not 'os/arch[/variant]'")
    return image_os, arch, variant


def image_documents(
    layers: Sequence[tuple[str, int, bool]],
    *,
    fs_type: str = "ext4",
    platform: str = "linux/amd64",
    image_config: Mapping[str, Any] | None = None,
) -> tuple[bytes, bytes]:
    """(image config blob, manifest) of an OverlayBD image of `layers` (digest, size,
    acceleration), bottom first; what `push_image` uploads, for writers of other stores.

    `image_config` is kept but for its ``rootfs`` (see `push_image`).
    """
    image_os, arch, variant = _split_platform(platform)
    entries = [_Layer(digest, size, acceleration) for digest, size, acceleration in layers]
    config_blob = _image_config(entries, image_os, arch, variant, image_config)
    config_digest = "sha256:" + hashlib.sha256(config_blob).hexdigest()
    return config_blob, _manifest(entries, config_digest, len(config_blob), fs_type)


def _image_config(
    layers: list[_Layer],
    image_os: str,
    arch: str,
    variant: str,
    base: Mapping[str, Any] | None = None,
) -> bytes:
    """The OCI image config blob: platform and rootfs, diff_ids = the (uncompressed) blobs."""
    document: dict[str, Any] = {"architecture": arch, "os": image_os}
    if variant:
        document["variant"] = variant
    if base is not None:
        document = dict(base)
    document["rootfs"] = {"type": "layers", "diff_ids": [layer.digest for layer in layers]}
    return json.dumps(document, indent=2).encode()


def _manifest(layers: list[_Layer], config_digest: str, config_size: int, fs_type: str) -> bytes:
    """The OCI image manifest of an OverlayBD image (see the module docstring)."""
    descriptors = []
    for layer in layers:
        annotations = {
            BLOB_DIGEST: layer.digest,
            BLOB_SIZE: str(layer.size),
            BLOB_FS_TYPE: fs_type,
            VERSION: OVERLAYBD_VERSION,
        }
        if layer.acceleration:
            annotations[ACCELERATION_LAYER] = "yes"
        descriptors.append(
            {
                "mediaType": OCI_LAYER_TAR,
                "digest": layer.digest,
                "size": layer.size,
                "annotations": annotations,
            }
        )
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": descriptors,
    }
    return json.dumps(document, indent=2).encode()


# ---------------------------------------------------------------------------------------------
# Resolve


def resolve_image(
    reference: ImageReference | str,
    session: RegistrySession | None = None,
    platform: str = "linux/amd64",
) -> ImageConfig:
    """The config.v1.json of an OverlayBD image in a registry: its layers as remote lowers.

    Parameters
    ----------
    reference
        ``host[:port]/repository[:tag][@digest]``.
    session
        The `RegistrySession` to ask (credentials, insecure hosts); a private one without a
        block cache is used and closed when None. Reading the image later through the same
        session reuses its connections.
    platform
        ``os/arch[/variant]`` an index is resolved to.

    Returns
    -------
    ImageConfig
        ``repoBlobUrl`` of the repository, one ``{digest, size}`` lower per layer (bottom
        first), no upper; ``accelerationLayer`` set when the top layer is a trace layer.

    Raises
    ------
    ImageReferenceError
        For a reference that does not parse.
    ManifestNotFoundError
        For an unknown tag or digest.
    UnsupportedImageError
        For an image that is not OverlayBD (see the module docstring for the rules).
    """
    ref = reference if isinstance(reference, ImageReference) else ImageReference.parse(reference)
    with _session(session) as active:
        manifest: Manifest = active.run(active.client.resolve, ref, platform)
        repo_blob_url = f"{ref.base_url(active.client.insecure)}/{ref.repository}/blobs"

    image = f"image {ref} (manifest {manifest.digest})"
    if not manifest.layers:
        raise UnsupportedImageError(f"{image} has no layers; there is no disk to read")

    lowers = []
    acceleration = False
    for position, layer in enumerate(manifest.layers):
        is_top = position == len(manifest.layers) - 1
        acceleration = _check_layer(layer, position, is_top, image)
        lowers.append(LowerConfig(digest=layer.digest, size=layer.size))

    log.info(
        "resolved %s: %d layers%s", image, len(lowers), ", top one a trace" if acceleration else ""
    )
    return ImageConfig(lowers=lowers, repo_blob_url=repo_blob_url, acceleration_layer=acceleration)


def _check_layer(layer: Descriptor, position: int, is_top: bool, image: str) -> bool:
    """Check one layer descriptor of an OverlayBD image; True if it is an acceleration layer."""
    where = f"{image}: layer {position} ({layer.digest}, {layer.media_type or 'no media type'})"
    annotations = layer.annotations

    # TurboOCI meta layers carry blob-digest too; they must be told apart first.
    version = annotations.get(VERSION, "")
    if version in _TURBO_VERSIONS or any(key in annotations for key in _TURBO_TARGET_DIGESTS):
        raise UnsupportedImageError(
            f"{where} is a TurboOCI layer (version {version!r}): its data is the original OCI "
            "layer, which the workbench does not read; convert the image to a plain OverlayBD "
            "image first (overlaybd-convertor without --turboOCI)"
        )

    blob_digest = annotations.get(BLOB_DIGEST)
    if blob_digest is None:
        raise UnsupportedImageError(
            f"{where} has no {BLOB_DIGEST} annotation: it is not an OverlayBD layer (a plain "
            "OCI image?); convert it to OverlayBD first (overlaybd-convertor, "
            "ctr obdconv, or workbench registry push of a config of committed layers)"
        )
    if blob_digest != layer.digest:
        raise UnsupportedImageError(
            f"{where}: annotation {BLOB_DIGEST} is {blob_digest}, the descriptor's digest "
            f"{layer.digest}; the manifest is inconsistent, push the image again"
        )
    blob_size = annotations.get(BLOB_SIZE, "")
    if not blob_size.isdigit() or int(blob_size) != layer.size:
        raise UnsupportedImageError(
            f"{where}: annotation {BLOB_SIZE} is {blob_size or 'missing'!r}, the descriptor "
            f"says {layer.size} bytes; the manifest is inconsistent, push the image again"
        )
    if version and version != OVERLAYBD_VERSION:
        log.warning("%s: OverlayBD version %r, expected %r", where, version, OVERLAYBD_VERSION)

    acceleration = annotations.get(ACCELERATION_LAYER) == "yes"
    if acceleration and not is_top:
        raise UnsupportedImageError(
            f"{where} is an acceleration (trace) layer below the top; OverlayBD only takes one "
            "as the last layer; rebuild the image with the trace layer on top"
        )
    return acceleration


def write_image_config(
    reference: ImageReference | str,
    path: str | os.PathLike[str],
    session: RegistrySession | None = None,
    platform: str = "linux/amd64",
) -> ImageConfig:
    """Resolve `reference` (`resolve_image`) and write its config.v1.json to `path`.

    The file is written atomically (`ImageConfig.dump`); the config is returned, with
    `base_dir` set to the file's directory as `ImageConfig.load` would.
    """
    config = resolve_image(reference, session, platform)
    path = Path(path)
    config.dump(path)
    config.base_dir = path.resolve().parent
    return config


# ---------------------------------------------------------------------------------------------
# Sessions


@contextlib.contextmanager
def _session(session: RegistrySession | None) -> Iterator[RegistrySession]:
    """`session` as it is, or a private one without a block cache, closed afterwards."""
    if session is not None:
        yield session.start()
        return
    with RegistrySession(use_cache=False) as private:
        yield private
