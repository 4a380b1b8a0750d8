"""Real containers through the workbench snapshotter: containerd 1.6, runc, the embedded registry.

One containerd (tests/registries.py `containerd_daemon`, with the snapshotter declared under
``[proxy_plugins]`` as ``workbench``) and one snapshotter process (``python -m
workbench.snapshotter``) serve the module; each test works in its own containerd namespace
and removes what it made, after which the snapshotter must hold no snapshot of that
namespace and no device. At the end of the module everything is stopped and nothing may be
left: no mount, no loop device, no process, no snapshot folder.

The same tree runs as an OverlayBD image (pulled with `rpull`: its layer stays in the
registry and is read lazily) and as an ordinary OCI image (pulled with ``ctr image pull``),
on this snapshotter and on containerd's own overlayfs; a container reads files, runs
busybox and writes, and every variant must print the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from registries import ContainerdDaemon, containerd_daemon
from snapshot_images import mount_reason, push_oci, push_overlaybd, require

from workbench.cli import cli
from workbench.formats.detect import open_blob
from workbench.snapshotter.client import ContainerdClient
from workbench.snapshotter.peer import SnapshotterProcess
from workbench.snapshotter.rpull import rpull

pytestmark = pytest.mark.slow

NAME = "workbench"
WRITABLE = "containerd.io/snapshot/overlaybd.writable"
SCRIPT = (
    "cat /etc/hello.txt; md5sum /data/random.bin /data/deep/small.txt; wc -c /data/random.bin;"
    " ls /data; cat /tmp/w 2>/dev/null || echo no-previous-write; echo written > /tmp/w;"
    " cat /tmp/w"
)


@dataclasses.dataclass
class Stack:
    containerd: ContainerdDaemon
    snapshotter: SnapshotterProcess
    registry: tuple[str, Path]

    def ctr(self, namespace: str, *args: str, timeout: float = 120) -> str:
        return dataclasses.replace(self.containerd, namespace=namespace).ctr(*args, timeout=timeout)

    def run_fails(self, namespace: str, ref: str) -> str:
        """``ctr run`` of `ref` on the workbench snapshotter, which must fail; its stderr."""
        command = ["ctr", "-a", self.containerd.socket, "-n", namespace, "run", "--rm"]
        command += ["--snapshotter", NAME, ref, "failing", "/bin/true"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0, f"{' '.join(command)} succeeded: {done.stdout}"
        return done.stderr

    def run(self, namespace: str, ref: str, snapshotter: str, *extra: str) -> str:
        container = f"c{time.monotonic_ns()}"
        return self.ctr(
            namespace, "run", "--rm", "--snapshotter", snapshotter, *extra, ref, container,
            "/bin/sh", "-c", SCRIPT,
        )  # fmt: skip

    def rpull(self, namespace: str, ref: str):
        with ContainerdClient(self.containerd.socket, namespace) as client:
            return rpull(ref, client, NAME)

    def reaches_snapshotter(self, namespace: str) -> bool:
        command = ["ctr", "-a", self.containerd.socket, "-n", namespace, "snapshots"]
        command += ["--snapshotter", NAME, "ls"]
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0

    def devices(self) -> list[str]:
        return [m for m in our_mounts(self.snapshotter.root) if m.endswith("/mountpoint")]


def our_mounts(*roots: Path) -> list[str]:
    with open("/proc/self/mounts") as mounts:
        targets = [line.split()[1] for line in mounts]
    return [t for t in targets if any(t.startswith(str(root)) for root in roots)]


def leftovers(*roots: Path) -> list[str]:
    """Mounts, loop devices and processes that mention any of `roots`."""
    left = [f"mount {target}" for target in our_mounts(*roots)]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    left += [f"loop {line}" for line in loops.splitlines() if any(str(r) in line for r in roots)]
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            command = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state != b"Z" and any(str(root).encode() in command for root in roots):
            shown = command.replace(b"\0", b" ").decode(errors="replace")[:200]
            left.append(f"process {proc.name}: {shown}")
    return left


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, registry: tuple[str, Path]) -> Iterator[Stack]:
    require(mount_reason())
    base = tmp_path_factory.mktemp("containerd-stack")
    socket_dir = Path(tempfile.mkdtemp(prefix="wbsn-", dir="/tmp"))
    socket_path = socket_dir / "snapshotter.sock"
    snapshotter = SnapshotterProcess(base / "snapshotter", socket_path).start()
    try:
        with containerd_daemon(base, {NAME: str(socket_path)}) as containerd:
            yield Stack(containerd, snapshotter, registry)
    finally:
        snapshotter.stop()
        left = leftovers(snapshotter.root, base, socket_dir)
        remains = list((snapshotter.root / "snapshots").iterdir())
        subprocess.run(["umount", "-R", "-l", str(snapshotter.root)], capture_output=True)
        socket_dir.rmdir()
    assert left == [], f"left behind: {left}"
    assert remains == [], f"snapshot folders left: {remains}"


@pytest.fixture
def namespace(stack: Stack, request: pytest.FixtureRequest) -> Iterator[str]:
    """A containerd namespace for one test; its images and containers go afterwards."""
    name = "-".join(request.node.name.removeprefix("test_").split("_")[:4])
    yield name
    tasks = stack.ctr(name, "task", "ls", "-q").split()
    for container in stack.ctr(name, "containers", "ls", "-q").split():
        if container in tasks:
            stack.ctr(name, "task", "rm", "--force", container)
        stack.ctr(name, "containers", "rm", container)
    images = stack.ctr(name, "image", "ls", "-q").split()
    if images:
        stack.ctr(name, "image", "rm", "--sync", *images)
    wait_for(lambda: not [s for s, _ in stack.snapshotter.snapshots() if s.startswith(name + "/")])
    wait_for(lambda: stack.devices() == [])  # torn down after Remove answered


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        time.sleep(0.1)


def layer_digest(config: Path) -> str:
    """The digest of the one layer blob of the image `config` describes."""
    return "sha256:" + hashlib.sha256((config.parent / "layer.tar").read_bytes()).hexdigest()


def expected_output(tree: Path, previous: bool = False) -> str:
    lines = [(tree / "etc" / "hello.txt").read_text().rstrip("\n")]
    for name in ("data/random.bin", "data/deep/small.txt"):
        lines.append(f"{hashlib.md5((tree / name).read_bytes()).hexdigest()}  /{name}")
    lines.append(f"{(tree / 'data' / 'random.bin').stat().st_size} /data/random.bin")
    lines += ["deep", "random.bin"]
    lines += ["written" if previous else "no-previous-write", "written"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def test_an_overlaybd_image_runs_lazily_and_like_the_oci_image_on_both_snapshotters(
    stack: Stack,
    namespace: str,
    overlaybd_layer: Path,
    oci_layer: tuple[bytes, bytes],
    image_tree: Path,
) -> None:
    obd = push_overlaybd(stack.registry, overlaybd_layer, "obd/busybox:v1")
    oci = push_oci(stack.registry, oci_layer, "oci/busybox:v1")

    pulled = stack.rpull(namespace, obd)
    assert (pulled.remote_layers, pulled.unpacked_layers) == (1, 0)
    digest = layer_digest(overlaybd_layer)
    assert digest not in stack.ctr(namespace, "content", "ls", "-q").split()
    assert stack.devices() == []  # nothing attached until a container needs it
    # The manifest references its config, the config the top snapshot: kept after the lease.
    labels = {
        line.split()[0]: line.split()[-1]
        for line in stack.ctr(namespace, "content", "ls").splitlines()[1:]
    }
    assert "containerd.io/gc.ref.content.config=" in labels[pulled.manifest_digest]
    assert f"containerd.io/gc.ref.snapshot.{NAME}={pulled.chain_id}" in "".join(labels.values())

    stack.ctr(namespace, "image", "pull", "--plain-http", "--snapshotter", NAME, oci)
    stack.ctr(namespace, "image", "pull", "--plain-http", "--snapshotter", "overlayfs", oci)

    expected = expected_output(image_tree)
    assert stack.run(namespace, obd, NAME) == expected
    assert stack.run(namespace, oci, NAME) == expected
    assert stack.run(namespace, oci, "overlayfs") == expected
    # Each container has its own upper: the second run of the image sees no earlier write.
    assert stack.run(namespace, obd, NAME) == expected
    assert digest not in stack.ctr(namespace, "content", "ls", "-q").split()


def test_rw_mode_dir_runs_the_container_on_its_writable_device(
    stack: Stack, namespace: str, overlaybd_layer: Path, image_tree: Path
) -> None:
    obd = push_overlaybd(stack.registry, overlaybd_layer, "obd/busybox:dir")
    arguments = ["rpull", obd, "-a", stack.containerd.socket, "-n", namespace]
    pulled = CliRunner().invoke(cli, [*arguments, "--snapshotter", NAME])
    assert pulled.exit_code == 0, pulled.output
    assert pulled.output.endswith(": 1 remote, 0 unpacked, 0 present layers\n"), pulled.output

    label = ["--snapshotter-label", f"{WRITABLE}=dir"]
    assert stack.run(namespace, obd, NAME, *label) == expected_output(image_tree)
    root_line = stack.ctr(
        namespace, "run", "--rm", "--snapshotter", NAME, *label, obd, "mounts",
        "/bin/head", "-1", "/proc/mounts",
    )  # fmt: skip
    assert root_line.split()[1:3] == ["/", "ext4"], root_line


def test_a_snapshotter_restart_keeps_running_containers_and_serves_new_ones(
    stack: Stack, namespace: str, overlaybd_layer: Path, image_tree: Path
) -> None:
    obd = push_overlaybd(stack.registry, overlaybd_layer, "obd/busybox:restart")
    stack.rpull(namespace, obd)
    stack.ctr(namespace, "run", "-d", "--snapshotter", NAME, obd, "long", "/bin/sleep", "600")
    wait_for(lambda: "RUNNING" in stack.ctr(namespace, "task", "ls"))
    [device] = stack.devices()

    stack.snapshotter.stop(signal.SIGKILL)
    stack.snapshotter.start()
    # containerd redials a proxy plugin with a backoff of at most 3 s.
    wait_for(lambda: stack.reaches_snapshotter(namespace))

    exec_output = stack.ctr(
        namespace, "task", "exec", "--exec-id", "e1", "long", "/bin/cat", "/etc/hello.txt"
    )
    assert exec_output == "hello from the image\n"
    assert stack.run(namespace, obd, NAME) == expected_output(image_tree)
    assert stack.devices() == [device]  # found again, not attached twice


def test_a_failed_lazy_read_names_the_blob_and_the_registry_in_ctrs_error(
    stack: Stack, namespace: str, overlaybd_layer: Path
) -> None:
    obd = push_overlaybd(stack.registry, overlaybd_layer, "broken/busybox:v1")
    stack.rpull(namespace, obd)
    digest = layer_digest(overlaybd_layer)
    # The registry forgets the layer for this repository only: reads of it answer 404.
    link = stack.registry[1] / "repositories" / "broken" / "busybox" / "_layers"
    (link / digest.removeprefix("sha256:")).unlink()

    error = stack.run_fails(namespace, obd)
    assert digest in error and "404" in error and stack.registry[0] in error, error
    assert not error.rstrip().endswith(": unknown"), error
    assert stack.devices() == []


def test_ctr_image_pull_of_an_overlaybd_image_unpacks_a_local_block_layer(
    stack: Stack, namespace: str, overlaybd_layer: Path, image_tree: Path
) -> None:
    obd = push_overlaybd(stack.registry, overlaybd_layer, "obd/busybox:local")
    stack.ctr(namespace, "image", "pull", "--plain-http", "--snapshotter", NAME, obd)
    assert stack.run(namespace, obd, NAME) == expected_output(image_tree)


def test_a_corrupt_block_names_the_checksum_failure_in_ctrs_error(
    stack: Stack, namespace: str, overlaybd_layer: Path
) -> None:
    obd = push_overlaybd(stack.registry, overlaybd_layer, "corrupt/busybox:v1")
    stack.rpull(namespace, obd)
    digest = layer_digest(overlaybd_layer)
    blob = stack.registry[1] / "blobs" / "sha256" / digest.removeprefix("sha256:")
    intact = blob.read_bytes()
    # One byte inside the first compressed ZFile block (the LSMT header is in it).
    with open_blob(overlaybd_layer.parent / "layer.tar") as unwrapped:
        assert unwrapped.layers == ("tar", "zfile") and unwrapped.tar and unwrapped.zfile
        at = unwrapped.tar.offset + int(unwrapped.zfile.block_offsets()[0]) + 10
    blob.write_bytes(intact[:at] + bytes([intact[at] ^ 0xFF]) + intact[at + 1 :])
    try:
        error = stack.run_fails(namespace, obd)
    finally:
        blob.write_bytes(intact)
    assert "ChecksumError" in error and digest in error, error
    assert stack.devices() == []
