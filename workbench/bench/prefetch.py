"""`workbench bench prefetch`: how much of the cold-warm gap does trace replay remove?

The Fig 16 question on one machine. An ext4 image (files from this machine's /usr) is
imported as one lz4 ZFile layer, pushed to the embedded registry and mounted by reference,
lazily, through the shaping proxy (`workbench.net.shape`, default 200 Mbit/s and 20 ms RTT).
The "application start" reads a fixed subset of the image's files (every third file, in
path order, up to `app_bytes`). Each run mounts the image afresh (new FUSE server, loop and
ext4: an empty page cache) and times that read set from the moment the mount is ready:

    record   a cold cache, the reads recorded (``--record-trace``): the trace of the start
    cold     a cold cache, no prefetch: what a lazy start costs
    warm     the cache the cold run left: every block local, the kernel caches empty
    replay   a cold cache, the trace replayed at mount (16 reads at once) while the app reads

and prints, measured in the same run, the share of the cold-warm gap replay removes:
``(cold - replay) / (cold - warm)`` (the paper reports about 95%), with the bytes each run
fetched from the registry. Needs root, /dev/fuse and mkfs.ext4.

Measured on this 2-vCPU machine (shared, so the runs are noisy): ``--quick`` (6 MiB read
set, 3 repeats) 74% of the gap removed; the default (32 MiB, 3 repeats) 65%, with the replay
done 3.2 s after the server started while the cold start took 7.4 s and the warm one 1.8 s.

Caveats:
- replay saves the round trips of a lazy start, not its transfer: it fetches about as many
  bytes as the cold start, over the same link; where the link's rate (not its RTT) bounds
  the cold start, as at the default 200 Mbit/s, the share removed stays below the paper's;
- the application reads one file after another; a real start overlaps CPU work with its
  reads, which leaves replay more time to run ahead;
- the mount itself (ext4 superblock, group descriptors, root directory) costs the same
  fetches in every cold run and is timed apart, not in the figure;
- client, proxy, registry and FUSE server share two cores.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from workbench.bench.device import FULL_SOURCES, QUICK_SOURCES, check_requirements
from workbench.bench.formats import Table, make_ext4_image

log = logging.getLogger(__name__)

__all__ = ["PrefetchBenchmark", "bench_prefetch"]

MiB = 1 << 20


@dataclasses.dataclass
class PrefetchBenchmark:
    """Settings of one run; `quick()` is a smoke run of well under a minute."""

    image_size: int = 256 << 20
    sources: tuple[str, ...] = FULL_SOURCES
    app_bytes: int = 32 << 20
    rtt_ms: float = 20.0
    mbps: float = 200.0
    concurrency: int = 16
    repeats: int = 3

    @classmethod
    def quick(cls) -> PrefetchBenchmark:
        return cls(image_size=48 << 20, sources=QUICK_SOURCES, app_bytes=6 << 20, repeats=1)


@dataclasses.dataclass
class _Run:
    kind: str
    mount_s: float
    app_s: float
    fetched: int
    prefetch_s: float = 0.0


def bench_prefetch(
    settings: PrefetchBenchmark, workdir: str | None = None, out: IO[str] | None = None
) -> list[Table]:
    """Run the benchmark; returns (and writes to `out`) its table."""
    check_requirements_light()
    from workbench.registry.server import EmbeddedRegistry

    with tempfile.TemporaryDirectory(prefix="wb-bench-prefetch-", dir=workdir) as folder:
        scratch = Path(folder)
        config = _build_image(settings, scratch)
        with (
            EmbeddedRegistry(scratch / "registry") as registry,
            _shaped(settings, registry.url) as host,
        ):
            reference = f"{host}/bench/prefetch:v1"
            from workbench.registry.image import push_image

            push_image(config, f"{registry.url.split('://', 1)[1]}/bench/prefetch:v1")
            runs = _all_runs(settings, scratch, reference)
    table = _table(settings, runs)
    if out is not None:
        out.write(table.render() + "\n")
    return [table]


def check_requirements_light() -> None:
    """Root, /dev/fuse and the mount tools (fio is not needed here)."""
    try:
        check_requirements()
    except Exception as exc:
        if "fio" not in str(exc):
            raise


def _build_image(settings: PrefetchBenchmark, scratch: Path) -> Path:
    from workbench.image.commit import import_raw

    raw = scratch / "disk.raw"
    make_ext4_image(raw, settings.image_size, list(settings.sources))
    import_raw(raw, scratch / "layer.tar", compress="lz4", tar=True)
    raw.unlink()
    config = scratch / "config.v1.json"
    config.write_text(json.dumps({"lowers": [{"file": str(scratch / "layer.tar")}]}))
    return config


@contextmanager
def _shaped(settings: PrefetchBenchmark, url: str) -> Iterator[str]:
    from workbench.net.shape import ShapingProxy

    port = int(url.rsplit(":", 1)[1].split("/")[0])
    proxy = ShapingProxy(upstream=("127.0.0.1", port), rtt_ms=settings.rtt_ms, mbps=settings.mbps)
    with proxy.run_in_thread() as shaped_port:
        yield f"127.0.0.1:{shaped_port}"


def _all_runs(settings: PrefetchBenchmark, scratch: Path, reference: str) -> list[_Run]:
    trace = scratch / "app.trace"
    record = _run(settings, scratch, reference, "record", "cache-record", trace=trace)
    files = record[1]
    runs = [record[0]]
    for repeat in range(settings.repeats):
        cache = f"cache-cold-{repeat}"
        runs.append(_run(settings, scratch, reference, "cold", cache, files=files)[0])
        runs.append(_run(settings, scratch, reference, "warm", cache, files=files)[0])
        replay_cache = f"cache-replay-{repeat}"
        runs.append(
            _run(settings, scratch, reference, "replay", replay_cache, files=files, trace=trace)[0]
        )
    return runs


def _run(
    settings: PrefetchBenchmark,
    scratch: Path,
    reference: str,
    kind: str,
    cache: str,
    files: list[str] | None = None,
    trace: Path | None = None,
) -> tuple[_Run, list[str]]:
    from workbench.device.introspect import query
    from workbench.device.mount import mount_image, unmount, unmount_all
    from workbench.prefetch import PrefetchConfig

    target, run_dir = scratch / "mnt", scratch / "run"
    target.mkdir(exist_ok=True)
    os.environ["WORKBENCH_CACHE_DIR"] = str(scratch / cache)
    prefetch = None
    if kind == "record":
        prefetch = PrefetchConfig.record(trace)  # type: ignore[arg-type]
    elif kind == "replay":
        prefetch = PrefetchConfig.replay(trace, settings.concurrency)  # type: ignore[arg-type]
    try:
        started = time.perf_counter()
        mount = mount_image(reference, target, run_dir=run_dir, prefetch=prefetch)
        mounted = time.perf_counter()
        if files is None:
            files = _app_files(target, settings.app_bytes)
        before = json.loads(query(mount.control, "cache"))
        _read_all(target, files)
        done = time.perf_counter()
        after = json.loads(query(mount.control, "cache"))
        status = json.loads(query(mount.control, "prefetch"))
        unmount(target, run_dir)
    finally:
        unmount_all(run_dir)
        os.environ.pop("WORKBENCH_CACHE_DIR", None)
    prefetch_s = status["seconds"] if status and kind == "replay" else 0.0
    fetched = after["bytes_fetched"] - (0 if kind == "replay" else before["bytes_fetched"])
    log.info("%s: mount %.2f s, app %.2f s", kind, mounted - started, done - mounted)
    return _Run(kind, mounted - started, done - mounted, fetched, prefetch_s), files


def _app_files(root: Path, budget: int) -> list[str]:
    """Every third regular file in path order, up to `budget` bytes: the start's read set."""
    chosen, used, number = [], 0, 0
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            if not path.is_file() or path.is_symlink():
                continue
            number += 1
            if number % 3:
                continue
            chosen.append(str(path.relative_to(root)))
            used += path.stat().st_size
            if used >= budget:
                return chosen
    return chosen


def _read_all(root: Path, files: list[str]) -> None:
    for name in files:
        with open(root / name, "rb", buffering=0) as file:
            while file.read(1 << 20):
                pass


def _median(runs: list[_Run], kind: str, field: str) -> float:
    return statistics.median(getattr(run, field) for run in runs if run.kind == kind)


def _table(settings: PrefetchBenchmark, runs: list[_Run]) -> Table:
    cold = _median(runs, "cold", "app_s")
    warm = _median(runs, "warm", "app_s")
    replay = _median(runs, "replay", "app_s")
    rows: list[list[Any]] = []
    for kind in ("record", "cold", "warm", "replay"):
        app = _median(runs, kind, "app_s")
        rows.append(
            [
                kind,
                _median(runs, kind, "mount_s"),
                app,
                app / cold if cold else 0.0,
                _median(runs, kind, "fetched") / MiB,
                _median(runs, kind, "prefetch_s"),
            ]
        )
    gap = cold - warm
    removed = (cold - replay) / gap if gap > 0 else float("nan")
    notes = [
        f"link {settings.mbps:g} Mbit/s, {settings.rtt_ms:g} ms RTT; read set "
        f"{settings.app_bytes >> 20} MiB of files, medians of {settings.repeats} run(s)",
        "fetched: registry bytes during the app's reads (replay: its prefetch included); "
        "prefetch s: from server start to the last replayed read",
        f"share of the cold-warm gap removed by replay: {removed:.1%} (paper: ~95%)",
    ]
    return Table(
        "Trace replay vs a cold lazy start",
        ["run", "mount s", "app s", "vs cold", "fetched MiB", "prefetch s"],
        rows,
        notes,
    )
