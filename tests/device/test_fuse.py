"""The FUSE transport: the file system's calls on their own, then a real mount of ``disk``.

The real mounts need root and /dev/fuse; they skip without them, unless CI is set in the
environment, where a missing FUSE fails the run.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("pyfuse3") is None:
    if os.environ.get("CI"):
        raise RuntimeError("pyfuse3 is not installed; CI must run the FUSE tests")
    pytest.skip("pyfuse3 is not installed (needs libfuse3-dev)", allow_module_level=True)
import pyfuse3
import trio

from workbench.blobs.remote import RemoteBlobFile, TrioPortal
from workbench.device.fuse import FuseDisk
from workbench.device.handler import BlockHandler
from workbench.image.commit import import_raw
from workbench.image.layer import ReadOnlyLayer
from workbench.image.stack import LayerStack
from workbench.image.writable import WritableLayer
from workbench.tracing import recording

KiB, MiB = 1 << 10, 1 << 20
DISK = 4 * MiB


def fuse_missing() -> str | None:
    """Why real FUSE mounts cannot run here, or None."""
    if os.geteuid() != 0:
        return "FUSE mount tests need root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this kernel or container)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing; install Debian's fuse3"
    return None


def require_fuse() -> None:
    reason = fuse_missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        raise RuntimeError(f"{reason}; CI must run the FUSE tests")
    pytest.skip(reason)


def pattern(length: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, length, np.uint8).tobytes()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LayerStack]:
    upper = WritableLayer.create(tmp_path / "upper.data", tmp_path / "upper.index", DISK)
    with LayerStack([], upper) as stack:
        yield stack


# ---------------------------------------------------------------------------------------------
# The operations, called directly (no kernel)


@pytest.mark.parametrize("threads", [32, 0])
def test_unaligned_writes_read_back_through_the_operations(stack: LayerStack, threads: int) -> None:
    disk = FuseDisk(BlockHandler(stack), max_in_flight=threads)
    data = pattern(10_000, 1)

    async def run() -> bytes:
        assert await disk.write(0, 777, data) == len(data)
        await disk.fsync(0, False)
        return await disk.read(0, 700, 10_200)

    got = trio.run(run)

    assert got == bytes(77) + data + bytes(10_200 - 77 - len(data))


def test_reads_stop_at_the_end_of_the_disk_and_writes_past_it_fail(stack: LayerStack) -> None:
    disk = FuseDisk(BlockHandler(stack))

    async def run() -> bytes:
        with pytest.raises(pyfuse3.FUSEError) as failed:
            await disk.write(0, DISK - 10, b"x" * 20)
        assert failed.value.errno == errno.ENOSPC
        return await disk.read(0, DISK - 100, 4096)

    assert trio.run(run) == bytes(100)


def test_a_read_only_image_refuses_opening_for_write(stack: LayerStack) -> None:
    disk = FuseDisk(BlockHandler(stack, read_only=True))
    inode = pyfuse3.ROOT_INODE + 1

    async def run() -> None:
        assert (await disk.open(inode, os.O_RDONLY, None)).fh == inode
        with pytest.raises(pyfuse3.FUSEError) as failed:
            await disk.open(inode, os.O_RDWR, None)
        assert failed.value.errno == errno.EROFS
        with pytest.raises(pyfuse3.FUSEError) as failed:
            await disk.write(inode, 0, b"x")
        assert failed.value.errno == errno.EROFS

    trio.run(run)
    assert disk._attributes(inode).st_mode & 0o222 == 0


def test_every_request_gets_its_own_trace_id(stack: LayerStack) -> None:
    disk = FuseDisk(BlockHandler(stack))

    async def run() -> None:
        await disk.write(0, 0, pattern(8192, 2))
        async with trio.open_nursery() as nursery:
            for offset in range(0, 8192, 4096):
                nursery.start_soon(disk.read, 0, offset, 4096)

    with recording() as recorder:
        trio.run(run)
    events = recorder.to_dataframe()

    requests = events[events.layer == "request"]
    assert sorted(requests.op) == ["fuse-read", "fuse-read", "fuse-write"]
    assert requests.request_id.nunique() == 3
    below = events[events.layer != "request"]
    assert len(below) > 0
    assert set(below.request_id) <= set(requests.request_id)
    assert (below.request_id != 0).all()


def test_a_read_waiting_on_the_registry_does_not_hold_up_local_reads(tmp_path: Path) -> None:
    # Lower: a layer read through a RemoteBlobFile whose reads wait at a gate (a registry that
    # has not answered yet). Upper: a writable layer with local data at [0, 64 KiB).
    raw = tmp_path / "remote.raw"
    raw.write_bytes(bytes(MiB) + pattern(MiB, 3))
    import_raw(raw, tmp_path / "remote.lsmt")
    layer_bytes = (tmp_path / "remote.lsmt").read_bytes()
    gate, armed = threading.Event(), threading.Event()

    async def registry_read(offset: int, length: int) -> bytes:
        if armed.is_set():
            await trio.to_thread.run_sync(gate.wait)
        return layer_bytes[offset : offset + length]

    with TrioPortal() as portal:
        remote = RemoteBlobFile("remote", len(layer_bytes), registry_read, portal)
        lower = ReadOnlyLayer.open(remote)
        upper = WritableLayer.create(tmp_path / "u.data", tmp_path / "u.index", 2 * MiB)
        with LayerStack([lower], upper) as stack:
            disk = FuseDisk(BlockHandler(stack))
            local = pattern(64 * KiB, 4)
            armed.set()

            async def run() -> tuple[bytes, bytes]:
                with trio.fail_after(20):
                    await disk.write(0, 0, local)
                    remote_read: list[bytes] = []

                    async def read_remote() -> None:
                        remote_read.append(await disk.read(0, MiB, 8192))

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(read_remote)
                        await trio.sleep(0.2)  # the remote read is now waiting at the gate
                        local_read = await disk.read(0, 4096, 4096)
                        assert remote_read == []
                        gate.set()
                    return local_read, remote_read[0]

            local_read, remote_data = trio.run(run)

    assert local_read == local[4096:8192]
    assert remote_data == pattern(MiB, 3)[:8192]
    assert disk.served_in_threads == 1  # the registry read; write and local read had no hop
    assert disk.served_direct == 2


# ---------------------------------------------------------------------------------------------
# A real FUSE mount of the disk file


@pytest.fixture
def image_config(tmp_path: Path) -> Path:
    """A config of one lz4 tar layer holding 8 MiB of a pattern, with zeros in the middle."""
    raw = tmp_path / "disk.raw"
    content = bytearray(pattern(8 * MiB, 3))
    content[2 * MiB : 3 * MiB] = bytes(MiB)
    raw.write_bytes(content)
    import_raw(raw, tmp_path / "layer.tar", compress="lz4", tar=True)
    config = tmp_path / "config.v1.json"
    config.write_text(f'{{"lowers": [{{"file": "{tmp_path / "layer.tar"}"}}]}}')
    return config


def start_server(config: Path, fuse_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    fuse_dir.mkdir(exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "workbench.device.fuse", str(config), str(fuse_dir), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    assert line == b"ready\n", f"the server did not start: {line!r}"
    return server


def stop_server(server: subprocess.Popen[bytes], fuse_dir: Path) -> None:
    """Unmount and reap, whatever state the test left them in."""
    subprocess.run(["fusermount3", "-u", "-z", str(fuse_dir)], capture_output=True)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    if server.stdout is not None:
        server.stdout.close()
    mounted = subprocess.run(["findmnt", str(fuse_dir)], capture_output=True)
    assert mounted.returncode != 0, f"{fuse_dir} is still mounted"


def test_the_disk_file_reads_as_the_image(image_config: Path, tmp_path: Path) -> None:
    require_fuse()
    fuse_dir = tmp_path / "fuse"
    server = start_server(image_config, fuse_dir)
    try:
        disk = fuse_dir / "disk"
        expected = (tmp_path / "disk.raw").read_bytes()

        assert disk.stat().st_size == len(expected)
        assert disk.read_bytes() == expected
        with open(disk, "rb") as file:
            assert (
                os.pread(file.fileno(), 5000, 3 * MiB - 1234) == expected[3 * MiB - 1234 :][:5000]
            )
        with pytest.raises(OSError) as failed:
            os.close(os.open(disk, os.O_RDWR))
        assert failed.value.errno == errno.EROFS
    finally:
        stop_server(server, fuse_dir)
    assert server.returncode == 0


def test_writes_of_any_alignment_survive_a_restart(image_config: Path, tmp_path: Path) -> None:
    require_fuse()
    fuse_dir, upper = tmp_path / "fuse", tmp_path / "upper"
    expected = bytearray((tmp_path / "disk.raw").read_bytes())
    writes = [(1, pattern(100, 4)), (2 * MiB + 511, pattern(70_000, 5)), (8 * MiB - 3, b"end")]

    server = start_server(image_config, fuse_dir, "--writable", str(upper))
    try:
        fd = os.open(fuse_dir / "disk", os.O_RDWR)
        try:
            for offset, data in writes:
                assert os.pwrite(fd, data, offset) == len(data)
                expected[offset : offset + len(data)] = data
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        stop_server(server, fuse_dir)

    server = start_server(image_config, fuse_dir, "--writable", str(upper))
    try:
        assert (fuse_dir / "disk").read_bytes() == expected
    finally:
        stop_server(server, fuse_dir)
