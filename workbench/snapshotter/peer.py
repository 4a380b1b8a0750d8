"""Debian's containerd and the workbench snapshotter as private local peers, for tests and
benchmarks.

    snapshotter = SnapshotterProcess(work / "snap", "/tmp/x/snap.sock").start()
    with containerd(workdir, {"workbench": "/tmp/x/snap.sock"}) as daemon:
        daemon.ctr("default", "image", "ls")
    snapshotter.stop()

The daemon runs as a child process with a config under `workdir`: root, state, the opt
plugin's folder and the log there, the CRI plugin and the snapshotters that cannot load on
these machines (devmapper, aufs, btrfs, zfs) off, and each named proxy snapshotter declared
under ``[proxy_plugins]`` (containerd dials them lazily, so they may start later). The
socket goes in `workdir` when the path fits a unix socket address, else in a fresh folder
under /tmp. The context waits until ``ctr version`` answers; on exit the daemon gets SIGTERM
(SIGKILL after 10 s), every mount left under `workdir` is unmounted and the snapshot
folders under its root are removed.

`SnapshotterProcess` runs ``python -m workbench.snapshotter`` as a child (log in its root's
parent folder unless given) and waits until List answers on its socket; it can be stopped
with any signal (SIGKILL for a crash) and started again on the same root.

Caveats:
- containerd needs root (it mounts snapshots); `ContainerdError` says so when it is not;
- the shims of containers still running when the context ends outlive the daemon (they are
  separate processes by design): callers remove their containers first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "Containerd",
    "ContainerdError",
    "CtrError",
    "SnapshotterProcess",
    "containerd",
    "missing",
]

log = logging.getLogger(__name__)

START_TIMEOUT: Final = 15.0
STOP_TIMEOUT: Final = 10.0


class ContainerdError(RuntimeError):
    """Raised when containerd is missing or does not start."""


class CtrError(RuntimeError):
    """Raised when a ctr command fails; the message ends with its stderr."""

    def __init__(self, message: str, stderr: str) -> None:
        super().__init__(message)
        self.stderr = stderr


@dataclass(frozen=True)
class Containerd:
    """A running private containerd: its socket, pid, log and folder."""

    socket: str
    pid: int
    log: Path
    directory: Path

    def ctr(self, namespace: str, *args: str, timeout: float = 60) -> str:
        """``ctr -a SOCKET -n NAMESPACE ARGS...``; its stdout, `CtrError` if it fails."""
        return self.ctr_bytes(namespace, *args, timeout=timeout).decode()

    def ctr_bytes(self, namespace: str, *args: str, timeout: float = 60) -> bytes:
        command = ["ctr", "-a", self.socket, "-n", namespace, *args]
        done = subprocess.run(command, capture_output=True, timeout=timeout)
        if done.returncode != 0:
            stderr = done.stderr.decode(errors="replace").strip()[-2000:]
            raise CtrError(f"{' '.join(command)} exited {done.returncode}: {stderr}", stderr)
        return done.stdout


def missing() -> str | None:
    """Why containerd cannot run here (a missing binary, not root), or None."""
    absent = [name for name in ("containerd", "ctr", "runc") if shutil.which(name) is None]
    if absent:
        return f"{' and '.join(absent)} not installed (apt-get install containerd runc)"
    if os.geteuid() != 0:
        return "containerd needs root to mount its snapshots"
    return None


@contextlib.contextmanager
def containerd(
    workdir: Path, proxy_snapshotters: dict[str, str] | None = None, *, debug: bool = True
) -> Iterator[Containerd]:
    """A private containerd under `workdir` (see the module docstring)."""
    reason = missing()
    if reason is not None:
        raise ContainerdError(reason)
    workdir.mkdir(parents=True, exist_ok=True)
    socket_path = _socket_path(workdir)
    config = workdir / "config.toml"
    config.write_text(_config(workdir, socket_path, proxy_snapshotters or {}, debug))
    log_path = workdir / "containerd.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            ["containerd", "--config", str(config)], stdout=log_file, stderr=log_file
        )
    daemon = Containerd(str(socket_path), process.pid, log_path, workdir)
    try:
        _wait_until_up(daemon, process)
        yield daemon
    finally:
        _stop(process)
        _unmount_under(workdir)
        shutil.rmtree(workdir / "root", ignore_errors=True)  # snapshots: large, root-owned
        if not socket_path.is_relative_to(workdir):
            shutil.rmtree(socket_path.parent, ignore_errors=True)


def _config(workdir: Path, socket_path: Path, proxies: dict[str, str], debug: bool) -> str:
    text = (
        "version = 2\n"
        f'root = "{workdir / "root"}"\n'
        f'state = "{workdir / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.devmapper",'
        ' "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",'
        ' "io.containerd.snapshotter.v1.zfs"]\n'
        f'[grpc]\n  address = "{socket_path}"\n'
        f'[ttrpc]\n  address = "{socket_path}.ttrpc"\n'
        f'[debug]\n  level = "{"debug" if debug else "warn"}"\n'
        # the opt plugin would otherwise create /opt/containerd
        f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{workdir / "opt"}"\n'
    )
    for name, address in proxies.items():
        text += f'[proxy_plugins.{name}]\n  type = "snapshot"\n  address = "{address}"\n'
    return text


def _socket_path(workdir: Path) -> Path:
    """A socket path under the 108-byte sun_path limit: in workdir if it fits, else in /tmp."""
    path = workdir / "containerd.sock"
    if len(str(path)) + len(".ttrpc") < 100:
        return path
    short = Path(tempfile.mkdtemp(prefix="ctr-", dir="/tmp"))
    (workdir / "socket-dir").symlink_to(short)  # so the log points at it
    return short / "containerd.sock"


def _wait_until_up(daemon: Containerd, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if Path(daemon.socket).exists():
            probe = subprocess.run(
                ["ctr", "-a", daemon.socket, "version"], capture_output=True, timeout=10
            )
            if probe.returncode == 0:
                return
        time.sleep(0.05)
    tail = daemon.log.read_text(errors="replace")[-3000:]
    raise ContainerdError(f"containerd did not come up (exit {process.poll()}); log tail:\n{tail}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)


def _unmount_under(directory: Path) -> None:
    """Unmounts, deepest first, whatever is still mounted under directory."""
    inside = str(directory.resolve()) + "/"
    with open("/proc/self/mountinfo") as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    for point in sorted((p for p in points if p.startswith(inside)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


class SnapshotterProcess:
    """``python -m workbench.snapshotter`` on `socket_path` with state in `root`; restartable.

    `options` are more ``serve`` options (``--keep-devices``, ``--writable dir``, ...).
    """

    def __init__(
        self,
        root: Path,
        socket_path: str | os.PathLike[str],
        *options: str,
        log: Path | None = None,
    ) -> None:
        self.root = Path(root)
        self.socket = Path(socket_path)
        self.options = options
        self.log = log if log is not None else self.root.parent / f"{self.root.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> SnapshotterProcess:
        from workbench.snapshotter.client import ContainerdClient

        command = [sys.executable, "-m", "workbench.snapshotter", "--root", str(self.root)]
        command += ["--socket", str(self.socket), *self.options]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=log_file)

        import grpc

        deadline = time.monotonic() + timeout
        with ContainerdClient(self.socket, timeout=5) as client:
            request = client.api.snapshots.ListSnapshotsRequest()
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    for _reply in client.snapshots.List(request):
                        pass
                    return self
                except grpc.RpcError:
                    time.sleep(0.1)
        self.stop(signal.SIGKILL)
        tail = self.log.read_text(errors="replace")[-3000:]
        raise ContainerdError(f"the snapshotter did not start; its log:\n{tail}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Send `signum` and wait for the process to exit (devices and mounts stay)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)
            self.process.wait(timeout=timeout)
        self.process = None

    def snapshots(self) -> list[tuple[str, int]]:
        """(name, kind) of every snapshot it holds, asked over its socket."""
        from workbench.snapshotter.client import ContainerdClient

        with ContainerdClient(self.socket, timeout=30) as client:
            replies = client.snapshots.List(client.api.snapshots.ListSnapshotsRequest())
            return [(info.name, info.kind) for reply in replies for info in reply.info]
