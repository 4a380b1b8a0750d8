"""OCI and Docker images as conversion sources: a registry image or an OCI layout directory.

`open_source(text)` takes either

- a registry reference ``host[:port]/name[:tag][@digest]`` (plain HTTP for loopback hosts
  and the session's insecure hosts), resolved through `RegistryClient.resolve` (an index is
  resolved to the platform), or
- ``oci:DIR[:TAG]``, an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/``):
  the manifest of ``index.json`` whose ``org.opencontainers.image.ref.name`` is TAG, or its
  only manifest without TAG; a nested index is resolved to the platform;

and returns a `SourceImage`: the manifest's layers (digest, size, media type), the image
config as a JSON object, and `fetch_layer`, which copies one layer blob to a local file in
chunks (bounded memory), checking its size and sha256 digest.

`write_layout(directory, tag, blobs, manifest)` writes an OCI layout as a destination.

Caveats:
- only sha256 digests are accepted;
- a layout's blobs are read in place: one that changes while it is read fails the digest
  check, and the conversion stops;
- `write_layout` adds to an existing layout's index (replacing an entry of the same tag).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from workbench.errors import DigestMismatchError, ImageReferenceError, ManifestError
from workbench.registry.client import INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, Descriptor
from workbench.registry.reference import ImageReference
from workbench.registry.session import RegistrySession

__all__ = [
    "LAYOUT_PREFIX",
    "SourceImage",
    "open_source",
    "parse_layout",
    "write_layout",
]

log = logging.getLogger(__name__)

LAYOUT_PREFIX: Final = "oci:"
"""How a source or destination names an OCI layout directory: ``oci:DIR[:TAG]``."""

REF_NAME: Final = "org.opencontainers.image.ref.name"
"""The index.json annotation naming a manifest's tag."""

FETCH_CHUNK: Final = 8 << 20
"""Bytes per registry range read while copying a layer."""


@dataclass
class SourceImage:
    """An image to convert: where it is, its manifest's layers and its config."""

    name: str
    manifest_digest: str
    layers: list[Descriptor]
    config: dict[str, Any]
    _read: Callable[[Descriptor, Path, Callable[[int], None] | None], None] = field(repr=False)

    @property
    def diff_ids(self) -> list[str]:
        rootfs = self.config.get("rootfs") or {}
        return list(rootfs.get("diff_ids") or [])

    def fetch_layer(
        self, position: int, path: Path, progress: Callable[[int], None] | None = None
    ) -> None:
        """Copy layer `position` to `path`, its size and digest checked."""
        self._read(self.layers[position], path, progress)


# ---------------------------------------------------------------------------------------------
# Opening


def parse_layout(text: str) -> tuple[Path, str | None] | None:
    """(directory, tag or None) of ``oci:DIR[:TAG]``; None if `text` is no layout name."""
    if not text.startswith(LAYOUT_PREFIX):
        return None
    rest = text[len(LAYOUT_PREFIX) :]
    directory, _, tag = rest.rpartition(":")
    if not directory or "/" in tag:
        return Path(rest), None
    return Path(directory), tag or None


def open_source(text: str, session: RegistrySession, platform: str = "linux/amd64") -> SourceImage:
    """The image `text` names (see the module docstring)."""
    layout = parse_layout(text)
    if layout is not None:
        return _open_layout(*layout, platform=platform)
    return _open_registry(text, session, platform)


def _open_registry(text: str, session: RegistrySession, platform: str) -> SourceImage:
    try:
        ref = ImageReference.parse(text)
    except ImageReferenceError as exc:
        raise ImageReferenceError(
            f"{text!r} is neither a registry reference (host[:port]/name[:tag]) nor an OCI "
            f"layout (oci:DIR[:TAG]): {exc}"
        ) from exc
    manifest = session.run(session.client.resolve, ref, platform)
    config_bytes = session.run(session.client.fetch_blob, ref, manifest.config.digest)
    config = _parse_json(config_bytes, f"image {ref}: config {manifest.config.digest}")

    def read(layer: Descriptor, path: Path, progress: Callable[[int], None] | None) -> None:
        with session.open_blob(ref, layer.digest, layer.size) as blob:
            chunks = (
                blob.pread(offset, min(FETCH_CHUNK, layer.size - offset))
                for offset in range(0, layer.size, FETCH_CHUNK)
            )
            _copy_checked(chunks, path, layer, f"image {ref}", progress)

    return SourceImage(str(ref), manifest.digest, list(manifest.layers), config, read)


def _open_layout(directory: Path, tag: str | None, platform: str) -> SourceImage:
    where = f"OCI layout {directory}"
    index_path = directory / "index.json"
    if not index_path.is_file():
        raise ManifestError(
            f"{where}: no index.json; an OCI layout has oci-layout, index.json and blobs/ "
            "(skopeo copy docker://... oci:DIR:TAG makes one)"
        )
    index = _parse_json(index_path.read_bytes(), f"{where}: index.json")
    descriptor = _pick_manifest(index, tag, where)

    # Follow nested indexes down to an image manifest for the platform.
    for _ in range(3):
        raw = _read_blob(directory, descriptor, where)
        document = _parse_json(raw, f"{where}: manifest {descriptor.digest}")
        media_type = document.get("mediaType") or descriptor.media_type
        if media_type in MANIFEST_TYPES or "layers" in document:
            break
        if media_type not in INDEX_TYPES and "manifests" not in document:
            raise ManifestError(f"{where}: {descriptor.digest} has media type {media_type!r}")
        descriptor = _pick_platform(document, platform, where)
    else:
        raise ManifestError(f"{where}: indexes nested more than 2 deep")

    config_descriptor = Descriptor.from_json(document.get("config"), f"{where}: config")
    config = _parse_json(_read_blob(directory, config_descriptor, where), f"{where}: config")
    layers = [
        Descriptor.from_json(layer, f"{where}: layers[{i}]")
        for i, layer in enumerate(document.get("layers") or [])
    ]

    def read(layer: Descriptor, path: Path, progress: Callable[[int], None] | None) -> None:
        blob = _blob_path(directory, layer.digest, where)
        with blob.open("rb") as file:
            chunks = iter(lambda: file.read(FETCH_CHUNK), b"")
            _copy_checked(chunks, path, layer, where, progress)

    name = f"oci:{directory}" + (f":{tag}" if tag else "")
    return SourceImage(name, descriptor.digest, layers, config, read)


def _pick_manifest(index: dict[str, Any], tag: str | None, where: str) -> Descriptor:
    manifests = index.get("manifests") or []
    if tag is not None:
        manifests = [m for m in manifests if (m.get("annotations") or {}).get(REF_NAME) == tag]
    if len(manifests) != 1:
        names = sorted(
            (m.get("annotations") or {}).get(REF_NAME, "(untagged)")
            for m in index.get("manifests") or []
        )
        wanted = f"tag {tag!r}" if tag else "one manifest (no tag given)"
        raise ManifestError(
            f"{where}: index.json has {len(manifests)} manifests for {wanted}; its tags: "
            f"{', '.join(names) or 'none'}; name one as oci:DIR:TAG"
        )
    return Descriptor.from_json(manifests[0], f"{where}: index.json")


def _pick_platform(index: dict[str, Any], platform: str, where: str) -> Descriptor:
    wanted_os, _, arch = platform.partition("/")
    arch = arch.split("/")[0]
    for entry in index.get("manifests") or []:
        entry_platform = entry.get("platform") or {}
        if entry_platform.get("os") == wanted_os and entry_platform.get("architecture") == arch:
            return Descriptor.from_json(entry, where)
    raise ManifestError(f"{where}: the index has no manifest for platform {platform}")


def _blob_path(directory: Path, digest: str, where: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm != "sha256" or len(hexdigest) != 64 or not _is_hex(hexdigest):
        raise ManifestError(f"{where}: digest {digest!r} is not a sha256 digest")
    path = directory / "blobs" / "sha256" / hexdigest
    if not path.is_file():
        raise ManifestError(f"{where}: blob {digest} is missing ({path})")
    return path


def _read_blob(directory: Path, descriptor: Descriptor, where: str) -> bytes:
    data = _blob_path(directory, descriptor.digest, where).read_bytes()
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != descriptor.digest:
        raise DigestMismatchError(
            f"{where}: blob {descriptor.digest} hashes to {actual}; the layout is corrupt"
        )
    return data


def _copy_checked(
    chunks: Iterable[bytes],
    path: Path,
    layer: Descriptor,
    where: str,
    progress: Callable[[int], None] | None,
) -> None:
    hasher = hashlib.sha256()
    size = 0
    with path.open("wb") as out:
        for chunk in chunks:
            hasher.update(chunk)
            out.write(chunk)
            size += len(chunk)
            if progress is not None:
                progress(len(chunk))
    actual = "sha256:" + hasher.hexdigest()
    if size != layer.size or actual != layer.digest:
        path.unlink(missing_ok=True)
        raise DigestMismatchError(
            f"{where}: layer {layer.digest} ({layer.size} bytes) read as {size} bytes hashing "
            f"to {actual}; the blob is corrupt or truncated"
        )


def _parse_json(raw: bytes, where: str) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise ManifestError(f"{where} is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ManifestError(f"{where} is not a JSON object")
    return document


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


# ---------------------------------------------------------------------------------------------
# Writing a layout


def write_layout(
    directory: Path,
    tag: str | None,
    blobs: Iterable[tuple[str, Path | bytes]],
    manifest: bytes,
    media_type: str,
) -> str:
    """Write `blobs` ((digest, file or bytes)) and `manifest` as an OCI layout; its digest."""
    store = directory / "blobs" / "sha256"
    store.mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    for digest, content in [*blobs, ("sha256:" + hashlib.sha256(manifest).hexdigest(), manifest)]:
        target = store / digest.partition(":")[2]
        if target.exists():
            continue
        tmp = target.with_suffix(".tmp")
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            shutil.copyfile(content, tmp)
        os.replace(tmp, target)

    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    index_path = directory / "index.json"
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    if index_path.is_file():
        index = _parse_json(index_path.read_bytes(), f"OCI layout {directory}: index.json")
    entry: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(manifest)}
    if tag:
        entry["annotations"] = {REF_NAME: tag}
    kept = [
        m
        for m in index.get("manifests") or []
        if not tag or (m.get("annotations") or {}).get(REF_NAME) != tag
    ]
    index["manifests"] = [*kept, entry]
    tmp = index_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, index_path)
    log.info("wrote %s to OCI layout %s%s", digest, directory, f" as {tag}" if tag else "")
    return digest
