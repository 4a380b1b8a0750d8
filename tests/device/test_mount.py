"""Real mounts: an ext4 image from a folder tree, imported as a layer, mounted through FUSE + loop.

Needs root, /dev/fuse, losetup, mkfs.ext4 and e2fsck; skips without them unless CI is set in
the environment. Every test tears down in a finally and then checks that no mount, loop
device or server process of its run folder is left.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from registries import REGISTRIES, start_registry

if importlib.util.find_spec("pyfuse3") is None:
    if os.environ.get("CI"):
        raise RuntimeError("pyfuse3 is not installed; CI must run the FUSE tests")
    pytest.skip("pyfuse3 is not installed (needs libfuse3-dev)", allow_module_level=True)

from workbench.cli.device import commit as commit_command
from workbench.cli.device import mount as mount_command
from workbench.cli.device import umount as umount_command
from workbench.cli.image import export_image
from workbench.device.commit import commit_mount
from workbench.device.fuse import open_stack
from workbench.device.mount import (
    Mount,
    MountError,
    cleanup_stale,
    list_mounts,
    mount_image,
    unmount,
    unmount_all,
)
from workbench.image.commit import import_raw
from workbench.registry.image import push_image
from workbench.tracing.report import render_report, request_table

MiB = 1 << 20
TOOLS = ("losetup", "mkfs.ext4", "e2fsck", "fusermount3", "findmnt")


def require_mounts() -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "mount tests need root"
    elif not os.path.exists("/dev/fuse"):
        reason = "/dev/fuse is missing (no FUSE in this kernel or container)"
    elif missing := [tool for tool in TOOLS if shutil.which(tool) is None]:
        reason = f"{', '.join(missing)} missing; install Debian's fuse3, e2fsprogs, util-linux"
    if reason is None:
        return
    if os.environ.get("CI"):
        raise RuntimeError(f"{reason}; CI must run the mount tests")
    pytest.skip(reason)


def pattern(length: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, length, np.uint8).tobytes()


def make_tree(root: Path) -> None:
    """Files of many sizes (empty, partial blocks, several MiB) in nested folders."""
    for folder in range(4):
        for number, size in enumerate((0, 1, 4095, 4097, 70_000, 300_000)):
            path = root / f"d{folder}" / "sub" / f"f{number}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(pattern(size, folder * 10 + number))
    (root / "big.bin").write_bytes(pattern(3 * MiB + 123, 99))
    (root / "link").symlink_to("big.bin")


def tree_files(root: Path) -> dict[str, bytes]:
    files = {}
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                files[str(path.relative_to(root))] = path.read_bytes()
    return files


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, source tree): a 64 MiB ext4 (with a journal) of the tree, as one lz4 tar layer."""
    require_mounts()
    base = tmp_path_factory.mktemp("image")
    source, raw = base / "tree", base / "disk.raw"
    make_tree(source)
    with open(raw, "wb") as file:
        file.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(source), str(raw)], check=True)
    import_raw(raw, base / "layer.tar", compress="lz4", tar=True)
    config = base / "config.v1.json"
    config.write_text(f'{{"lowers": [{{"file": "{base / "layer.tar"}"}}]}}')
    return config, source


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    """The mounts' state folder; everything made under it is torn down and checked afterwards."""
    run = tmp_path / "run"
    try:
        yield run
    finally:
        try:
            unmount_all(run)
        finally:
            left = force_cleanup(run, tmp_path)
        assert not left, f"left behind: {left}"


def force_cleanup(run: Path, tmp_path: Path) -> list[str]:
    """Remove by force whatever is left of this test's mounts; returns what had to be removed."""
    left = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1]
        if target.startswith(str(tmp_path)):
            left.append(f"mount {target}")
            subprocess.run(["umount", "-l", target], capture_output=True)
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    for line in loops.splitlines():
        if str(run) in line:
            left.append(f"loop {line}")
            subprocess.run(["losetup", "-d", line.split(":")[0]], capture_output=True)
    fuse_root = run / "fuse"
    for folder in fuse_root.glob("*") if fuse_root.is_dir() else []:
        subprocess.run(["fusermount3", "-u", "-z", str(folder)], capture_output=True)
    for pid in server_pids(run):
        left.append(f"process {pid}")
        os.kill(pid, signal.SIGKILL)
    return left


def server_pids(run: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            command = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if str(run).encode() in command and state != b"Z":
            pids.append(int(proc.name))
    return pids


def fsck_clean(config: Path, upper: Path | None, out: Path) -> None:
    """e2fsck -fn on the merged image, exported to a raw file (the image left unmounted)."""
    with open_stack(config, upper) as stack:
        export_image(stack, out, progress=False)
    done = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------


def test_a_read_only_mount_shows_every_file_of_the_tree(
    image: tuple[Path, Path], tmp_path: Path, run_dir: Path
) -> None:
    config, source = image
    target = tmp_path / "mnt"
    target.mkdir()

    made = CliRunner().invoke(mount_command, [str(config), str(target), "--run-dir", str(run_dir)])
    assert made.exit_code == 0, made.output
    try:
        assert tree_files(target) == tree_files(source)
        assert os.readlink(target / "link") == "big.bin"
        with pytest.raises(OSError, match="Read-only file system"):
            (target / "new").write_bytes(b"x")
        [mount] = list_mounts(run_dir)
        assert mount.read_only and mount.mountpoint == str(target)
    finally:
        gone = CliRunner().invoke(umount_command, [str(target), "--run-dir", str(run_dir)])
    assert gone.exit_code == 0, gone.output
    assert list_mounts(run_dir) == []


def loop_readahead_kb(loop: str) -> int:
    return int(Path(f"/sys/block/{os.path.basename(loop)}/queue/read_ahead_kb").read_text())


def test_writes_survive_unmount_and_remount_and_fsck_is_clean(
    image: tuple[Path, Path], tmp_path: Path, run_dir: Path
) -> None:
    config, source = image
    target, upper = tmp_path / "mnt", tmp_path / "upper"
    target.mkdir()
    new_file = pattern(2 * MiB + 7, 5)

    mount_image(config, target, upper, run_dir=run_dir)
    try:
        (target / "new" / "deep").mkdir(parents=True)
        (target / "new" / "deep" / "file.bin").write_bytes(new_file)
        (target / "d0" / "sub" / "f4.bin").write_bytes(b"overwritten")
        (target / "d1" / "sub" / "f5.bin").unlink()
        os.sync()
    finally:
        unmount(target, run_dir)

    mount_image(config, target, upper, run_dir=run_dir)
    try:
        assert (target / "new" / "deep" / "file.bin").read_bytes() == new_file
        assert (target / "d0" / "sub" / "f4.bin").read_bytes() == b"overwritten"
        assert not (target / "d1" / "sub" / "f5.bin").exists()
        assert (target / "big.bin").read_bytes() == (source / "big.bin").read_bytes()
    finally:
        unmount(target, run_dir)

    fsck_clean(config, upper, tmp_path / "check.raw")


def test_kill_9_after_fsync_keeps_the_data_and_cleanup_removes_everything(
    image: tuple[Path, Path], tmp_path: Path, run_dir: Path
) -> None:
    config, _source = image
    target, upper = tmp_path / "mnt", tmp_path / "upper"
    target.mkdir()
    durable = pattern(MiB + 3, 6)

    mount = mount_image(config, target, upper, run_dir=run_dir)
    try:
        with open(target / "durable.bin", "wb") as file:
            file.write(durable)
            os.fsync(file.fileno())
        directory = os.open(target, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        os.kill(mount.pid, signal.SIGKILL)
        os.waitpid(mount.pid, 0)  # the server is our child: reap it, it is gone for sure
    finally:
        # Start-up cleanup: the dead server's mount is stale and goes, pieces and all.
        stale = cleanup_stale(run_dir)
    assert [gone.id for gone in stale] == [mount.id]
    assert force_cleanup(run_dir, tmp_path) == []

    mount_image(config, target, upper, run_dir=run_dir)
    try:
        assert (target / "durable.bin").read_bytes() == durable
    finally:
        unmount(target, run_dir)

    fsck_clean(config, upper, tmp_path / "check.raw")


def test_commit_of_a_mount_is_a_layer_holding_the_files_as_they_were_at_commit(
    image: tuple[Path, Path], tmp_path: Path, run_dir: Path
) -> None:
    config, source = image
    target, upper, layer = tmp_path / "mnt", tmp_path / "upper", tmp_path / "layer2.tar"
    target.mkdir()
    added = pattern(MiB + 5, 7)

    mount_image(config, target, upper, run_dir=run_dir)
    try:
        (target / "added.bin").write_bytes(added)
        (target / "d2" / "sub" / "f1.bin").unlink()
        made = CliRunner().invoke(
            commit_command,
            [str(target), str(layer), "-z", "-t", "-m", "step 1", "--run-dir", str(run_dir)],
        )
        assert made.exit_code == 0, made.output
        # The mount goes on after the commit; later writes are not in the new layer.
        (target / "after.bin").write_bytes(b"later")
        os.sync()
    finally:
        unmount(target, run_dir)

    stacked = tmp_path / "stacked.json"
    lowers = [{"file": str(config.parent / "layer.tar")}, {"file": str(layer)}]
    stacked.write_text(json.dumps({"lowers": lowers}))
    expected = tree_files(source)
    expected["added.bin"] = added
    del expected["d2/sub/f1.bin"]
    mount_image(stacked, target, run_dir=run_dir)
    try:
        assert tree_files(target) == expected
    finally:
        unmount(target, run_dir)
    fsck_clean(stacked, None, tmp_path / "check.raw")


def test_a_file_overwritten_with_zeros_becomes_zeroed_mappings_not_data(
    image: tuple[Path, Path], tmp_path: Path, run_dir: Path
) -> None:
    # pyfuse3 cannot pass trims on (no fallocate); detected zero writes stand in for them.
    config, _source = image
    target, upper = tmp_path / "mnt", tmp_path / "upper"
    target.mkdir()

    mount_image(config, target, upper, run_dir=run_dir)
    try:
        with open(target / "big.bin", "r+b") as file:
            size = os.fstat(file.fileno()).st_size
            file.write(bytes(size))
            os.fsync(file.fileno())
        data_size = (upper / "data").stat().st_size
        assert (target / "big.bin").read_bytes() == bytes(size)
    finally:
        unmount(target, run_dir)

    assert data_size < size // 2  # the 3 MiB of zeros did not go into the layer's data
    with open_stack(config, upper) as stack:
        frame = stack.upper.index.to_frame()
    assert frame[frame.zeroed].length.sum() * 512 >= size * 0.9


def test_committing_a_read_only_mount_or_a_plain_folder_is_refused(
    image: tuple[Path, Path], tmp_path: Path, run_dir: Path
) -> None:
    config, _source = image
    target = tmp_path / "mnt"
    target.mkdir()

    with pytest.raises(MountError, match="is not a workbench mount"):
        commit_mount(target, tmp_path / "out", run_dir=run_dir)
    mount_image(config, target, run_dir=run_dir)
    try:
        with pytest.raises(MountError, match="read-only mount: there is no writable layer"):
            commit_mount(target, tmp_path / "out", run_dir=run_dir)
    finally:
        unmount(target, run_dir)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("registry", REGISTRIES)
def test_an_image_mounted_from_a_registry_is_read_lazily(
    registry: str,
    image: tuple[Path, Path],
    tmp_path: Path,
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, source = image
    target, cache = tmp_path / "mnt", tmp_path / "cache"
    target.mkdir()
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(cache))  # the FUSE server inherits it
    monkeypatch.setattr("workbench.device.mount.LAZY_READAHEAD_KB", 96)  # not a kernel default
    blob_size = (config.parent / "layer.tar").stat().st_size

    with start_registry(registry, tmp_path) as url:
        reference = f"{url.split('://', 1)[1]}/tests/tree:v1"
        push_image(config, reference)
        made = CliRunner().invoke(
            mount_command, [reference, str(target), "--run-dir", str(run_dir)]
        )
        assert made.exit_code == 0, made.output
        try:
            [mount] = list_mounts(run_dir)
            assert loop_readahead_kb(mount.loop) == 96  # set for a lazily read image
            one = "d3/sub/f3.bin"
            assert (target / one).read_bytes() == (source / one).read_bytes()
            fetched = sum(path.stat().st_blocks * 512 for path in cache.glob("*.data"))
            assert 0 < fetched < blob_size // 2  # headers, index, metadata, one file

            assert tree_files(target) == tree_files(source)
        finally:
            unmount(target, run_dir)
    assert not list((run_dir / "images").glob("*"))  # the resolved config went with the mount


def test_a_traced_ls_r_of_a_registry_mount_leads_from_kernel_requests_to_fetches(
    image: tuple[Path, Path],
    tmp_path: Path,
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, _source = image
    target, trace = tmp_path / "mnt", tmp_path / "trace.parquet"
    target.mkdir()
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "cache"))

    with start_registry("embedded", tmp_path) as url:
        reference = f"{url.split('://', 1)[1]}/tests/tree:v1"
        push_image(config, reference)
        mount_image(reference, target, run_dir=run_dir, trace=trace)
        try:
            listing = subprocess.run(["ls", "-R", str(target)], capture_output=True, text=True)
        finally:
            unmount(target, run_dir)
    assert listing.returncode == 0 and "f5.bin" in listing.stdout
    events = pd.read_parquet(trace)

    table = request_table(events)
    reads = table[table.kind == "fuse-read"]
    assert len(reads) > 0 and (reads.length > 0).all()
    assert reads.segments.sum() > 0 and reads.blocks.sum() > 0
    assert reads.cache_misses.sum() > 0 and reads.fetched.sum() > 0
    fetches = events[events.layer == "registry"]
    assert fetches.request_id.isin(reads.index).all()  # every fetch is some kernel read's
    slowest = render_report(events, slowest=1, kind="fuse-read")
    assert "request fuse-read disk [" in slowest and "registry" in slowest


def test_an_image_that_is_neither_a_file_nor_a_reference_is_refused(
    tmp_path: Path, run_dir: Path
) -> None:
    target = tmp_path / "mnt"
    target.mkdir()

    with pytest.raises(MountError, match=r"no such config\.v1\.json file"):
        mount_image(tmp_path / "missing.json", target, run_dir=run_dir)
    with pytest.raises(MountError, match=r"no such config\.v1\.json file"):
        mount_image("images/app", target, run_dir=run_dir)
    assert list_mounts(run_dir) == []


def test_umount_all_leaves_other_loop_devices_alone(
    image: tuple[Path, Path], tmp_path: Path, run_dir: Path
) -> None:
    config, _source = image
    target, foreign = tmp_path / "mnt", tmp_path / "foreign.img"
    target.mkdir()
    foreign.write_bytes(bytes(MiB))
    other = subprocess.run(
        ["losetup", "--find", "--show", str(foreign)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        mount_image(config, target, run_dir=run_dir)
        removed = unmount_all(run_dir)

        assert len(removed) == 1
        backing = Path(f"/sys/block/{os.path.basename(other)}/loop/backing_file")
        assert backing.read_text().strip() == str(foreign)
    finally:
        subprocess.run(["losetup", "-d", other], capture_output=True)


def test_unmounting_a_folder_that_is_not_a_workbench_mount_is_refused(
    tmp_path: Path, run_dir: Path
) -> None:
    with pytest.raises(MountError, match="is not a workbench mount"):
        unmount(tmp_path, run_dir)


def test_a_traced_mount_ties_every_layer_event_to_a_fuse_request(
    image: tuple[Path, Path], tmp_path: Path, run_dir: Path
) -> None:
    config, source = image
    target, trace = tmp_path / "mnt", tmp_path / "trace.parquet"
    target.mkdir()

    mount_image(config, target, run_dir=run_dir, trace=trace)
    try:
        assert tree_files(target) == tree_files(source)
    finally:
        unmount(target, run_dir)
    events = pd.read_parquet(trace)

    requests = events[events.layer == "request"]
    assert "fuse-read" in set(requests.op)
    assert requests.request_id.is_unique
    below = events[events.layer.isin(["device", "image", "lsmt", "zfile"])]
    assert {"lsmt", "zfile"} <= set(below.layer)
    assert below.request_id.isin(requests.request_id).all()


def test_umount_takes_a_mount_point_or_all_but_not_both(run_dir: Path) -> None:
    neither = CliRunner().invoke(umount_command, ["--run-dir", str(run_dir)])
    both = CliRunner().invoke(umount_command, ["/mnt", "--all", "--run-dir", str(run_dir)])

    assert neither.exit_code == both.exit_code == 2
    assert "give either MOUNTPOINT or --all" in neither.output


def test_cleanup_removes_a_half_made_mount_of_a_dead_process_only(tmp_path: Path) -> None:
    run = tmp_path / "run"
    making = subprocess.Popen(["sleep", "30"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        for name, owner in (("orphan", dead.pid), ("in-progress", making.pid)):
            fuse_dir = run / "fuse" / name
            fuse_dir.mkdir(parents=True)
            Mount(
                name,
                str(tmp_path / name),
                str(fuse_dir),
                "c.json",
                None,
                True,
                str(run),
                owner=owner,
            ).save()

        removed = cleanup_stale(run)

        assert [mount.id for mount in removed] == ["orphan"]
        assert [mount.id for mount in list_mounts(run)] == ["in-progress"]
        assert not (run / "fuse" / "orphan").exists()
    finally:
        making.kill()
        making.wait()
