"""Push a built dataset image (an OCI layout) to a registry with the workbench's own client.

    digest = push_layout(layout_dir, "127.0.0.1:5000/bench/redis:latest")

The manifest the layout's index.json names (the first, or the one whose ref.name is `tag`),
its config and its layers are uploaded as they are, so the registry holds the same digests
as the layout: a layer the repository already has (HEAD answers) is not sent again. Returns
the manifest digest, which equals the local one.

Caveats:
- a blob is read whole into memory before it is sent (`RegistryClient.push_blob` uploads
  monolithically); dataset layers are tens to a few hundred MiB;
- blobs are not mounted from other repositories of the same registry, they are uploaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from workbench.errors import DigestMismatchError, ImageReferenceError
from workbench.registry.client import OCI_MANIFEST
from workbench.registry.image import _has_blob  # one HEAD per blob, shared with push_image
from workbench.registry.reference import ImageReference
from workbench.registry.session import RegistrySession

__all__ = ["push_layout"]

log = logging.getLogger(__name__)


def push_layout(
    layout: Path, reference: str, *, tag: str | None = None, insecure: bool = True
) -> str:
    """Upload the image of OCI layout `layout` as `reference`; returns the manifest digest."""
    ref = ImageReference.parse(reference)
    if ref.digest is not None:
        raise ImageReferenceError(
            f"image reference {reference}: a push needs a tag, not a digest; give REPO:TAG"
        )
    manifest_digest = _manifest_digest(layout, tag)
    raw = _blob(layout, manifest_digest).read_bytes()
    manifest = json.loads(raw)
    digests = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]

    insecure_hosts = (ref.registry,) if insecure else ()
    sent = 0
    with RegistrySession(use_cache=False, insecure=insecure_hosts) as session:
        for digest in digests:
            if _has_blob(session, ref, digest):
                continue
            data = _blob(layout, digest).read_bytes()
            pushed = session.run(session.client.push_blob, ref, data)
            if pushed != digest:
                raise DigestMismatchError(
                    f"pushing {ref}: blob {digest} of {layout} hashes to {pushed}; the layout "
                    "is damaged, rebuild it"
                )
            sent += len(data)
        digest = session.run(session.client.push_manifest, ref, raw, OCI_MANIFEST)
    log.info("pushed %s to %s: %d bytes uploaded, manifest %s", layout, ref, sent, digest)
    return digest


def _manifest_digest(layout: Path, tag: str | None) -> str:
    index = json.loads((layout / "index.json").read_text())
    manifests = index.get("manifests", [])
    for entry in manifests:
        name = entry.get("annotations", {}).get("org.opencontainers.image.ref.name")
        if tag is None or name == tag:
            return entry["digest"]
    names = [m.get("annotations", {}).get("org.opencontainers.image.ref.name") for m in manifests]
    raise FileNotFoundError(f"{layout}/index.json: no manifest tagged {tag!r}; it has {names}")


def _blob(layout: Path, digest: str) -> Path:
    algorithm, hexdigest = digest.split(":", 1)
    return layout / "blobs" / algorithm / hexdigest
