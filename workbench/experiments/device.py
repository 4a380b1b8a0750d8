"""Device trials (Figs 22-24): fio random reads and tree walks on the image, two ways.

One trial runs one test on one side:

- ``plain-loop``: the image's ext4 as a raw file on a plain read-only loop device, mounted
  ``ro,noload`` (the baseline, as `workbench bench device` has it);
- ``lazy``: the OverlayBD image mounted from the registry with an empty block cache, so
  every block comes over the network (through the shaping proxy);
- ``lazy-warm``: the same with the block cache already holding the whole image (the warm-up
  reads the loop device end to end), page cache dropped: the paper's "uncached" reads of a
  local image.

Tests: ``randread-BS`` at a queue depth (fio, direct I/O on the loop device, libaio, each
block at most once, `runtime_s` at most: `workbench.bench.device.run_fio`), ``du`` (``du -s``
of the mounted tree) and ``tar`` (``tar cf - . | cat``: file data read). Page caches are
dropped before each test by the runner.

Caveats:
- disk presets are not applied to device trials (fio runs outside the blkio group; only
  ``local`` is meaningful here);
- the lazy side is ZFile lz4 only (the paper compares uncompressed DADI and ZFile).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Any

from workbench.bench.device import run_fio
from workbench.errors import ExperimentError
from workbench.experiments.definition import DeviceSettings
from workbench.experiments.systems import Phases, TrialSetup, drop_caches, pull_lazy

__all__ = ["run_device_test"]

WALKS = {
    "du": ["du", "-s", "."],
    "tar": ["bash", "-c", "set -o pipefail; tar cf - . | cat >/dev/null"],
}


def run_device_test(trial: Any, image: Any, setup: TrialSetup, settings: DeviceSettings) -> Phases:
    """Mount one side, run `trial.test` on it, tear it down; the figures in `Phases.extra`."""
    with contextlib.ExitStack() as stack:
        loop, mountpoint = _side(trial.system, image, setup, stack)
        if trial.system == "lazy-warm" and not (setup.workdir / "warmed").exists():
            _read_all(loop)
            (setup.workdir / "warmed").touch()
        drop_caches()
        if trial.test.startswith("randread-"):
            job = run_fio(
                loop,
                rw="randread",
                bs=settings.block_size,
                iodepth=trial.queue_depth,
                runtime_s=settings.runtime_s,
            )
            read = job["read"]
            extra = {"iops": read["iops"], "mb_s": read["bw_bytes"] / 1e6}
            extra["seconds"] = read["runtime"] / 1000
            return Phases(extra=extra)
        return Phases(extra={"seconds": _walk(trial.test, mountpoint)})


def _side(
    system: str, image: Any, setup: TrialSetup, stack: contextlib.ExitStack
) -> tuple[str, Path]:
    mountpoint = setup.workdir / "image"
    if system == "plain-loop":
        if image.raw_ext4 is None:
            raise ExperimentError(
                f"workload {image.workload.name} has no raw ext4 file for the plain loop side"
            )
        mountpoint.mkdir(parents=True, exist_ok=True)
        stack.callback(mountpoint.rmdir)
        loop = _run(["losetup", "--find", "--show", "--read-only", image.raw_ext4]).strip()
        stack.callback(_run, ["losetup", "-d", loop])
        _run(["mount", "-t", "ext4", "-o", "ro,noload", loop, str(mountpoint)])
        stack.callback(_run, ["umount", str(mountpoint)])
        return loop, mountpoint

    from workbench.device.mount import unmount

    mount, _steps = pull_lazy(setup, mountpoint)
    stack.callback(mountpoint.rmdir)
    stack.callback(unmount, mount.mountpoint, setup.run_dir)
    return mount.loop, mountpoint


def _read_all(device: str) -> None:
    with open(device, "rb", buffering=0) as disk:
        while disk.read(1 << 20):
            pass


def _walk(test: str, mountpoint: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(WALKS[test], cwd=mountpoint, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise ExperimentError(f"{test} failed in {mountpoint}: {done.stderr.strip()}")
    return seconds


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ExperimentError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout
