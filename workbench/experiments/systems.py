"""The systems a start-up trial compares, the container start, and the throttled disk.

A trial starts one container of one workload on one system and times two phases:

- ``pull``: until a root file system is there to run. `tgz-overlayfs`: resolve the manifest,
  fetch every ``.tar.gz`` layer through the shaping proxy, gunzip + untar each into a layer
  folder (GNU tar, as Docker's overlay2 driver unpacks; OCI whiteouts become overlayfs ones).
  `lazy`: resolve the manifest into a config.v1.json of remote lowers (``resolve_s``), then
  `mount_image`: start the FUSE server, attach the loop device, mount the ext4 read-only
  (``mount_s``); no layer data is read yet.
- ``launch``: an overlay mount (the image's layers, or the lazy mount, below a fresh upper),
  then the workload started in it until it is ready (`ready_means`: it exits 0, prints a line,
  or a probe answers).

The container start is the workbench's own, without runc (`LAUNCHER`): ``unshare --mount
--uts --ipc --pid --fork --kill-child --mount-proc=ROOT/proc``, ``/dev`` bind-mounted, then
``chroot ROOT CMD`` (runtime-notes §6). Results name the launcher. A workload with
`private_net` (the datasets' HTTP workloads) also gets ``--net``, with ``lo`` brought up by the
host's ``ip`` before the chroot; its probe connects from inside that namespace.

The disk preset is applied with cgroup v1 blkio throttling (`DiskThrottle`): a cgroup of ours
with ``throttle.read/write_{iops,bps}_device`` on the disk holding the work folder; tar, the
FUSE server and the container's processes run in it.

Caveats:
- layers are fetched one after the other, each unpacked as soon as it is in memory; Docker
  fetches up to three at once (the proxy's shared link makes that matter little);
- cgroup v1 blkio throttles reads and direct writes; buffered writes are written back by the
  kernel outside the cgroup, so the unpack's writes reach the disk unthrottled (and unsynced:
  Docker does not sync either);
- reads the loop device makes for the lazy mount go to the FUSE file, not the disk; what is
  throttled there is the FUSE server's reads of the block cache file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from workbench.errors import ExperimentError, WorkbenchError
from workbench.experiments.definition import DiskPreset

__all__ = [
    "LAUNCHER",
    "DiskThrottle",
    "Phases",
    "TrialSetup",
    "Workload",
    "drop_caches",
    "launch",
    "overlay",
    "pull_lazy",
    "pull_tgz",
]

log = logging.getLogger(__name__)

LAUNCHER: Final = "unshare+chroot"
"""The container start every trial uses (containerd + runc are not used yet)."""

BLKIO_ROOT: Final = Path("/sys/fs/cgroup/blkio")

TGZ_BLOB_TIMEOUT_S: Final = 1800.0
"""How long one whole-layer GET of the .tgz pull may take (the registry client's default,
30 s an attempt, cuts off a 130 MB layer at the cross-region preset's 25 Mbit/s: 42 s);
Docker puts no limit on a layer download either."""


@dataclass(frozen=True)
class Workload:
    """What to run in the container and how to tell it is ready.

    `ready_means`: ``exit`` (it exits with status 0), ``line:TEXT`` (a line of its standard
    output contains TEXT), or ``probe`` (`probe()` returns true; polled every 10 ms). When
    `ready` is set it decides instead (`ready_means` is then a sentence for the results):
    ``ready(process, deadline)`` returns the evidence once the workload is ready, with the
    process's stdout and stderr merged into ``process.stdout``, and raises if it cannot be.
    `workdir` is where the command starts; `private_net` gives it a network namespace of its
    own with only ``lo`` up (``/proc/PID/ns/net`` of the launcher's process).
    """

    name: str
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=lambda: {"PATH": "/usr/bin:/bin"})
    ready_means: str = "exit"
    probe: Callable[[], bool] | None = None
    standin: bool = False
    workdir: str = "/"
    ready: Callable[[subprocess.Popen[bytes], float], str] | None = None
    private_net: bool = False


@dataclass
class Phases:
    """What one start measured: seconds per phase, and what it read where."""

    pull_s: float = 0.0
    launch_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ready_s(self) -> float:
        return self.pull_s + self.launch_s


@dataclass
class TrialSetup:
    """Where a trial works: its folders, the image references (through the proxy), the disk."""

    workdir: Path
    run_dir: Path
    oci_ref: str
    lazy_ref: str
    throttle: DiskThrottle | None = None
    trace: Path | None = None
    timeout_s: float = 120.0
    prefetch: Any = None
    """A `workbench.prefetch.PrefetchConfig` for the lazy mount, or None."""


# ---------------------------------------------------------------------------------------------
# Caches


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as control:
        control.write("3\n")


# ---------------------------------------------------------------------------------------------
# The throttled disk


class DiskThrottle:
    """A cgroup v1 blkio group that throttles one disk to a preset's IOPS and bytes/s."""

    def __init__(self, preset: DiskPreset, path: Path) -> None:
        if not BLKIO_ROOT.is_dir():
            raise ExperimentError(
                f"disk preset {preset.name} needs cgroup v1 blkio at {BLKIO_ROOT}; this machine "
                "has none (use disk preset local)"
            )
        self.preset = preset
        self.device = disk_of(path)
        self.group = BLKIO_ROOT / f"workbench-experiment-{os.getpid()}"

    def __enter__(self) -> DiskThrottle:
        self.group.mkdir(exist_ok=True)
        rules = {}
        if self.preset.iops:
            rules |= {"read_iops_device": self.preset.iops, "write_iops_device": self.preset.iops}
        if self.preset.bytes_per_s:
            rate = self.preset.bytes_per_s
            rules |= {"read_bps_device": rate, "write_bps_device": rate}
        for rule, value in rules.items():
            (self.group / f"blkio.throttle.{rule}").write_text(f"{self.device} {value}\n")
        log.info("throttling disk %s to %s in %s", self.device, self.preset.name, self.group)
        return self

    def __exit__(self, *exc: object) -> None:
        root_procs = BLKIO_ROOT / "cgroup.procs"
        for _ in range(50):
            pids = (self.group / "cgroup.procs").read_text().split()
            for pid in pids:
                with contextlib.suppress(OSError):
                    root_procs.write_text(pid)
            try:
                self.group.rmdir()
                return
            except OSError:
                time.sleep(0.05)
        log.warning("could not remove blkio group %s (processes still in it)", self.group)

    def add(self, pid: int) -> None:
        """Move process `pid` (and the threads it starts from now on) into the group."""
        (self.group / "cgroup.procs").write_text(str(pid))

    def enter(self) -> None:
        """For `preexec_fn`: move the calling (child) process into the group."""
        self.add(os.getpid())


def disk_of(path: Path) -> str:
    """``major:minor`` of the whole disk holding `path` (a partition's parent disk)."""
    stat = os.stat(path)
    number = f"{os.major(stat.st_dev)}:{os.minor(stat.st_dev)}"
    sysfs = Path("/sys/dev/block") / number
    if not sysfs.exists():
        raise ExperimentError(
            f"{path} is not on a block device ({number}); blkio cannot throttle it"
        )
    if (sysfs / "partition").exists():
        return (sysfs.resolve().parent / "dev").read_text().strip()
    return number


# ---------------------------------------------------------------------------------------------
# tgz + overlayfs


def pull_tgz(setup: TrialSetup, layers_dir: Path) -> dict[str, Any]:
    """Fetch and unpack every layer of `setup.oci_ref` into ``layers_dir/N``; bottom first."""
    from workbench.registry.client import RetryPolicy
    from workbench.registry.reference import ImageReference
    from workbench.registry.session import RegistrySession

    ref = ImageReference.parse(setup.oci_ref)
    layers_dir.mkdir(parents=True)
    fetched = 0
    retry = RetryPolicy(timeout_s=TGZ_BLOB_TIMEOUT_S, deadline_s=2 * TGZ_BLOB_TIMEOUT_S)
    with RegistrySession(use_cache=False, retry=retry) as session:
        manifest = session.run(session.client.resolve, ref)
        for number, layer in enumerate(manifest.layers):
            data = session.run(session.client.fetch_blob, ref, layer.digest)
            fetched += len(data)
            target = layers_dir / str(number)
            target.mkdir()
            _untar(data, target, setup.throttle)
            convert_whiteouts(target)
    return {"layers": len(manifest.layers), "layer_bytes": fetched}


def _untar(data: bytes, target: Path, throttle: DiskThrottle | None) -> None:
    command = ["tar", "-x", "-z", "-f", "-", "-C", str(target), "--numeric-owner"]
    done = subprocess.run(
        command,
        input=data,
        capture_output=True,
        preexec_fn=throttle.enter if throttle else None,
    )
    if done.returncode != 0:
        raise ExperimentError(f"unpacking a layer into {target} failed: {done.stderr.decode()}")


def convert_whiteouts(layer: Path) -> int:
    """OCI whiteouts in an unpacked layer to overlayfs ones; returns how many there were.

    ``.wh.NAME`` becomes a 0:0 character device NAME; ``.wh..wh..opq`` marks its folder
    opaque (``trusted.overlay.opaque=y``).
    """
    count = 0
    for folder, _dirs, files in os.walk(layer):
        for name in files:
            if not name.startswith(".wh."):
                continue
            marker = Path(folder) / name
            marker.unlink()
            count += 1
            if name == ".wh..wh..opq":
                os.setxattr(folder, "trusted.overlay.opaque", b"y")
            else:
                os.mknod(Path(folder) / name[len(".wh.") :], 0o600 | 0o020000, os.makedev(0, 0))
    return count


# ---------------------------------------------------------------------------------------------
# lazy


def pull_lazy(setup: TrialSetup, mountpoint: Path) -> tuple[Any, dict[str, float]]:
    """The lazy image read-only at `mountpoint`, its FUSE server throttled; and the seconds
    of the two steps: ``resolve_s`` (manifest -> config.v1.json of remote lowers, as
    ``rpull`` does) and ``mount_s`` (`mount_image`: FUSE server, loop device, ext4)."""
    from workbench.device.mount import mount_image
    from workbench.registry.image import write_image_config

    mountpoint.mkdir(parents=True)
    start = time.perf_counter()
    config = setup.workdir / "config.v1.json"
    write_image_config(setup.lazy_ref, config)
    resolved = time.perf_counter()
    mount = mount_image(
        config, mountpoint, run_dir=setup.run_dir, trace=setup.trace, prefetch=setup.prefetch
    )
    mounted = time.perf_counter()
    if setup.throttle is not None:
        setup.throttle.add(mount.pid)
    return mount, {"resolve_s": resolved - start, "mount_s": mounted - resolved}


# ---------------------------------------------------------------------------------------------
# The container: overlay and start


@contextlib.contextmanager
def overlay(lowers: list[Path], container: Path) -> Iterator[Path]:
    """An overlay of `lowers` (topmost first) under a fresh upper in `container`; unmounted
    and removed on exit."""
    upper, work, merged = container / "upper", container / "work", container / "merged"
    for folder in (upper, work, merged):
        folder.mkdir(parents=True)
    lowerdir = ":".join(str(path) for path in lowers)
    options = f"lowerdir={lowerdir},upperdir={upper},workdir={work}"
    done = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(merged)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        shutil.rmtree(container, ignore_errors=True)
        raise ExperimentError(f"overlay mount at {merged} failed: {done.stderr.strip()}")
    try:
        yield merged
    finally:
        _umount(merged)
        shutil.rmtree(container, ignore_errors=True)


def _umount(target: Path) -> None:
    done = subprocess.run(["umount", str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        log.warning("umount %s failed (%s); detaching lazily", target, done.stderr.strip())
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def launch(root: Path, workload: Workload, setup: TrialSetup) -> float:
    """Start `workload` in `root` and wait until it is ready; returns the seconds it took."""
    (root / "proc").mkdir(exist_ok=True)
    (root / "dev").mkdir(exist_ok=True)
    # The host's shell and tools set up the namespace; `env -i` then gives the workload only
    # its own environment, and chroot (by absolute path: the workload's PATH is not ours)
    # enters the root.
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    variables = [f"{name}={value}" for name, value in workload.env.items()]
    inner = 'mount --rbind /dev "$0/dev" && exec "$@"'
    if workload.private_net:
        inner = f"ip link set lo up && {inner}"
    program = list(workload.command)
    if workload.workdir not in ("", "/"):
        program = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', workload.workdir, *program]
    namespaces = ["--mount", "--uts", "--ipc", "--pid"]
    if workload.private_net:
        namespaces.append("--net")
    command = [
        "unshare",
        *namespaces,
        "--fork",
        "--kill-child",
        f"--mount-proc={root}/proc",
        "/bin/sh",
        "-c",
        inner,
        str(root),
        "env",
        "-i",
        *variables,
        chroot,
        str(root),
        *program,
    ]
    throttle = setup.throttle
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if workload.ready is not None else subprocess.PIPE,
        preexec_fn=throttle.enter if throttle else None,
        start_new_session=True,
    )
    try:
        _wait_ready(process, workload, setup.timeout_s)
        return time.perf_counter() - start
    finally:
        _stop(process)


def _wait_ready(process: subprocess.Popen[bytes], workload: Workload, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    means = workload.ready_means
    if workload.ready is not None:
        try:
            evidence = workload.ready(process, deadline)
        except WorkbenchError as exc:
            raise _not_ready(workload, str(exc)) from None
        log.debug("workload %s ready: %s", workload.name, evidence)
        return
    if means == "exit":
        try:
            _out, err = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise _not_ready(workload, f"did not exit within {timeout_s:g} s") from None
        if process.returncode != 0:
            tail = err.decode(errors="replace").strip()[-400:]
            raise _not_ready(workload, f"exited with status {process.returncode}: {tail}")
        return
    if means.startswith("line:"):
        _wait_line(process, workload, means[len("line:") :].encode(), deadline)
        return
    if means == "probe" and workload.probe is not None:
        while not workload.probe():
            if process.poll() is not None or time.monotonic() > deadline:
                raise _not_ready(workload, f"the probe never answered (exit {process.poll()})")
            time.sleep(0.01)
        return
    raise ExperimentError(f"workload {workload.name}: unknown ready_means {means!r}")


def _wait_line(
    process: subprocess.Popen[bytes], workload: Workload, text: bytes, deadline: float
) -> None:
    assert process.stdout is not None
    seen = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            seen = (seen + chunk)[-65536:]
            if text in seen:
                return
    raise _not_ready(workload, f"never printed {text.decode()!r} (exit {process.poll()})")


def _not_ready(workload: Workload, why: str) -> ExperimentError:
    return ExperimentError(f"workload {workload.name} did not get ready: {why}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
