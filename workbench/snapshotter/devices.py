"""OverlayBD devices of the snapshotter: an image's layers attached and mounted, on demand.

A chain of OverlayBD layers (snapshots whose storage is a block layer, bottom first) is one
virtual disk. `DeviceManager` writes its config.v1.json, mounts it with the device layer
(`workbench.device.mount.mount_image`: FUSE disk file, loop device, ext4) and keeps a
record per device in the metadata store, so that a restarted snapshotter finds its mounts
again. Two kinds:

- read-only, one per image: owned by the top block layer of the chain, mounted at
  ``snapshots/<top>/block/mountpoint``, shared by every container and view on that image
  (rwMode overlayfs: the mount point is their overlay's lower layer). Its record lists its
  users; when the last one goes the device is torn down (OverlayBD's autoRemoveDev), unless
  the manager keeps devices (`auto_remove` off), in which case Remove or Cleanup of the
  owning layer does it;
- writable, one per container (rwMode dir): owned by the container's snapshot, mounted at
  ``snapshots/<id>/block/mountpoint`` read-write with the writable layer in
  ``snapshots/<id>/block/writable`` (data, index).

Config of a chain (`chain_config`): a remote layer is ``{digest, size}`` read from the
registry the labels name (``containerd.io/snapshot/image-ref``, or CRI's
``containerd.io/snapshot/cri.image-ref``, of the topmost remote layer: a registry serves
every blob of an image from the image's repository), over plain HTTP for loopback hosts
and hosts listed as insecure; a local layer is ``{dir}`` of its ``fs`` folder, where the
file ``overlaybd.commit`` lies. Each device has its own block cache folder,
``block/cache`` beside its mount point, removed with its snapshot: a cache folder serves
one process, and each device is served by its own FUSE server process.

Caveats:
- a blob two images share is cached twice when both are attached (one cache per device);
- a device's cache outlives the device (it is warm for the next container) but not the
  snapshot that owns it;
- `attach_readonly` and `attach_writable` take as long as a FUSE server start, a loop
  device and an ext4 mount (about a second here); the caller holds its lock meanwhile.
  Teardowns run on one reaper thread, in order, without that lock;
- a teardown interrupted by a crash leaves pieces that the next start (dead servers, mounts
  without a record) and Cleanup (folders without a snapshot) remove.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path
from typing import Final

from workbench.device.mount import (
    MountError,
    cleanup_stale,
    list_mounts,
    mount_image,
    unmount,
)
from workbench.errors import SnapshotArgumentError
from workbench.formats.config import ImageConfig, LowerConfig
from workbench.registry.image import BLOB_DIGEST, BLOB_FS_TYPE, BLOB_SIZE
from workbench.registry.reference import DEFAULT_INSECURE, ImageReference
from workbench.snapshotter.store import Device, MetadataStore, Snapshot, Storage

__all__ = ["IMAGE_REF_LABELS", "DeviceManager", "chain_config"]

log = logging.getLogger(__name__)

IMAGE_REF_LABELS: Final = (
    "containerd.io/snapshot/image-ref",
    "containerd.io/snapshot/cri.image-ref",
)
"""Labels that name the image a layer came from (ACI's rpull, containerd's CRI plugin)."""


def chain_config(
    chain: Sequence[Snapshot], layer_dir: Path, insecure: Sequence[str] = DEFAULT_INSECURE
) -> ImageConfig:
    """The config.v1.json of a chain of block layers (bottom first); see the module docstring.

    `layer_dir` is the snapshots folder (``ROOT/snapshots``). Raises `SnapshotArgumentError`
    for a remote layer without blob labels or an image reference, or whose
    ``blob-fs-type`` is not ext4 (erofs images of accelerated-container-image, for one).
    """
    lowers = []
    image_ref = ""
    for layer in chain:
        if layer.storage == Storage.LOCAL_BLOCK:
            lowers.append(LowerConfig(dir=str(layer_dir / str(layer.id) / "fs")))
            continue
        digest, size = layer.labels.get(BLOB_DIGEST, ""), layer.labels.get(BLOB_SIZE, "")
        if not digest or not size.isdigit():
            raise SnapshotArgumentError(
                f"snapshot {layer.name} is a remote layer without labels {BLOB_DIGEST} and "
                f"{BLOB_SIZE}; remove it and pull the image again"
            )
        fs_type = layer.labels.get(BLOB_FS_TYPE, "ext4")
        if fs_type.split(";")[0] != "ext4":
            raise SnapshotArgumentError(
                f"snapshot {layer.name}: layer {digest} holds {fs_type.split(';')[0]} "
                f"({BLOB_FS_TYPE}); the workbench device mounts ext4 only, convert the "
                "image with ext4"
            )
        lowers.append(LowerConfig(digest=digest, size=int(size)))
        image_ref = next((layer.labels[k] for k in IMAGE_REF_LABELS if k in layer.labels), "")
        if not image_ref:
            raise SnapshotArgumentError(
                f"snapshot {layer.name} is a remote layer without an image reference label "
                f"({' or '.join(IMAGE_REF_LABELS)}); pull the image with workbench rpull"
            )

    repo_blob_url = ""
    if image_ref:
        reference = ImageReference.parse(image_ref)
        repo_blob_url = f"{reference.base_url(insecure)}/{reference.repository}/blobs"
    return ImageConfig(lowers=lowers, repo_blob_url=repo_blob_url)


class DeviceManager:
    """The devices of one snapshotter root; every method is called under the caller's lock."""

    def __init__(
        self,
        root: Path,
        store: MetadataStore,
        *,
        insecure: Sequence[str] = (),
        auto_remove: bool = True,
        background: bool = True,
    ) -> None:
        self.root = root
        self.layer_dir = root / "snapshots"
        self.run_dir = root / "run"
        self.store = store
        self.insecure = tuple(DEFAULT_INSECURE) + tuple(insecure)
        self.auto_remove = auto_remove
        self.background = background
        self._reaper = futures.ThreadPoolExecutor(1, "snapshotter-reaper")
        self._pending: dict[int, futures.Future[None]] = {}

    def block_dir(self, owner: int) -> Path:
        return self.layer_dir / str(owner) / "block"

    # Attaching

    def attach_readonly(self, chain: Sequence[Snapshot], user: str) -> str:
        """The mount point of the image `chain` makes (bottom first), with `user` counted in.

        Mounts the device if it is not mounted (first user, or its server died).
        """
        top = chain[-1]
        cleanup_stale(self.run_dir)
        device = self.store.device(top.id)
        if device is not None and self._is_mounted(device):
            if user not in device.users:
                device.users.append(user)
                self.store.put_device(device)
            return device.mountpoint

        mountpoint = self._mount(top.id, chain, writable=False)
        users = device.users if device is not None else []
        if user not in users:
            users.append(user)
        self.store.put_device(Device(top.id, False, mountpoint, users))
        return mountpoint

    def attach_writable(self, owner: Snapshot, chain: Sequence[Snapshot]) -> str:
        """The mount point of `owner`'s writable device on the image of `chain`."""
        cleanup_stale(self.run_dir)
        device = self.store.device(owner.id)
        if device is not None and self._is_mounted(device):
            return device.mountpoint
        mountpoint = self._mount(owner.id, chain, writable=True)
        self.store.put_device(Device(owner.id, True, mountpoint, [owner.name]))
        return mountpoint

    def _mount(self, owner: int, chain: Sequence[Snapshot], writable: bool) -> str:
        self.wait(owner)
        block = self.block_dir(owner)
        mountpoint = block / "mountpoint"
        mountpoint.mkdir(parents=True, exist_ok=True)
        config_path = block / "config.v1.json"
        chain_config(chain, self.layer_dir, self.insecure).dump(config_path)

        # A record of ours whose server died leaves a dead mount behind: clear it first.
        self._unmount_path(mountpoint)
        mount_image(
            config_path,
            mountpoint,
            block / "writable" if writable else None,
            run_dir=self.run_dir,
            cache_dir=block / "cache",
        )
        log.info(
            "attached %s device of %s at %s",
            "writable" if writable else "read-only",
            chain[-1].name,
            mountpoint,
        )
        return str(mountpoint)

    # Releasing

    def release(self, user: str) -> None:
        """Count `user` out of every read-only device; a device left unused goes (auto_remove)."""
        for device in self.store.devices():
            if device.writable or user not in device.users:
                continue
            device.users.remove(user)
            if device.users or not self.auto_remove:
                self.store.put_device(device)
            else:
                self.detach(device.owner)

    def detach(self, owner: int, then_remove: Path | None = None) -> None:
        """Tear down the device `owner` holds, if any (its users are not asked), and then
        remove the folder `then_remove`.

        The record goes at once; the teardown runs on the reaper thread (``background``),
        so that containerd's collector, which calls Remove while it holds its snapshotter
        lock, does not wait for an unmount. A later attach of the same owner waits for it.
        """
        device = self.store.device(owner)
        if device is not None:
            self.store.delete_device(owner)
        mountpoint = device.mountpoint if device is not None else None
        if mountpoint is None and then_remove is None:
            return
        if not self.background:
            self._teardown(owner, mountpoint, then_remove)
            return
        self._pending = {key: job for key, job in self._pending.items() if not job.done()}
        self._pending[owner] = self._reaper.submit(self._teardown, owner, mountpoint, then_remove)

    def _teardown(self, owner: int, mountpoint: str | None, folder: Path | None) -> None:
        try:
            if mountpoint is not None:
                self._unmount_path(Path(mountpoint))
                log.info("detached the device of snapshot %d (%s)", owner, mountpoint)
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        except Exception:
            log.exception("tearing down snapshot %d (%s) failed; Cleanup retries", owner, folder)

    def wait(self, owner: int | None = None) -> None:
        """Wait for the pending teardown of `owner`, or for every pending teardown."""
        if owner is None:
            self._reaper.submit(lambda: None).result()
            return
        job = self._pending.pop(owner, None)
        if job is not None:
            job.result()

    def close(self) -> None:
        """Finish the pending teardowns and stop the reaper thread."""
        self._reaper.shutdown(wait=True)

    def _unmount_path(self, mountpoint: Path) -> None:
        target = os.path.realpath(mountpoint)
        for mount in list_mounts(self.run_dir):
            if mount.mountpoint == target:
                unmount(target, self.run_dir)

    def _is_mounted(self, device: Device) -> bool:
        target = os.path.realpath(device.mountpoint)
        return any(
            mount.mountpoint == target and mount.complete for mount in list_mounts(self.run_dir)
        )

    # Restart and cleanup

    def recover(self, chain_of: dict[int, tuple[list[Snapshot], bool]]) -> None:
        """After a restart: drop dead mounts, re-attach devices still in use, forget the rest.

        `chain_of` maps the owner of each device that should exist to (chain, writable).
        """
        for stale in cleanup_stale(self.run_dir):
            log.warning("the server of %s had died; its mount was removed", stale.mountpoint)
        for device in self.store.devices():
            wanted = chain_of.get(device.owner)
            unused = not device.writable and not device.users and self.auto_remove
            if wanted is None or unused:
                self.detach(device.owner)
                continue
            if self._is_mounted(device):
                continue
            chain, writable = wanted
            log.warning("re-attaching the device of snapshot %d, its mount was gone", device.owner)
            try:
                self._mount(device.owner, chain, writable)
            except MountError as exc:
                log.error("could not re-attach the device of snapshot %d: %s", device.owner, exc)
        self.sweep()

    def sweep(self) -> None:
        """Unmount mounts under the run folder that no device record names."""
        recorded = {os.path.realpath(device.mountpoint) for device in self.store.devices()}
        for mount in list_mounts(self.run_dir):
            if mount.mountpoint not in recorded:
                log.warning("removing the orphaned mount %s", mount.mountpoint)
                unmount(mount.mountpoint, self.run_dir)
        cleanup_stale(self.run_dir)
