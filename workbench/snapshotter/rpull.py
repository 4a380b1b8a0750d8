"""`rpull`: pull an image's metadata into containerd and leave OverlayBD layers in the registry.

What accelerated-container-image's ``ctr rpull`` does with containerd's Go client, done
with containerd's gRPC API (`workbench.snapshotter.client`), because ``ctr image pull`` of
containerd 1.6 fetches every layer before it unpacks and passes no annotations to the
snapshotter (``ctr content fetch --metadata-only`` fetches the layers too when the image is
a single manifest):

1. resolve the reference in the registry (an index to the platform's manifest);
2. inside a lease: put the manifest (labelled with the ``containerd.io/gc.ref.content.*``
   references to its config and layers) and the config into containerd's content store,
   both labelled ``containerd.io/distribution.source.<host>`` = repository as ``ctr``'s
   fetch labels them;
3. unpack, layer by layer, as containerd's unpacker does: Stat the chain ID; if it is
   missing, Prepare ``extract-<unique> <chainID>`` on the parent chain with the layer's
   ``containerd.io/snapshot/*`` annotations, ``containerd.io/snapshot.ref`` = chain ID and
   ``containerd.io/snapshot/image-ref`` = the reference as labels. The workbench
   snapshotter answers ALREADY_EXISTS for an OverlayBD layer (nothing is fetched); for any
   other layer the blob is fetched into the content store, applied with containerd's diff
   service on the returned mounts, checked against its diff ID and committed;
4. label the config with ``containerd.io/gc.ref.snapshot.<snapshotter>`` = the top chain
   ID, and create (or update) the image record, so that neither content nor snapshots are
   collected once the lease is gone and ``ctr run`` finds the image unpacked.

Caveats:
- a non-OverlayBD layer is fetched whole into memory before it goes to the content store;
- the image record's target is the platform's manifest, not the index it was chosen from
  (``ctr image ls`` shows the manifest digest);
- Docker schema 1 images are not supported (the registry client refuses them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import grpc

from workbench.errors import ManifestError, SnapshotStateError
from workbench.registry.client import Descriptor, Manifest
from workbench.registry.reference import ImageReference
from workbench.registry.session import RegistrySession
from workbench.snapshotter.client import ContainerdClient, grpc_code
from workbench.snapshotter.service import SNAPSHOT_REF

__all__ = ["PulledImage", "chain_ids", "rpull"]

log = logging.getLogger(__name__)

IMAGE_REF_LABEL: Final = "containerd.io/snapshot/image-ref"
INHERITED_PREFIX: Final = "containerd.io/snapshot/"


@dataclass(frozen=True)
class PulledImage:
    """What `rpull` made: the image record's name and target, and per layer what happened."""

    name: str
    manifest_digest: str
    chain_id: str
    remote_layers: int
    unpacked_layers: int
    present_layers: int


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """containerd's chain IDs of a list of diff IDs (identity.ChainIDs)."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            text = f"{chain[-1]} {diff_id}".encode()
            chain.append("sha256:" + hashlib.sha256(text).hexdigest())
    return chain


def rpull(
    reference: ImageReference | str,
    client: ContainerdClient,
    snapshotter: str,
    session: RegistrySession | None = None,
    platform: str = "linux/amd64",
) -> PulledImage:
    """Pull `reference` into containerd for `snapshotter`; see the module docstring.

    Raises the registry's errors (`ManifestNotFoundError`, `RegistryError`), `ManifestError`
    for a config without diff IDs for every layer, and `grpc.RpcError` for a call containerd
    refuses (its status detail says why).
    """
    ref = reference if isinstance(reference, ImageReference) else ImageReference.parse(reference)
    own_session = session is None
    session = session if session is not None else RegistrySession(use_cache=False)
    try:
        session.start()
        manifest: Manifest = session.run(session.client.resolve, ref, platform)
        config_bytes = session.run(session.client.fetch_blob, ref, manifest.config.digest)
        diff_ids = _diff_ids(config_bytes, manifest, ref)
        chain = chain_ids(diff_ids)

        with client.lease():
            _put_metadata(client, ref, manifest, config_bytes)
            counts = _unpack(client, snapshotter, session, ref, manifest, diff_ids, chain)
            client.label_content(
                manifest.config.digest,
                {f"containerd.io/gc.ref.snapshot.{snapshotter}": chain[-1]},
            )
            _put_image(client, str(ref), manifest)
    finally:
        if own_session:
            session.close()

    pulled = PulledImage(str(ref), manifest.digest, chain[-1], *counts)
    log.info(
        "rpull %s: manifest %s, %d remote, %d unpacked, %d present layers",
        ref,
        manifest.digest,
        pulled.remote_layers,
        pulled.unpacked_layers,
        pulled.present_layers,
    )
    return pulled


def _diff_ids(config_bytes: bytes, manifest: Manifest, ref: ImageReference) -> list[str]:
    try:
        diff_ids = list(json.loads(config_bytes)["rootfs"]["diff_ids"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(
            f"image {ref}: config {manifest.config.digest} has no rootfs.diff_ids ({exc})"
        ) from exc
    if len(diff_ids) != len(manifest.layers):
        raise ManifestError(
            f"image {ref}: {len(manifest.layers)} layers but {len(diff_ids)} diff IDs in "
            f"config {manifest.config.digest}; the image is broken, push it again"
        )
    return diff_ids


def _put_metadata(
    client: ContainerdClient, ref: ImageReference, manifest: Manifest, config_bytes: bytes
) -> None:
    """Manifest (with its gc references) and config into the content store, each labelled
    with its source repository as containerd's fetch does (a later push can mount from it)."""
    hostname = urlsplit(f"//{ref.host}").hostname or ref.host
    source = {f"containerd.io/distribution.source.{hostname}": ref.repository}
    client.write_content(config_bytes, source)
    references = {**source, "containerd.io/gc.ref.content.config": manifest.config.digest}
    for position, layer in enumerate(manifest.layers):
        references[f"containerd.io/gc.ref.content.l.{position}"] = layer.digest
    client.write_content(manifest.raw, references)


def _put_image(client: ContainerdClient, name: str, manifest: Manifest) -> None:
    images, types = client.api.images, client.api.descriptor
    target = types.Descriptor(
        media_type=manifest.media_type, digest=manifest.digest, size=len(manifest.raw)
    )
    image = images.Image(name=name, target=target)
    try:
        client.images.Create(images.CreateImageRequest(image=image))
    except grpc.RpcError as exc:
        if grpc_code(exc) != grpc.StatusCode.ALREADY_EXISTS:
            raise
        request = images.UpdateImageRequest(image=image)
        request.update_mask.paths.append("target")
        client.images.Update(request)


def _unpack(
    client: ContainerdClient,
    snapshotter: str,
    session: RegistrySession,
    ref: ImageReference,
    manifest: Manifest,
    diff_ids: list[str],
    chain: list[str],
) -> tuple[int, int, int]:
    """Snapshots for every layer: (remote, unpacked, already present) counts."""
    snapshots = client.api.snapshots
    remote = unpacked = present = 0
    for position, layer in enumerate(manifest.layers):
        chain_id = chain[position]
        parent = chain[position - 1] if position else ""
        try:
            client.snapshots.Stat(
                snapshots.StatSnapshotRequest(snapshotter=snapshotter, key=chain_id)
            )
            present += 1
            continue
        except grpc.RpcError as exc:
            if grpc_code(exc) != grpc.StatusCode.NOT_FOUND:
                raise

        labels = {k: v for k, v in layer.annotations.items() if k.startswith(INHERITED_PREFIX)}
        labels[SNAPSHOT_REF] = chain_id
        labels[IMAGE_REF_LABEL] = str(ref)
        key = f"extract-{time.time_ns()}-{secrets.token_hex(3)} {chain_id}"
        request = snapshots.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=labels
        )
        try:
            reply = client.snapshots.Prepare(request)
        except grpc.RpcError as exc:
            if grpc_code(exc) != grpc.StatusCode.ALREADY_EXISTS:
                raise
            log.debug("layer %d (%s): remote, nothing fetched", position, layer.digest)
            remote += 1
            continue

        _apply(
            client, snapshotter, session, ref, layer, key, list(reply.mounts), diff_ids[position]
        )
        client.snapshots.Commit(
            snapshots.CommitSnapshotRequest(
                snapshotter=snapshotter, name=chain_id, key=key, labels={SNAPSHOT_REF: chain_id}
            )
        )
        unpacked += 1
    return remote, unpacked, present


def _apply(
    client: ContainerdClient,
    snapshotter: str,
    session: RegistrySession,
    ref: ImageReference,
    layer: Descriptor,
    key: str,
    mounts: list[Any],
    diff_id: str,
) -> None:
    """Fetch an ordinary layer into the content store and apply it on `mounts`."""
    snapshots, diff, types = client.api.snapshots, client.api.diff, client.api.descriptor
    try:
        if not client.has_content(layer.digest):
            data = session.run(session.client.fetch_blob, ref, layer.digest)
            client.write_content(data)
        descriptor = types.Descriptor(
            media_type=layer.media_type, digest=layer.digest, size=layer.size
        )
        applied = client.diff.Apply(diff.ApplyRequest(diff=descriptor, mounts=mounts))
        if applied.applied.digest != diff_id:
            raise SnapshotStateError(
                f"image {ref}: layer {layer.digest} unpacks to diff ID "
                f"{applied.applied.digest}, its config says {diff_id}; the image is broken"
            )
    except BaseException:
        try:
            client.snapshots.Remove(
                snapshots.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
            )
        except grpc.RpcError as exc:
            log.warning("could not remove the extraction snapshot %s: %s", key, exc.details())
        raise
