"""The snapshotter: containerd's snapshot semantics over overlayfs and OverlayBD devices.

`Snapshotter` implements the calls of containerd's snapshots API on plain Python values;
`workbench.snapshotter.server` puts it behind gRPC. It keeps containerd's rules (snapshots
/storage in containerd): a key is taken once (`SnapshotExistsError`), a parent must exist
(`SnapshotNotFoundError`) and be committed (`SnapshotArgumentError`), only an active
snapshot can be committed and only a view or an active one has mounts
(`SnapshotStateError`), a snapshot with children cannot be removed (`SnapshotStateError`).

Layout under the root folder::

    metadata.db                 snapshots and devices (`workbench.snapshotter.store`)
    snapshots/<id>/fs           the layer's files, or a container's upper
    snapshots/<id>/work         overlayfs' work folder (active snapshots)
    snapshots/<id>/block/       an OverlayBD device: config.v1.json, mountpoint/, cache/,
                                writable/ (`workbench.snapshotter.devices`)
    run/                        the device layer's state (mounts, FUSE folders)

Ordinary layers get what containerd's overlayfs snapshotter returns: no parent -> a bind
mount of ``fs`` (``rw`` or ``ro`` for a view); an active snapshot with parents -> an
``overlay`` with ``workdir``, ``upperdir`` and ``lowerdir`` (nearest parent first); a view
of one parent -> a read-only bind of the parent; of more -> an overlay of lowerdirs only.

OverlayBD layers (shared/specs/overlaybd-formats.md section 4.4):
- remote: a Prepare whose labels (a layer descriptor's annotations, as containerd passes
  them) carry ``containerd.io/snapshot/overlaybd/blob-digest`` and ``blob-size``, an image
  reference (``containerd.io/snapshot/image-ref``) and the target ``containerd.io/
  snapshot.ref``, on a parent that is itself an OverlayBD layer (or none), is answered by a
  committed snapshot named after the target, at once, and ALREADY_EXISTS: containerd then
  neither fetches nor unpacks the layer;
- local: a layer unpacked the ordinary way whose files are one valid ``overlaybd.commit``
  (an OverlayBD layer blob pulled with ``ctr image pull``) becomes a block layer at commit;
- a snapshot prepared or viewed on such layers gets the image's device (read-only, shared,
  attached on first use) as the lowest lowerdir of its overlay and its own upper (rwMode
  ``overlayfs``, the default); with the label ``containerd.io/snapshot/overlaybd.writable``
  = ``dir`` (or the snapshotter's default mode ``dir``) an active snapshot on an OverlayBD
  parent gets its own writable device instead, mounted read-write and bound as the rootfs;
  committing it seals its writable layer into a local block layer.
  Ordinary layers on top of OverlayBD layers (a container committed as an image) stack as
  overlay lowerdirs above the device.

Caveats:
- rwMode ``dev`` (a raw block device for the runtime) is refused: there is no block device
  to hand over without TCMU, only a FUSE-backed loop device the snapshotter mounts itself;
- committing a container on a writable device (rwMode ``dir``) unmounts it and seals its
  writable layer into ``fs/overlaybd.commit`` (a local block layer): the container's
  mounts are gone afterwards, as its snapshot is;
- one lock serializes every call, device attaches included: two containers of different
  OverlayBD images start one after the other;
- TurboOCI and acceleration (trace) layers are unpacked as ordinary layers, so an image with
  a trace layer runs with the trace as a plain file and no prefetch.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from workbench.errors import (
    FormatError,
    SnapshotArgumentError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    SnapshotStateError,
)
from workbench.registry.image import ACCELERATION_LAYER, BLOB_DIGEST, BLOB_SIZE, VERSION
from workbench.snapshotter import filters
from workbench.snapshotter.devices import IMAGE_REF_LABELS, DeviceManager
from workbench.snapshotter.store import Kind, MetadataStore, Snapshot, Storage

__all__ = [
    "REMOTE_LABEL",
    "SNAPSHOT_REF",
    "WRITABLE_LABEL",
    "WRITABLE_MODES",
    "MountSpec",
    "Snapshotter",
]

log = logging.getLogger(__name__)

SNAPSHOT_REF: Final = "containerd.io/snapshot.ref"
"""The chain ID an unpack's Prepare targets (containerd's labelSnapshotRef)."""

WRITABLE_LABEL: Final = "containerd.io/snapshot/overlaybd.writable"
"""rwMode of one container: ``dir`` (writable device) or ``overlayfs`` (upper folder)."""

REMOTE_LABEL: Final = "containerd.io/snapshot/remote"
"""Set on the committed snapshot of a remote layer, as accelerated-container-image does."""

WRITABLE_MODES: Final = ("overlayfs", "dir")

LAYER_FILE: Final = "overlaybd.commit"
"""The file an unpacked OverlayBD layer blob leaves in ``fs``."""

_TURBO_VERSIONS: Final = ("0.1.0-turbo.ociv1", "0.1.0-fastoci")


@dataclass(frozen=True)
class MountSpec:
    """One mount as containerd's mount.Mount: type, source, options."""

    type: str
    source: str
    options: list[str] = field(default_factory=list)


class Snapshotter:
    """Snapshots under `root`; see the module docstring.

    Parameters
    ----------
    root
        The folder of the metadata, layers and devices (created if missing).
    insecure
        Registry hosts to read over plain HTTP besides loopback ones.
    writable_mode
        The default rwMode of containers on OverlayBD images: ``overlayfs`` or ``dir``.
    auto_remove
        Tear an image's device down when its last container or view goes (autoRemoveDev);
        when off, devices stay until their layer is removed.
    background
        Tear devices down and remove folders on a reaper thread after Remove has answered
        (`drain` waits for it); off, Remove does it before it answers.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        insecure: Iterable[str] = (),
        writable_mode: str = "overlayfs",
        auto_remove: bool = True,
        background: bool = True,
    ) -> None:
        if writable_mode not in WRITABLE_MODES:
            raise SnapshotArgumentError(
                f"writable mode {writable_mode!r} is not one of {', '.join(WRITABLE_MODES)}"
            )
        self.root = Path(root).resolve()
        self.layer_dir = self.root / "snapshots"
        self.layer_dir.mkdir(parents=True, exist_ok=True)
        self.writable_mode = writable_mode
        self.store = MetadataStore(self.root / "metadata.db")
        self.devices = DeviceManager(
            self.root,
            self.store,
            insecure=tuple(insecure),
            auto_remove=auto_remove,
            background=background,
        )
        self._index_off = Path("/sys/module/overlay/parameters/index").exists()
        self._lock = threading.RLock()
        with self._lock:
            self.devices.recover(self._wanted_devices())

    def close(self) -> None:
        """Finish pending teardowns, close the store; devices and mounts in use stay (a
        restarted snapshotter finds them)."""
        with self._lock:
            self.devices.close()
            self.store.close()

    def drain(self) -> None:
        """Wait until every teardown that Remove started has finished."""
        self.devices.wait()

    # Creating ---------------------------------------------------------------------------

    def prepare(
        self, key: str, parent: str = "", labels: dict[str, str] | None = None
    ) -> list[MountSpec]:
        """An active snapshot `key` on `parent`; its mounts."""
        return self._create(key, parent, dict(labels or {}), Kind.ACTIVE)

    def view(
        self, key: str, parent: str = "", labels: dict[str, str] | None = None
    ) -> list[MountSpec]:
        """A read-only view `key` of `parent`; its mounts."""
        return self._create(key, parent, dict(labels or {}), Kind.VIEW)

    def _create(self, key: str, parent: str, labels: dict[str, str], kind: Kind) -> list[MountSpec]:
        with self._lock:
            if not key:
                raise SnapshotArgumentError("a snapshot key must not be empty")
            if self.store.get(key) is not None:
                raise SnapshotExistsError(f"snapshot {key} already exists")
            chain = self._chain(parent)
            if kind == Kind.ACTIVE and self._is_remote_layer(labels, chain):
                self._make_remote(key, parent, labels)

            storage = self._storage_for(kind, labels, chain)
            snapshot = self.store.insert(key, parent, kind, storage, labels)
            try:
                folder = self._folder(snapshot)
                (folder / "fs").mkdir(parents=True)
                if kind == Kind.ACTIVE and storage == Storage.OVERLAY:
                    (folder / "work").mkdir()
                mounts = self._mounts(snapshot)
            except BaseException:
                self._destroy(snapshot)
                raise
            log.debug("%s %s on %r (%s)", kind.name.lower(), key, parent, storage)
            return mounts

    def _is_remote_layer(self, labels: dict[str, str], chain: list[Snapshot]) -> bool:
        """Whether a Prepare is the unpack of an OverlayBD layer to leave in the registry."""
        if SNAPSHOT_REF not in labels or BLOB_DIGEST not in labels or BLOB_SIZE not in labels:
            return False
        if labels.get(ACCELERATION_LAYER) == "yes" or labels.get(VERSION) in _TURBO_VERSIONS:
            return False
        if not any(name in labels for name in IMAGE_REF_LABELS):
            log.info(
                "layer %s has OverlayBD labels but no image reference; unpacking it as files "
                "(pull with workbench rpull to leave it in the registry)",
                labels[BLOB_DIGEST],
            )
            return False
        if not all(layer.is_block for layer in chain):
            log.warning(
                "layer %s is an OverlayBD layer on an ordinary layer; unpacking it as files",
                labels[BLOB_DIGEST],
            )
            return False
        return True

    def _make_remote(self, key: str, parent: str, labels: dict[str, str]) -> None:
        """Commit the remote layer's snapshot now; raises `SnapshotExistsError` (always)."""
        target = labels[SNAPSHOT_REF]
        for snapshot in self.store.all():
            if (
                snapshot.kind == Kind.COMMITTED
                and snapshot.labels.get(SNAPSHOT_REF) == target
                and snapshot.parent == parent
            ):
                raise SnapshotExistsError(f"target snapshot {target} already exists")

        # Named like containerd's own keys (namespace/sequence/...), with the target last.
        prefix, _, _ = key.rpartition("/")
        name = f"{prefix}/{target}" if prefix else target
        if self.store.get(name) is not None:
            raise SnapshotExistsError(f"target snapshot {target} already exists as {name}")
        committed = self.store.insert(
            name,
            parent,
            Kind.COMMITTED,
            Storage.REMOTE_BLOCK,
            {**labels, REMOTE_LABEL: "remote snapshot"},
        )
        (self._folder(committed) / "fs").mkdir(parents=True, exist_ok=True)
        log.info(
            "remote layer %s (%s bytes) committed as %s, not fetched",
            labels[BLOB_DIGEST],
            labels[BLOB_SIZE],
            name,
        )
        raise SnapshotExistsError(
            f"target snapshot {target} already exists: a remote OverlayBD layer "
            f"(blob {labels[BLOB_DIGEST]}), read lazily, nothing to unpack"
        )

    def _storage_for(self, kind: Kind, labels: dict[str, str], chain: list[Snapshot]) -> Storage:
        mode = labels.get(WRITABLE_LABEL, self.writable_mode)
        if mode == "dev":
            raise SnapshotArgumentError(
                f"{WRITABLE_LABEL}=dev (a raw block device) is not supported: the device is "
                "a FUSE-backed loop device the snapshotter mounts; use dir or overlayfs"
            )
        if mode not in WRITABLE_MODES:
            raise SnapshotArgumentError(
                f"{WRITABLE_LABEL}={mode!r} is not one of {', '.join(WRITABLE_MODES)}"
            )
        if kind == Kind.ACTIVE and mode == "dir" and chain and chain[-1].is_block:
            return Storage.WRITABLE_BLOCK
        return Storage.OVERLAY

    # Mounts ------------------------------------------------------------------------------

    def mounts(self, key: str) -> list[MountSpec]:
        """The mounts of an active snapshot or a view (devices attached if they went)."""
        with self._lock:
            snapshot = self._get(key)
            if snapshot.kind not in (Kind.ACTIVE, Kind.VIEW):
                raise SnapshotStateError(
                    f"snapshot {key} is {snapshot.kind.name.lower()}: only active snapshots "
                    "and views have mounts; prepare or view a snapshot on it"
                )
            return self._mounts(snapshot)

    def _mounts(self, snapshot: Snapshot) -> list[MountSpec]:
        folder = self._folder(snapshot)
        if snapshot.storage == Storage.WRITABLE_BLOCK:
            chain = self._chain(snapshot.parent)
            mountpoint = self.devices.attach_writable(snapshot, chain)
            return [MountSpec("bind", mountpoint, ["rw", "rbind"])]

        lowerdirs = self._lowerdirs(snapshot)
        if not lowerdirs:
            mode = "ro" if snapshot.kind == Kind.VIEW else "rw"
            return [MountSpec("bind", str(folder / "fs"), [mode, "rbind"])]

        options = ["index=off"] if self._index_off else []
        if snapshot.kind == Kind.ACTIVE:
            options += [f"workdir={folder / 'work'}", f"upperdir={folder / 'fs'}"]
        elif len(lowerdirs) == 1:
            return [MountSpec("bind", lowerdirs[0], ["ro", "rbind"])]
        options.append("lowerdir=" + ":".join(lowerdirs))
        return [MountSpec("overlay", "overlay", options)]

    def _lowerdirs(self, snapshot: Snapshot) -> list[str]:
        """Lower folders of `snapshot`, nearest first; a run of block layers is one device."""
        ancestors = list(reversed(self._chain(snapshot.parent)))
        lowerdirs = []
        for position, layer in enumerate(ancestors):
            if not layer.is_block:
                lowerdirs.append(str(self._folder(layer) / "fs"))
                continue
            below = ancestors[position:]
            ordinary = [other.name for other in below if not other.is_block]
            if ordinary:
                raise SnapshotStateError(
                    f"snapshot {snapshot.name}: OverlayBD layer {layer.name} lies on ordinary "
                    f"layers ({', '.join(ordinary)}); an OverlayBD image must have its block "
                    "layers at the bottom"
                )
            lowerdirs.append(self.devices.attach_readonly(list(reversed(below)), snapshot.name))
            break
        return lowerdirs

    # Committing and removing -----------------------------------------------------------------

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> Snapshot:
        """Commit active snapshot `key` as `name` (with `labels`); its folder is kept."""
        with self._lock:
            snapshot = self._get(key)
            if snapshot.kind != Kind.ACTIVE:
                raise SnapshotStateError(
                    f"snapshot {key} is {snapshot.kind.name.lower()}, not active; only an "
                    "active snapshot can be committed"
                )
            if self.store.get(name) is not None:
                raise SnapshotExistsError(f"snapshot {name} already exists")
            folder = self._folder(snapshot)
            if snapshot.storage == Storage.WRITABLE_BLOCK:
                self._seal_writable(snapshot)
            self.devices.release(snapshot.name)
            shutil.rmtree(folder / "work", ignore_errors=True)
            snapshot.size, snapshot.inodes = disk_usage(folder / "fs")
            if self._holds_block_layer(folder / "fs") and all(
                layer.is_block for layer in self._chain(snapshot.parent)
            ):
                snapshot.storage = Storage.LOCAL_BLOCK
            snapshot.name = name
            snapshot.kind = Kind.COMMITTED
            snapshot.labels = dict(labels or {})
            self.store.save(snapshot)
            log.debug("committed %s as %s (%s)", key, name, snapshot.storage)
            return snapshot

    def _seal_writable(self, snapshot: Snapshot) -> None:
        """Turn a container's writable device into the layer file ``fs/overlaybd.commit``
        (lz4 ZFile, a fresh uuid), as OverlayBD's snapshotter commits rwMode dir."""
        from workbench.image.commit import commit_writable
        from workbench.image.writable import WritableLayer

        # Unmounting flushes ext4 to the device and the FUSE server flushes the layer.
        self.devices.detach(snapshot.id)
        self.devices.wait(snapshot.id)
        block = self._folder(snapshot) / "block"
        layer = WritableLayer.open(
            block / "writable" / "data", block / "writable" / "index", readonly=True
        )
        try:
            out = self._folder(snapshot) / "fs" / LAYER_FILE
            commit_writable(layer, out, uuid=str(uuid.uuid4()), compress="lz4")
        finally:
            layer.close()
        shutil.rmtree(block, ignore_errors=True)
        log.info("sealed the writable device of %s into %s", snapshot.name, LAYER_FILE)

    def _holds_block_layer(self, fs: Path) -> bool:
        """True if `fs` holds only a valid OverlayBD layer file (`LAYER_FILE`)."""
        from workbench.image.layer import ReadOnlyLayer

        try:
            entries = os.listdir(fs)
        except OSError:
            return False
        if entries != [LAYER_FILE] or not (fs / LAYER_FILE).is_file():
            return False
        try:
            with ReadOnlyLayer.open(fs / LAYER_FILE):
                return True
        except (FormatError, OSError) as exc:
            log.info("%s is named like an OverlayBD layer but is not one: %s", fs, exc)
            return False

    def remove(self, key: str) -> None:
        """Remove snapshot `key`; its devices and folder go on the reaper thread (`drain`)."""
        with self._lock:
            snapshot = self._get(key)
            children = self.store.children(snapshot.name)
            if children:
                raise SnapshotStateError(
                    f"snapshot {key} has {children} children; remove them first"
                )
            self._destroy(snapshot)
            log.debug("removed %s", key)

    def _destroy(self, snapshot: Snapshot) -> None:
        self.devices.release(snapshot.name)
        self.store.delete(snapshot.id)
        self.devices.detach(snapshot.id, then_remove=self._folder(snapshot))

    # Reading and labels --------------------------------------------------------------------

    def stat(self, key: str) -> Snapshot:
        with self._lock:
            return self._get(key)

    def update(self, name: str, labels: dict[str, str], paths: Iterable[str] = ()) -> Snapshot:
        """Set labels of `name`, as containerd does: all of them, or those `paths` name.

        A path is ``labels`` (replace all) or ``labels.KEY`` (set KEY, or remove it when
        `labels` has no KEY); any other field is `SnapshotArgumentError`.
        """
        with self._lock:
            snapshot = self._get(name)
            paths = list(paths)
            if not paths:
                snapshot.labels = dict(labels)
            for path in paths:
                if path == "labels":
                    snapshot.labels = dict(labels)
                elif path.startswith("labels."):
                    label = path[len("labels.") :]
                    if label in labels:
                        snapshot.labels[label] = labels[label]
                    else:
                        snapshot.labels.pop(label, None)
                else:
                    raise SnapshotArgumentError(
                        f"cannot update field {path!r} of snapshot {name}: only labels "
                        "(labels or labels.KEY) can change"
                    )
            self.store.save(snapshot)
            return snapshot

    def walk(self, filter_texts: Iterable[str] = ()) -> list[Snapshot]:
        """Every snapshot matching any of the filters (containerd syntax), or all."""
        parsed = [filters.parse(text) for text in filter_texts if text]
        with self._lock:
            return [snapshot for snapshot in self.store.all() if filters.matches(snapshot, parsed)]

    def usage(self, key: str) -> tuple[int, int]:
        """(bytes, inodes) a snapshot takes on disk: measured now unless it is committed."""
        with self._lock:
            snapshot = self._get(key)
            if snapshot.kind == Kind.COMMITTED:
                return snapshot.size, snapshot.inodes
            folder = self._folder(snapshot)
            if snapshot.storage == Storage.WRITABLE_BLOCK:
                return disk_usage(folder / "block" / "writable")
            return disk_usage(folder / "fs")

    def cleanup(self) -> None:
        """Free what no snapshot owns: folders, devices, mounts (containerd's Cleanup).

        A device kept without users (``auto_remove`` off) belongs to its layer and stays.
        """
        with self._lock:
            self.devices.wait()
            known = {snapshot.id for snapshot in self.store.all()}
            for device in self.store.devices():
                unused = not device.writable and not device.users and self.devices.auto_remove
                if device.owner not in known or unused:
                    self.devices.detach(device.owner)
            self.devices.sweep()
            for folder in self.layer_dir.iterdir():
                if not (folder.name.isdigit() and int(folder.name) in known):
                    log.info("cleanup: removing %s, which no snapshot owns", folder)
                    shutil.rmtree(folder, ignore_errors=True)
            self.devices.wait()

    # Helpers ---------------------------------------------------------------------------

    def _get(self, key: str) -> Snapshot:
        snapshot = self.store.get(key)
        if snapshot is None:
            raise SnapshotNotFoundError(f"snapshot {key} does not exist")
        return snapshot

    def _chain(self, parent: str) -> list[Snapshot]:
        """`parent` and its ancestors, bottom first; [] for no parent."""
        chain: list[Snapshot] = []
        name = parent
        while name:
            snapshot = self.store.get(name)
            if snapshot is None:
                what = "parent" if name == parent else f"ancestor {name} of parent"
                raise SnapshotNotFoundError(f"{what} snapshot {name} does not exist")
            if snapshot.kind != Kind.COMMITTED:
                raise SnapshotArgumentError(
                    f"parent {name} is {snapshot.kind.name.lower()}, not committed; commit it first"
                )
            chain.append(snapshot)
            name = snapshot.parent
        return list(reversed(chain))

    def _folder(self, snapshot: Snapshot) -> Path:
        return self.layer_dir / str(snapshot.id)

    def _wanted_devices(self) -> dict[int, tuple[list[Snapshot], bool]]:
        """For every device record whose owner exists: (its chain, writable)."""
        wanted = {}
        for device in self.store.devices():
            owner = self.store.get_by_id(device.owner)
            if owner is None:
                continue
            try:
                if device.writable:
                    wanted[owner.id] = (self._chain(owner.parent), True)
                else:
                    wanted[owner.id] = (self._chain(owner.name), False)
            except (SnapshotNotFoundError, SnapshotArgumentError) as exc:
                log.warning("device of snapshot %s cannot be restored: %s", owner.name, exc)
        return wanted


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes allocated, inodes) under `path`, each inode counted once, as containerd does."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for folder, dirs, files in os.walk(path):
        for name in [".", *dirs, *files]:
            try:
                info = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if name in dirs and stat.S_ISDIR(info.st_mode):
                continue  # counted as "." of its own walk step
            inode = (info.st_dev, info.st_ino)
            if inode not in seen:
                seen.add(inode)
                size += info.st_blocks * 512
    return size, len(seen)
