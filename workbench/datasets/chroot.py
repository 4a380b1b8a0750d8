"""Start a dataset workload without a container runtime: unshare + chroot over its layers.

    rootfs = unpack("busybox", tmp / "bundle")              # umoci unpack of the OCI layout
    with start(workload("busybox"), rootfs, tmp / "run") as running:
        result = running.wait_ready()                        # the workload's own probe
        print(result.ready_at - running.started_at)          # seconds from start to ready

`unpack` extracts the image with umoci (a real peer reading the layout the engine wrote,
whiteouts and all) into ``DEST/rootfs``. `start` runs the workload's command, env and workdir
in ``unshare --mount --pid --fork --kill-child [--net]``: an overlay of a fresh upper
directory over the unpacked root (so every start sees the image as built), /proc, /dev
(bound from the host), a tmpfs on /tmp, then chroot. Everything lives in those namespaces and
dies with them: stopping kills the namespace's first process, the kernel kills the rest, and
the mounts go with the mount namespace. `Running.wait_ready` passes the probe what its kind
needs: the merged stdout and stderr (log, output), the process (exit), or the workload's
port, connected from inside its network namespace when ``net="private"`` (http).

This is a control for experiments (no runtime, no cgroups), and what the tests use to show
that a built image's workload reaches ready.

Caveats:
- needs root, umoci, unshare and overlayfs;
- with ``net="host"`` (the default) the workload binds the host's ports: two starts of an
  image that listens on a fixed port collide; ``net="private"`` gives it a network
  namespace of its own with only ``lo``, reachable only through the probe;
- no cgroups, no seccomp, no user namespace: it is a chroot, not a container.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from workbench.datasets.probes import ReadyResult, drain
from workbench.datasets.recipe import Workload
from workbench.errors import BuildError, ProbeError

__all__ = ["Running", "start", "unpack"]

log = logging.getLogger(__name__)


def unpack(layout: Path, dest: Path, tag: str | None = None) -> Path:
    """Extract OCI layout `layout` (tag = its recipe name by default) with umoci; -> rootfs."""
    if shutil.which("umoci") is None:
        raise FileNotFoundError("umoci is not installed; apt-get install umoci")
    tag = tag or _only_tag(layout)
    if dest.exists():
        shutil.rmtree(dest)
    argv = ["umoci", "unpack", "--image", f"{layout}:{tag}", str(dest)]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        raise BuildError(f"umoci unpack of {layout}:{tag} failed: {result.stderr.strip()}")
    return dest / "rootfs"


def _only_tag(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    return index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]


class Running:
    """A started workload: `process` (the unshare), `started_at`, `wait_ready`, `stop`."""

    def __init__(
        self, workload: Workload, process: subprocess.Popen[bytes], started_at: float, net: str
    ) -> None:
        self.workload = workload
        self.process = process
        self.started_at = started_at
        self.net = net

    @property
    def netns(self) -> str | None:
        """The workload's network namespace file (``net="private"``), else None."""
        return f"/proc/{self.process.pid}/ns/net" if self.net == "private" else None

    def wait_ready(self, timeout: float | None = None) -> ReadyResult:
        """Wait with the workload's probe; raises `ProbeTimeoutError` or `ProbeError`."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.workload.timeout)
        probe = self.workload.probe
        if probe.kind == "exit":
            return probe.wait(self.process, deadline)
        if probe.kind != "http":
            result = probe.wait(self.process.stdout, deadline, process=self.process)
            drain(self.process.stdout)
            return result

        # The probe does not read the output: keep its tail for the error message.
        tail = OutputTail()
        drain(self.process.stdout, tail)
        try:
            return probe.wait(None, deadline, netns=self.netns, process=self.process)
        except ProbeError as exc:
            raise type(exc)(f"{exc}; the workload's last output: {tail.text()}") from None

    def stop(self) -> int:
        """Kill the workload (its whole PID namespace) and wait; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        code = self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code

    def __enter__(self) -> Running:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class OutputTail:
    """A write-only sink that keeps the last few KiB written to it."""

    def __init__(self, limit: int = 2048) -> None:
        self._data = bytearray()
        self._limit = limit

    def write(self, chunk: bytes) -> int:
        self._data += chunk
        del self._data[: max(0, len(self._data) - self._limit)]
        return len(chunk)

    def text(self) -> str:
        lines = bytes(self._data).decode("utf-8", "replace").strip().splitlines()
        return " | ".join(lines[-8:]) or "(none)"


def start(workload: Workload, rootfs: Path, run_dir: Path, *, net: str = "host") -> Running:
    """Start `workload` over the unpacked `rootfs` (an overlay upper in `run_dir`)."""
    if net not in ("host", "private"):
        raise ValueError(f"net={net!r}: use 'host' or 'private'")
    if not (rootfs / "bin").exists() and not (rootfs / "usr").exists():
        raise FileNotFoundError(f"{rootfs} does not look like a root file system (no bin, usr)")
    shutil.rmtree(run_dir, ignore_errors=True)
    upper, work, merged = run_dir / "upper", run_dir / "work", run_dir / "merged"
    for directory in (upper, work, merged):
        directory.mkdir(parents=True)

    options = f"lowerdir={rootfs},upperdir={upper},workdir={work}"
    env = " ".join(shlex.quote(f"{k}={v}") for k, v in workload.env.items())
    command = shlex.join(workload.command)
    script = "\n".join(
        [
            "set -eu",
            f"R={shlex.quote(str(merged))}",
            f'mount -t overlay overlay -o {shlex.quote(options)} "$R"',
            'mkdir -p "$R/proc" "$R/dev" "$R/tmp"',
            'mount -t proc proc "$R/proc"',
            'mount --rbind /dev "$R/dev"',
            'mount -t tmpfs tmpfs "$R/tmp"',
            "ip link set lo up" if net == "private" else ":",
            f'exec env -i {env} chroot "$R" /bin/sh -c '
            f"{shlex.quote(f'cd {shlex.quote(workload.workdir)} && exec {command}')}",
        ]
    )
    argv = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private"]
    if net == "private":
        argv.append("--net")
    started_at = time.monotonic()
    process = subprocess.Popen(
        [*argv, "/bin/sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
    )
    log.debug("started %s as pid %d over %s", workload.name, process.pid, rootfs)
    return Running(workload, process, started_at, net)
