"""`workbench bench device`: the mounted image against the same ext4 on a plain loop device.

One ext4 image is built from a directory tree of this machine (`make_ext4_image`) and mounted
twice in the same run:

- baseline: the raw ext4 file on a plain loop device (``losetup --read-only``), mounted
  ``-o ro,noload``;
- workbench: the same image imported as one LSMT layer (ZFile lz4 by default, or zstd, or
  uncompressed) and mounted through `mount_image` (FUSE disk file -> loop -> ext4).

Figures, each a ratio against the baseline measured in the same run (the median of
`repeats` runs of each side, the two sides taking turns), with page caches dropped before
every run so that both start from the same state:

- sequential read: fio, one pass over the loop device in 1 MiB direct reads
  (target >= 0.5 of the plain loop's MB/s);
- random read: fio, 4 KiB direct reads at queue depth 1 and 32, in random order, each block
  at most once (fio's random map), for at most `runtime_s` (target >= 0.25 of the plain
  loop's IOPS). Each block once keeps the comparison cold on both sides: a time-based job
  would let the faster side go round the device again and read its second pass from the
  page cache;
- tree walks: ``du -s`` and ``tar cf - . | cat >/dev/null`` over the mounted trees (the pipe
  makes GNU tar read file data; target: at most 4x the plain loop's time);
- handler own time: in this process, `BlockHandler.read_bytes` on the same stack at random
  offsets that hold data, already read once (the layer file is local and in the page cache),
  against ``os.pread`` of the same offsets of the raw file; median and p99 per request for
  4 KiB (target: median <= 10 us) and 128 KiB requests.

"Cached data" means what fuse-ceiling.md means: the layer file is local, so every read is a
cache hit of the workbench; the data is read once through the mount, then caches are dropped
and the figures measured. fio runs on the loop block devices themselves (``--readonly``).

Caveats:
- page caches are dropped, but the backing files stay on this machine's disk: the plain loop
  reads the raw image from it, the workbench the (smaller, compressed) layer file, so the disk
  and its cache in the hypervisor take part in both;
- fio's random offsets cover the whole device, holes included: ext4 leaves part of the image
  empty, and both sides read holes cheaply (a sparse raw file, an unmapped LSMT range);
- the FUSE server runs with its defaults (reads of a local layer are served in the trio
  task, without a thread hop); `mount_image` has no way to pass ``--threads``, so the
  server's other modes are not compared here;
- the handler's own time is measured in this process, not in the FUSE server: the server
  runs the same code, but with the GIL shared with trio and its worker threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from workbench.bench.formats import Table, make_ext4_image
from workbench.device.handler import BlockHandler
from workbench.device.mount import mount_image, unmount_all
from workbench.errors import WorkbenchError
from workbench.image.commit import import_raw
from workbench.image.open import open_image

__all__ = ["DeviceBenchmark", "MissingToolError", "bench_device"]

log = logging.getLogger(__name__)

MB = 1_000_000

TOOLS = {
    "fio": "fio",
    "losetup": "util-linux",
    "mount": "mount",
    "mkfs.ext4": "e2fsprogs",
    "fusermount3": "fuse3",
    "du": "coreutils",
    "tar": "tar",
    "bash": "bash",
}
"""Programs the benchmark runs, and the Debian package that has each."""

FULL_SOURCES = ("/usr/lib/python3", "/usr/lib/python3.11", "/usr/include", "/usr/share")
QUICK_SOURCES = ("/usr/lib/python3.11",)

HANDLER_SIZES = (4 << 10, 128 << 10)
"""Request sizes of the handler's own time: a random read and a readahead-sized one."""

HANDLER_TARGET_US = 10.0
"""The Python handler's own time on a cache hit, 4 KiB, median (fuse-ceiling.md)."""


class MissingToolError(WorkbenchError, FileNotFoundError):
    """Raised when a program or device the benchmark needs is not on this machine."""


@dataclasses.dataclass
class DeviceBenchmark:
    """Settings of one run; `quick()` is a smoke run of well under a minute."""

    image_size: int = 768 << 20
    sources: tuple[str, ...] = FULL_SOURCES
    compress: str | None = "lz4"
    zfile_block_size: int = 4096
    runtime_s: float = 10.0
    repeats: int = 3
    handler_requests: int = 20_000

    @classmethod
    def quick(cls) -> DeviceBenchmark:
        return cls(
            image_size=32 << 20,
            sources=QUICK_SOURCES,
            runtime_s=2.0,
            repeats=1,
            handler_requests=2_000,
        )


@dataclasses.dataclass(frozen=True)
class Figure:
    """One line of the report: a figure of both sides, and how their ratio is judged.

    `higher_is_better` figures (MB/s, IOPS) are judged by workbench / baseline >= `target`;
    the others (seconds, microseconds) by workbench / baseline <= `target`, or, with
    `absolute`, by the workbench's value alone <= `target`.
    """

    name: str
    unit: str
    baseline: float
    workbench: float
    target: float | None
    higher_is_better: bool
    absolute: bool = False

    @property
    def ratio(self) -> float:
        return self.workbench / self.baseline if self.baseline else float("inf")

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        if self.absolute:
            return self.workbench <= self.target
        if self.higher_is_better:
            return self.ratio >= self.target
        return self.ratio <= self.target

    def target_text(self) -> str:
        if self.target is None:
            return "-"
        if self.absolute:
            return f"<= {self.target:g} {self.unit}"
        return f">= {self.target:g}" if self.higher_is_better else f"<= {self.target:g}x"

    def row(self) -> list[Any]:
        verdict = {None: "-", True: "met", False: "MISSED"}[self.met]
        return [
            self.name,
            self.unit,
            self.baseline,
            self.workbench,
            f"{self.ratio:.2f}",
            self.target_text(),
            verdict,
        ]


@dataclasses.dataclass(frozen=True)
class _Sides:
    """The two mounted copies of the image: loop devices and mount points."""

    plain_loop: str
    plain_mount: Path
    workbench_loop: str
    workbench_mount: Path


def bench_device(
    settings: DeviceBenchmark | None = None,
    workdir: str | os.PathLike[str] | None = None,
    out: TextIO | None = None,
) -> list[Table]:
    """Build the image, mount it both ways, measure, print the tables to `out` and return them.

    Raises `MissingToolError` when not root, without /dev/fuse, or when a program is missing.
    Every mount and loop device made is removed again, also on Ctrl-C.
    """
    settings = settings or DeviceBenchmark()
    out = out or sys.stdout
    check_requirements()

    with (
        tempfile.TemporaryDirectory(dir=workdir, prefix="wb-bench-device-") as scratch_name,
        contextlib.ExitStack() as cleanup,
    ):
        scratch = Path(scratch_name)
        raw, config = _build_image(settings, scratch)
        sides = _mount_both(raw, config, scratch, cleanup)
        _read_once(sides)

        figures = _bench_fio(settings, sides)
        figures += _bench_tree(settings, sides)
        cleanup.close()
        handler_figures = _bench_handler(settings, raw, config)

    tables = [_device_table(settings, raw, figures), _handler_table(settings, handler_figures)]
    for table in tables:
        out.write(table.render() + "\n\n")
    out.flush()
    return tables


def check_requirements() -> None:
    """Raise `MissingToolError` naming what to install if the benchmark cannot run here."""
    if os.geteuid() != 0:
        raise MissingToolError(
            "bench device needs root: it attaches loop devices, mounts ext4 and drops caches"
        )
    if not os.path.exists("/dev/fuse"):
        raise MissingToolError("bench device needs /dev/fuse (FUSE in the kernel); none here")
    if shutil.which("fio") is None:
        raise MissingToolError("fio is not installed; run `apt-get install fio` (Debian's fio)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        packages = sorted({TOOLS[tool] for tool in missing})
        raise MissingToolError(
            f"bench device needs {', '.join(missing)}; run `apt-get install {' '.join(packages)}`"
        )


# ---------------------------------------------------------------------------------------------
# The image and its two mounts


def _build_image(settings: DeviceBenchmark, scratch: Path) -> tuple[Path, Path]:
    """The raw ext4 image and the config.v1.json of the same image imported as one layer."""
    raw = scratch / "disk.raw"
    make_ext4_image(raw, settings.image_size, list(settings.sources))

    layer = scratch / "layer.commit"
    start = time.perf_counter()
    import_raw(raw, layer, compress=settings.compress, block_size=settings.zfile_block_size)
    log.info(
        "imported the image as %s (%s) in %.1f s",
        _size(layer.stat().st_size),
        settings.compress or "uncompressed",
        time.perf_counter() - start,
    )

    config = scratch / "config.v1.json"
    config.write_text(json.dumps({"lowers": [{"file": str(layer)}]}))
    return raw, config


def _mount_both(raw: Path, config: Path, scratch: Path, cleanup: contextlib.ExitStack) -> _Sides:
    """Mount the raw image on a plain loop device and the layer through the workbench.

    Each piece registers its removal in `cleanup` as soon as it exists.
    """
    plain_mount, workbench_mount = scratch / "plain", scratch / "workbench"
    plain_mount.mkdir()
    workbench_mount.mkdir()

    plain_loop = _run(["losetup", "--find", "--show", "--read-only", str(raw)]).strip()
    cleanup.callback(_detach_loop, plain_loop)
    _run(["mount", "-t", "ext4", "-o", "ro,noload", plain_loop, str(plain_mount)])
    cleanup.callback(_unmount, plain_mount)

    # A run folder of our own: unmount_all removes this benchmark's mount and nothing else.
    run_dir = scratch / "run"
    cleanup.callback(unmount_all, run_dir)
    mount = mount_image(config, workbench_mount, run_dir=run_dir)
    log.info("plain loop %s, workbench loop %s", plain_loop, mount.loop)
    return _Sides(plain_loop, plain_mount, mount.loop, workbench_mount)


def _read_once(sides: _Sides) -> None:
    """Read both loop devices end to end: every block is local before caches are dropped."""
    for device in (sides.plain_loop, sides.workbench_loop):
        with open(device, "rb", buffering=0) as disk:
            while disk.read(1 << 20):
                pass


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise WorkbenchError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout


def _unmount(mountpoint: Path) -> None:
    done = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True)
    if done.returncode != 0:
        log.warning("umount %s failed (%s); detaching lazily", mountpoint, done.stderr.strip())
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def _detach_loop(loop: str) -> None:
    done = subprocess.run(["losetup", "-d", loop], capture_output=True, text=True)
    if done.returncode != 0:
        log.warning("losetup -d %s failed: %s", loop, done.stderr.strip())


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as control:
        control.write("3\n")


# ---------------------------------------------------------------------------------------------
# fio on the loop devices, and walks of the mounted trees


def _bench_fio(settings: DeviceBenchmark, sides: _Sides) -> list[Figure]:
    """Sequential and random reads on both loop devices, caches dropped before each run."""
    runtime = settings.runtime_s
    jobs: list[tuple[str, str, Callable[[dict[str, Any]], float], float, dict[str, Any]]] = [
        (
            "seq read 1 MiB",
            "MB/s",
            lambda job: job["read"]["bw_bytes"] / MB,
            0.5,
            {"rw": "read", "bs": "1M", "iodepth": 1},
        ),
        (
            "rand read 4 KiB QD1",
            "IOPS",
            lambda job: job["read"]["iops"],
            0.25,
            {"rw": "randread", "bs": "4k", "iodepth": 1},
        ),
        (
            "rand read 4 KiB QD32",
            "IOPS",
            lambda job: job["read"]["iops"],
            0.25,
            {"rw": "randread", "bs": "4k", "iodepth": 32},
        ),
    ]
    figures = []
    for name, unit, value, target, options in jobs:
        runs: dict[str, list[float]] = {"plain": [], "workbench": []}
        for _ in range(settings.repeats):
            for side, device in (("plain", sides.plain_loop), ("workbench", sides.workbench_loop)):
                drop_caches()
                runs[side].append(value(run_fio(device, runtime_s=runtime, **options)))
        log.info("%s: plain %s, workbench %s", name, runs["plain"], runs["workbench"])
        figures.append(
            Figure(
                name,
                unit,
                statistics.median(runs["plain"]),
                statistics.median(runs["workbench"]),
                target,
                higher_is_better=True,
            )
        )
    return figures


def run_fio(device: str, rw: str, bs: str, iodepth: int, runtime_s: float) -> dict[str, Any]:
    """One fio job on `device` (read-only, direct I/O, libaio); its JSON job record.

    The job makes one pass over the device (a random one reads each block once), stopping
    early after `runtime_s`.
    """
    command = [
        "fio",
        "--name=bench",
        f"--filename={device}",
        "--readonly",
        f"--rw={rw}",
        f"--bs={bs}",
        "--ioengine=libaio",
        "--direct=1",
        f"--iodepth={iodepth}",
        f"--runtime={runtime_s:g}s",
        "--output-format=json",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise WorkbenchError(f"fio failed on {device}: {done.stderr.strip() or done.stdout}")

    # fio may print warnings before the JSON document.
    report = json.loads(done.stdout[done.stdout.index("{") :])
    job = report["jobs"][0]
    if job.get("error"):
        raise WorkbenchError(f"fio job on {device} failed with error {job['error']}")
    return job


def _bench_tree(settings: DeviceBenchmark, sides: _Sides) -> list[Figure]:
    """`du -s` and `tar cf - . | cat` over both mounted trees, caches dropped before each."""
    walks = (
        ("du -s", ["du", "-s", "."]),
        ("tar cf - | cat", ["bash", "-c", "set -o pipefail; tar cf - . | cat >/dev/null"]),
    )
    figures = []
    for name, command in walks:
        runs: dict[str, list[float]] = {"plain": [], "workbench": []}
        for _ in range(settings.repeats):
            for side, mountpoint in (
                ("plain", sides.plain_mount),
                ("workbench", sides.workbench_mount),
            ):
                drop_caches()
                start = time.perf_counter()
                done = subprocess.run(command, cwd=mountpoint, capture_output=True, text=True)
                seconds = time.perf_counter() - start
                if done.returncode != 0:
                    raise WorkbenchError(f"{name} failed in {mountpoint}: {done.stderr.strip()}")
                runs[side].append(seconds)
        log.info("%s: plain %s, workbench %s", name, runs["plain"], runs["workbench"])
        figures.append(
            Figure(
                name,
                "s",
                statistics.median(runs["plain"]),
                statistics.median(runs["workbench"]),
                4.0,
                higher_is_better=False,
            )
        )
    return figures


# ---------------------------------------------------------------------------------------------
# The handler's own time per request


def _bench_handler(settings: DeviceBenchmark, raw: Path, config: Path) -> list[Figure]:
    """`BlockHandler.read_bytes` on cache hits vs `os.pread` of the raw file, per request."""
    figures = []
    stack = open_image(config)
    fd = os.open(raw, os.O_RDONLY)
    try:
        handler = BlockHandler(stack)
        rng = random.Random(4)
        for size in HANDLER_SIZES:
            offsets = _data_offsets(stack.data_ranges(), size, settings.handler_requests, rng)

            # One read of each offset first: the blocks are then local and in the page cache.
            for offset in offsets:
                handler.read_bytes(offset, size)
                os.pread(fd, size, offset)

            handler_ns = _time_each(lambda o, s=size: handler.read_bytes(o, s), offsets)
            pread_ns = _time_each(lambda o, s=size: os.pread(fd, s, o), offsets)
            for quantile in ("median", "p99"):
                target = HANDLER_TARGET_US if quantile == "median" and size == 4096 else None
                figures.append(
                    Figure(
                        f"read_bytes {_size(size)}, {quantile}",
                        "us",
                        _quantile(pread_ns, quantile) / 1000,
                        _quantile(handler_ns, quantile) / 1000,
                        target,
                        higher_is_better=False,
                        absolute=True,
                    )
                )
    finally:
        os.close(fd)
        stack.close()
    return figures


def _data_offsets(
    ranges: Iterable[tuple[int, int]], size: int, count: int, rng: random.Random
) -> list[int]:
    """`count` random offsets, aligned to `size`, of requests that lie inside data ranges."""
    slots = []
    for offset, length in ranges:
        first = -(-offset // size)
        stop = (offset + length) // size
        if stop > first:
            slots.append((first, stop))
    if not slots:
        raise WorkbenchError("the image holds no data to read: is the source tree empty?")
    weights = [stop - first for first, stop in slots]
    chosen = rng.choices(slots, weights, k=count)
    return [rng.randrange(first, stop) * size for first, stop in chosen]


def _time_each(call: Callable[[int], object], offsets: list[int]) -> list[int]:
    """Nanoseconds of each `call(offset)`, one per offset."""
    clock = time.perf_counter_ns
    samples = []
    for offset in offsets:
        start = clock()
        call(offset)
        samples.append(clock() - start)
    return samples


def _quantile(samples: list[int], which: str) -> float:
    """The median or the 99th percentile of `samples`."""
    if which == "median":
        return float(statistics.median(samples))
    return float(statistics.quantiles(samples, n=100)[98])


# ---------------------------------------------------------------------------------------------
# The report


def _device_table(settings: DeviceBenchmark, raw: Path, figures: list[Figure]) -> Table:
    compress = settings.compress or "uncompressed"
    table = Table(
        f"device: ext4 through the workbench ({compress}) vs plain loop, same image",
        ["figure", "unit", "plain loop", "workbench", "ratio", "target", "verdict"],
        [figure.row() for figure in figures],
    )
    table.notes.append(
        f"{_size(settings.image_size)} ext4 image of {', '.join(settings.sources)}; "
        f"ZFile block {_size(settings.zfile_block_size)}; median of {settings.repeats} "
        "run(s) per side; caches dropped before each run"
    )
    table.notes.append(
        f"fio on the loop devices, libaio, direct=1, --readonly; each job one pass over the "
        f"device (rand: each block once) of at most {settings.runtime_s:g} s; "
        "ratio = workbench / plain"
    )
    return table


def _handler_table(settings: DeviceBenchmark, figures: list[Figure]) -> Table:
    table = Table(
        "handler own time per cache-hit request: BlockHandler.read_bytes vs os.pread",
        ["figure", "unit", "os.pread", "handler", "ratio", "target", "verdict"],
        [figure.row() for figure in figures],
    )
    table.notes.append(
        f"{settings.handler_requests:,} requests per size at random aligned offsets that hold "
        "data, each read once before; in this process, tracing off; os.pread reads the raw "
        "image file at the same offsets"
    )
    return table


def _size(nbytes: int) -> str:
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):.0f} MiB"
    return f"{nbytes >> 10} KiB"
