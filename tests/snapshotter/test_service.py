"""`Snapshotter` without containerd: containerd's snapshot rules, mounts, OverlayBD devices.

The rule tests need no mounts; the device tests attach a real image from the embedded
registry (FUSE, loop device, ext4) and mount what `Snapshotter` returns the way containerd
would, then check that Remove, Cleanup and a restart leave exactly what they should.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from snapshot_images import mount_reason, push_overlaybd, require

from workbench.device.mount import list_mounts, unmount_all
from workbench.errors import (
    SnapshotArgumentError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    SnapshotStateError,
)
from workbench.registry.image import BLOB_DIGEST, BLOB_SIZE
from workbench.snapshotter.service import (
    REMOTE_LABEL,
    SNAPSHOT_REF,
    WRITABLE_LABEL,
    MountSpec,
    Snapshotter,
)
from workbench.snapshotter.store import Kind, Storage

IMAGE_REF = "containerd.io/snapshot/image-ref"


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "root"
    try:
        yield folder
    finally:
        if (folder / "run").exists():
            unmount_all(folder / "run")


@pytest.fixture
def snapshotter(root: Path) -> Iterator[Snapshotter]:
    service = Snapshotter(root)
    try:
        yield service
    finally:
        service.close()


def index_off() -> list[str]:
    return ["index=off"] if Path("/sys/module/overlay/parameters/index").exists() else []


def folder(root: Path, service: Snapshotter, name: str) -> Path:
    return root / "snapshots" / str(service.stat(name).id)


# ---------------------------------------------------------------------------------------------
# containerd's rules and overlayfs mounts


def test_mounts_are_those_of_containerds_overlayfs_snapshotter(
    snapshotter: Snapshotter, root: Path
) -> None:
    [base] = snapshotter.prepare("base")
    base_fs = folder(root, snapshotter, "base") / "fs"
    assert base == MountSpec("bind", str(base_fs), ["rw", "rbind"])
    snapshotter.commit("layer1", "base")
    snapshotter.prepare("mid", "layer1")
    snapshotter.commit("layer2", "mid")

    [active] = snapshotter.prepare("container", "layer2")
    own = folder(root, snapshotter, "container")
    lower = [str(folder(root, snapshotter, name) / "fs") for name in ("layer2", "layer1")]
    assert active.type == "overlay"
    assert active.options == [
        *index_off(),
        f"workdir={own / 'work'}",
        f"upperdir={own / 'fs'}",
        "lowerdir=" + ":".join(lower),
    ]

    assert snapshotter.view("one", "layer1") == [MountSpec("bind", lower[1], ["ro", "rbind"])]
    [two] = snapshotter.view("two", "layer2")
    assert two.type == "overlay" and two.options[-1] == "lowerdir=" + ":".join(lower)
    [empty] = snapshotter.view("empty")
    assert empty.options == ["ro", "rbind"]
    assert snapshotter.mounts("container") == [active]


def test_containerds_error_rules(snapshotter: Snapshotter) -> None:
    snapshotter.prepare("a")
    with pytest.raises(SnapshotExistsError, match="snapshot a already exists"):
        snapshotter.prepare("a")
    with pytest.raises(SnapshotNotFoundError, match="parent snapshot nope does not exist"):
        snapshotter.prepare("b", "nope")
    with pytest.raises(SnapshotArgumentError, match="parent a is active, not committed"):
        snapshotter.prepare("b", "a")

    snapshotter.commit("c", "a")
    with pytest.raises(SnapshotStateError, match="snapshot c is committed, not active"):
        snapshotter.commit("d", "c")
    with pytest.raises(SnapshotStateError, match="only active snapshots and views have mounts"):
        snapshotter.mounts("c")
    snapshotter.prepare("e", "c")
    with pytest.raises(SnapshotExistsError, match="snapshot c already exists"):
        snapshotter.commit("c", "e")
    with pytest.raises(SnapshotStateError, match="has 1 children"):
        snapshotter.remove("c")
    with pytest.raises(SnapshotNotFoundError):
        snapshotter.stat("a")  # committed under its new name
    with pytest.raises(SnapshotNotFoundError):
        snapshotter.remove("a")

    snapshotter.remove("e")
    snapshotter.remove("c")
    assert snapshotter.walk() == []


def test_labels_update_as_containerd_does(snapshotter: Snapshotter) -> None:
    snapshotter.prepare("a", labels={"x": "1", "y": "2"})
    assert snapshotter.update("a", {"x": "9", "z": "3"}, ["labels.x", "labels.y"]).labels == {
        "x": "9"
    }
    assert snapshotter.update("a", {"w": "4"}).labels == {"w": "4"}
    assert snapshotter.update("a", {"v": "5"}, ["labels"]).labels == {"v": "5"}
    with pytest.raises(SnapshotArgumentError, match="only labels"):
        snapshotter.update("a", {}, ["parent"])
    assert snapshotter.stat("a").labels == {"v": "5"}


def test_walk_filters_and_usage(snapshotter: Snapshotter, root: Path) -> None:
    snapshotter.prepare("x", labels={SNAPSHOT_REF: "sha256:1"})
    (folder(root, snapshotter, "x") / "fs" / "file").write_bytes(b"a" * 10000)
    size, inodes = snapshotter.usage("x")
    assert size >= 10000 and inodes == 2
    snapshotter.commit("sha256:1", "x", {SNAPSHOT_REF: "sha256:1"})
    assert snapshotter.usage("sha256:1") == (size, inodes)
    snapshotter.prepare("y", "sha256:1")

    names = [
        snapshot.name
        for snapshot in snapshotter.walk(
            [f'labels."{SNAPSHOT_REF}"==sha256:1,parent==""', 'name~="^y$"']
        )
    ]
    assert names == ["sha256:1", "y"]
    assert [s.name for s in snapshotter.walk(["kind==active"])] == ["y"]
    with pytest.raises(SnapshotArgumentError, match="unterminated"):
        snapshotter.walk(['name=="x'])


def test_state_survives_a_restart_and_cleanup_removes_orphans(root: Path) -> None:
    first = Snapshotter(root)
    first.prepare("a", labels={"k": "v"})
    first.commit("b", "a")
    first.prepare("c", "b")
    first.close()
    orphan = root / "snapshots" / "999"
    (orphan / "fs").mkdir(parents=True)

    again = Snapshotter(root)
    try:
        assert [(s.name, s.parent, s.kind) for s in again.walk()] == [
            ("b", "", Kind.COMMITTED),
            ("c", "b", Kind.ACTIVE),
        ]
        again.cleanup()
        assert not orphan.exists()
        assert sorted(p.name for p in (root / "snapshots").iterdir()) == ["1", "2"]
    finally:
        again.close()


def test_an_unknown_writable_mode_is_refused(snapshotter: Snapshotter) -> None:
    with pytest.raises(SnapshotArgumentError, match=r"dev \(a raw block device\) is not supported"):
        snapshotter.prepare("a", labels={WRITABLE_LABEL: "dev"})
    with pytest.raises(SnapshotArgumentError, match="'nfs' is not one of overlayfs, dir"):
        snapshotter.prepare("a", labels={WRITABLE_LABEL: "nfs"})
    assert snapshotter.walk() == []


# ---------------------------------------------------------------------------------------------
# OverlayBD layers


def remote_labels(reference: str, digest: str, size: int, chain_id: str) -> dict[str, str]:
    return {
        BLOB_DIGEST: digest,
        BLOB_SIZE: str(size),
        IMAGE_REF: reference,
        SNAPSHOT_REF: chain_id,
    }


def prepare_remote(service: Snapshotter, reference: str, layer: Path) -> str:
    """The unpack's Prepare of the image's one layer; the committed snapshot's name."""
    import hashlib

    data = layer.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    labels = remote_labels(reference, digest, len(data), digest)
    with pytest.raises(SnapshotExistsError, match="remote OverlayBD layer"):
        service.prepare(f"ns/1/extract-1 {digest}", "", labels)
    return f"ns/1/{digest}"


def mount(specs: list[MountSpec], target: Path) -> None:
    [spec] = specs
    if spec.type == "bind":
        subprocess.run(["mount", "--rbind", spec.source, str(target)], check=True)
        if "ro" in spec.options:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        return
    options = ",".join(spec.options)
    subprocess.run(["mount", "-t", spec.type, spec.source, "-o", options, str(target)], check=True)


def umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], check=True)


def our_mounts(root: Path) -> list[str]:
    with open("/proc/self/mounts") as mounts:
        return [line.split()[1] for line in mounts if str(root) in line]


@pytest.mark.slow
def test_a_remote_layer_is_committed_at_once_and_read_lazily_under_an_overlay(
    snapshotter: Snapshotter,
    root: Path,
    tmp_path: Path,
    registry: tuple[str, Path],
    overlaybd_layer: Path,
    image_tree: Path,
) -> None:
    require(mount_reason())
    reference = push_overlaybd(registry, overlaybd_layer, "lazy/app:v1")
    name = prepare_remote(snapshotter, reference, overlaybd_layer.parent / "layer.tar")
    remote = snapshotter.stat(name)
    assert remote.kind == Kind.COMMITTED and remote.storage == Storage.REMOTE_BLOCK
    assert remote.labels[REMOTE_LABEL] == "remote snapshot"
    assert list_mounts(root / "run") == []  # nothing attached at pull time

    target = tmp_path / "rootfs"
    target.mkdir()
    mount(snapshotter.prepare("ns/2/c1", name), target)
    try:
        assert (target / "data" / "random.bin").read_bytes() == (
            image_tree / "data" / "random.bin"
        ).read_bytes()
        (target / "etc" / "hello.txt").write_text("changed\n")
        (target / "new.txt").write_text("new\n")
    finally:
        umount(target)
    upper = folder(root, snapshotter, "ns/2/c1") / "fs"
    assert (upper / "new.txt").read_text() == "new\n"
    assert (image_tree / "etc" / "hello.txt").read_text() == "hello from the image\n"

    # A second container and a view share the one device; it goes with the last of them.
    snapshotter.prepare("ns/3/c2", name)
    [view] = snapshotter.view("ns/4/v", name)
    assert view.type == "bind" and view.options == ["ro", "rbind"]
    assert len(list_mounts(root / "run")) == 1
    snapshotter.remove("ns/2/c1")
    snapshotter.remove("ns/4/v")
    assert len(list_mounts(root / "run")) == 1
    snapshotter.remove("ns/3/c2")
    # The device goes on the reaper thread, after Remove answered; a container that comes
    # meanwhile waits for that teardown and gets a fresh device.
    mount(snapshotter.prepare("ns/5/c3", name), target)
    try:
        assert (target / "etc" / "hello.txt").read_text() == "hello from the image\n"
    finally:
        umount(target)
    snapshotter.remove("ns/5/c3")
    snapshotter.drain()
    assert list_mounts(root / "run") == []

    snapshotter.remove(name)
    snapshotter.cleanup()
    assert our_mounts(root) == []
    assert list((root / "snapshots").iterdir()) == []


@pytest.mark.slow
def test_devices_survive_a_restart_and_a_dead_server_is_replaced(
    root: Path, tmp_path: Path, registry: tuple[str, Path], overlaybd_layer: Path
) -> None:
    require(mount_reason())
    reference = push_overlaybd(registry, overlaybd_layer, "lazy/restart:v1")
    first = Snapshotter(root)
    name = prepare_remote(first, reference, overlaybd_layer.parent / "layer.tar")
    first.prepare("ns/2/c1", name)
    [before] = list_mounts(root / "run")
    first.close()

    second = Snapshotter(root)
    try:
        # Same mount, found again; Mounts does not attach a second device.
        second.mounts("ns/2/c1")
        assert [m.id for m in list_mounts(root / "run")] == [before.id]

        os.kill(before.pid, signal.SIGKILL)
        try:
            os.waitpid(before.pid, 0)  # mount_image started it: a child of this process
        except ChildProcessError:
            pass
        [spec] = second.mounts("ns/2/c1")
        [after] = list_mounts(root / "run")
        assert after.id != before.id and after.complete
        target = tmp_path / "rootfs"
        target.mkdir()
        mount([spec], target)
        try:
            assert (target / "etc" / "hello.txt").read_text() == "hello from the image\n"
        finally:
            umount(target)
        second.remove("ns/2/c1")
        second.remove(name)
    finally:
        second.close()
    assert list_mounts(root / "run") == [] and our_mounts(root) == []


@pytest.mark.slow
def test_rw_mode_dir_gives_a_writable_device_that_commits_to_a_block_layer(
    snapshotter: Snapshotter, root: Path, tmp_path: Path, overlaybd_layer: Path
) -> None:
    require(mount_reason())
    # A layer unpacked as files (what ctr image pull leaves): fs/overlaybd.commit.
    snapshotter.prepare("ns/1/extract", "")
    layer_fs = folder(root, snapshotter, "ns/1/extract") / "fs"
    (layer_fs / "overlaybd.commit").write_bytes((overlaybd_layer.parent / "layer.tar").read_bytes())
    snapshotter.commit("ns/1/layer", "ns/1/extract")
    assert snapshotter.stat("ns/1/layer").storage == Storage.LOCAL_BLOCK

    [spec] = snapshotter.prepare("ns/2/c1", "ns/1/layer", {WRITABLE_LABEL: "dir"})
    assert snapshotter.stat("ns/2/c1").storage == Storage.WRITABLE_BLOCK
    block = folder(root, snapshotter, "ns/2/c1") / "block"
    assert spec == MountSpec("bind", str(block / "mountpoint"), ["rw", "rbind"])
    target = tmp_path / "rootfs"
    target.mkdir()
    mount([spec], target)
    try:
        (target / "written.txt").write_text("on the block device\n")
        assert (target / "etc" / "hello.txt").read_text() == "hello from the image\n"
    finally:
        umount(target)
    assert (block / "writable" / "data").stat().st_size > 0
    assert snapshotter.usage("ns/2/c1")[0] > 0

    # Committing seals the writable layer into a block layer that containers stack on.
    sealed = snapshotter.commit("ns/2/img", "ns/2/c1")
    assert sealed.storage == Storage.LOCAL_BLOCK
    assert list_mounts(root / "run") == [] and not block.exists()
    mount(snapshotter.prepare("ns/3/c2", "ns/2/img"), target)
    try:
        assert (target / "written.txt").read_text() == "on the block device\n"
        assert (target / "etc" / "hello.txt").read_text() == "hello from the image\n"
    finally:
        umount(target)

    for name in ("ns/3/c2", "ns/2/img", "ns/1/layer"):
        snapshotter.remove(name)
    snapshotter.drain()
    assert our_mounts(root) == []


def test_a_remote_layer_of_another_file_system_is_refused_with_the_reason(
    snapshotter: Snapshotter,
) -> None:
    from workbench.registry.image import BLOB_FS_TYPE

    labels = remote_labels("127.0.0.1:1/x/y:v1", "sha256:" + "a" * 64, 4096, "sha256:" + "a" * 64)
    labels[BLOB_FS_TYPE] = "erofs"
    with pytest.raises(SnapshotExistsError):
        snapshotter.prepare("ns/1/extract", "", labels)
    [layer] = snapshotter.walk()
    with pytest.raises(SnapshotArgumentError, match=r"holds erofs .* mounts ext4 only"):
        snapshotter.prepare("ns/2/c1", layer.name)
    assert [s.name for s in snapshotter.walk()] == [layer.name]
