"""The experiment runner: a definition's trials, run in order, written to a tidy Parquet table.

    result = run_experiment(load_definition("experiments/fig14-cold-start.toml", quick=True),
                            "/var/tmp/workbench-experiments/runs/fig14")
    result.table                                   # pandas DataFrame, one row per trial

What a run does:

1. plans the trials (`plan`): every combination of workload, system, network preset, disk
   preset and cache state (device studies: also each fio queue depth and tree walk), times
   the repetitions, in the definition's order: ``interleaved`` (each repetition runs every
   combination once, in turn), ``blocked`` (all repetitions of one combination, then the
   next), ``shuffled`` (each repetition in a seeded random order);
2. skips trials the output already holds with status ``ok`` (an interrupted run resumes);
3. starts an embedded registry in a scratch folder, pushes each workload's image in both forms
   (`workbench.experiments.workloads.prepare`), and for each trial puts a shaping proxy with
   the network preset in front of it (a new proxy per trial: no warm connections);
4. makes the cache state, runs the trial and appends a row to ``OUTPUT/trials.parquet``
   (rewritten atomically after each trial), with a progress bar.

Cache states: every trial starts with the page cache dropped and a new FUSE server (the
"daemon" restarted). ``cold``: the block cache is wiped and the image removed (unpacked layers
deleted, nothing mounted), except for ``lazy-warm``, whose block cache is kept.
``lazy-prefetch`` keeps only the trace its warm-up start recorded (``PrefetchConfig.record``)
and replays it (``PrefetchConfig.replay``, 16 threads) while the workload starts, the block
cache wiped. ``warm``: unpacked layers and block caches are kept. A kept state is made by one
untimed start before the first measured trial of that combination (a warm-up).

Columns of the table: `COLUMNS` (conditions, metrics, counters, environment); a column that
does not apply to a kind of study is null. ``OUTPUT/run.json`` holds the environment, the
definition and the systems that were unavailable (with the reason).

Caveats:
- a trial that fails is recorded with status ``failed`` and its error, and run again when the
  run is resumed; the run goes on with the next trial;
- the registry counters are those of the embedded registry (every request of the trial, the
  manifest's included); the proxy counts bytes on the wire, headers included;
- cache hits and misses, and the bytes the kernel read from the image's disk
  (``device_read_bytes``), are counted only when the definition sets ``trace = true`` (the
  FUSE server then records every event, which costs time on the read path).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import platform
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pandas as pd

from workbench.errors import ExperimentError, WorkbenchError
from workbench.experiments import systems
from workbench.experiments.definition import DISK_PRESETS, Definition
from workbench.experiments.systems import LAUNCHER, DiskThrottle, Phases, TrialSetup
from workbench.experiments.workloads import PreparedImage, prefetch_available, prepare
from workbench.net.shape import PRESETS, ShapingProxy

__all__ = ["COLUMNS", "RunResult", "Trial", "plan", "run_experiment", "scratch_root"]

log = logging.getLogger(__name__)

TABLE_NAME: Final = "trials.parquet"
SIZE_FORMATS: Final = ("tar", "tar.gz", "lsmt", "zfile")
"""The forms of an image the size study reports: layer tars, gzip layers, LSMT, ZFile."""
RUN_NAME: Final = "run.json"

CONDITIONS: Final = (
    "workload",
    "system",
    "network",
    "disk",
    "cache_state",
    "test",
    "queue_depth",
    "format",
)
METRICS: Final = (
    "pull_s",
    "launch_s",
    "ready_s",
    "iops",
    "mb_s",
    "seconds",
    "bytes",
    "registry_requests",
    "registry_blob_gets",
    "registry_bytes",
    "proxy_bytes_down",
)
COLUMNS: Final = (
    "run_id",
    "study",
    "figure",
    "kind",
    "key",
    "repetition",
    "position",
    *CONDITIONS,
    "launcher",
    "workload_source",
    "status",
    "error",
    *METRICS,
    "resolve_s",
    "mount_s",
    "layer_bytes",
    "cache_bytes_before",
    "cache_bytes_after",
    "cache_hits",
    "cache_misses",
    "device_read_bytes",
    "rtt_ms",
    "mbps",
    "disk_iops",
    "disk_bytes_per_s",
    "started_at",
    "git_commit",
    "kernel",
    "cpu",
    "cpus",
    "loadavg",
    "python",
    "quick",
    "parameters",
)


@dataclass(frozen=True)
class Trial:
    """One measurement: a combination of conditions and a repetition number."""

    repetition: int
    workload: str
    system: str
    network: str = "none"
    disk: str = "local"
    cache_state: str = "cold"
    test: str = "start"
    queue_depth: int = 0
    format: str = ""

    @property
    def key(self) -> str:
        parts = (
            self.workload,
            self.system,
            self.network,
            self.disk,
            self.cache_state,
            self.test,
            str(self.queue_depth),
            self.format,
            str(self.repetition),
        )
        return "|".join(parts)

    @property
    def state_key(self) -> tuple[str, str, str]:
        """What a kept state belongs to: the workload, the system and the cache state."""
        return (self.workload, self.system, self.cache_state)


@dataclass
class RunResult:
    """A finished (or interrupted) run: where it is, its table, what was skipped."""

    output: Path
    table: pd.DataFrame
    ran: int = 0
    skipped: int = 0
    unavailable: dict[str, str] = field(default_factory=dict)

    @property
    def table_path(self) -> Path:
        return self.output / TABLE_NAME


def scratch_root() -> Path:
    """`$WORKBENCH_EXPERIMENTS_CACHE`, default /var/tmp/workbench-experiments."""
    return Path(os.environ.get("WORKBENCH_EXPERIMENTS_CACHE", "/var/tmp/workbench-experiments"))


# ---------------------------------------------------------------------------------------------
# Planning


def plan(definition: Definition) -> list[Trial]:
    """Every trial of `definition`, in the order they run."""
    combinations = _combinations(definition)
    reps = range(definition.repetitions)
    if definition.order == "blocked":
        return [
            Trial(repetition=rep, **combination) for combination in combinations for rep in reps
        ]

    rng = random.Random(definition.seed)
    trials = []
    for rep in reps:
        ordered = list(combinations)
        if definition.order == "shuffled":
            rng.shuffle(ordered)
        else:
            # Interleaved: the starting combination moves on by one each repetition, so no
            # combination always runs first (right after the image was pushed).
            shift = rep % len(ordered)
            ordered = ordered[shift:] + ordered[:shift]
        trials += [Trial(repetition=rep, **combination) for combination in ordered]
    return trials


def _combinations(definition: Definition) -> list[dict[str, Any]]:
    if definition.kind == "sizes":
        return [
            {"workload": workload, "system": "image", "test": "size", "format": form}
            for workload in definition.workloads
            for form in SIZE_FORMATS
        ]

    tests: list[tuple[str, int]] = [("start", 0)]
    if definition.kind == "device":
        settings = definition.device
        tests = [(f"randread-{settings.block_size}", qd) for qd in settings.queue_depths]
        tests += [(walk, 0) for walk in settings.walks]
    product = itertools.product(
        definition.workloads,
        definition.systems,
        definition.networks,
        definition.disks,
        definition.cache,
        tests,
    )
    return [
        {
            "workload": workload,
            "system": system,
            "network": network,
            "disk": disk,
            "cache_state": cache,
            "test": test,
            "queue_depth": depth,
        }
        for workload, system, network, disk, cache, (test, depth) in product
    ]


# ---------------------------------------------------------------------------------------------
# The environment


def environment(definition: Definition) -> dict[str, Any]:
    """What the results depend on besides the conditions: code, kernel, CPU, parameters."""
    return {
        "git_commit": _git_commit(),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count() or 0,
        "loadavg": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "quick": definition.quick,
        "parameters": json.dumps(definition.parameters(), sort_keys=True, default=str),
    }


def _git_commit() -> str:
    top = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        ["git", "-C", str(top), "describe", "--always", "--dirty", "--abbrev=12"],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------------
# Running


def run_experiment(
    definition: Definition,
    output: str | os.PathLike[str],
    *,
    progress: bool = True,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Run the trials of `definition` not yet in `output`; see the module docstring.

    `on_trial` is called with each row once it is written (tests interrupt a run there).
    Raises `ExperimentError` when not root (mounts, cgroups and drop_caches need it).
    """
    if os.geteuid() != 0:
        raise ExperimentError("experiments need root: they mount, throttle disks, drop caches")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    existing = load_table(out)
    done = set(existing.loc[existing["status"] == "ok", "key"]) if len(existing) else set()
    trials = plan(definition)
    pending = [trial for trial in trials if trial.key not in done]
    unavailable = _unavailable(definition)
    runnable = [trial for trial in pending if trial.system not in unavailable]
    result = RunResult(out, existing, skipped=len(trials) - len(pending), unavailable=unavailable)

    env = environment(definition)
    run_id = uuid.uuid4().hex[:12]
    _write_run_json(out, definition, env, run_id, unavailable, len(trials))
    if not runnable:
        log.info("%s: nothing to run (%d trials already done)", definition.name, result.skipped)
        return result

    rows = [] if existing.empty else existing.to_dict("records")
    rows = [row for row in rows if row["status"] == "ok"]
    with _Bench(definition) as bench, _progress(len(runnable), definition.name, progress) as bar:
        for position, trial in enumerate(runnable):
            row = bench.run(trial)
            row.update(env, run_id=run_id, position=position)
            rows.append(row)
            result.table = _write_table(out, rows)
            result.ran += 1
            bar.update(1)
            if on_trial is not None:
                on_trial(row)
    return result


def _unavailable(definition: Definition) -> dict[str, str]:
    reasons = {}
    if "lazy-prefetch" in definition.systems:
        why = prefetch_available()
        if why is not None:
            reasons["lazy-prefetch"] = why
    return reasons


def _write_run_json(
    out: Path,
    definition: Definition,
    env: dict[str, Any],
    run_id: str,
    unavailable: dict[str, str],
    trials: int,
) -> None:
    document = {
        "study": definition.name,
        "figure": definition.figure,
        "kind": definition.kind,
        "description": definition.description,
        "run_id": run_id,
        "trials": trials,
        "launcher": LAUNCHER,
        "unavailable": unavailable,
        "environment": {key: value for key, value in env.items() if key != "parameters"},
        "definition": definition.parameters(),
    }
    (out / RUN_NAME).write_text(json.dumps(document, indent=2, default=str) + "\n")


@contextlib.contextmanager
def _progress(total: int, name: str, enabled: bool) -> Iterator[Any]:
    from tqdm import tqdm

    with tqdm(total=total, desc=name, unit="trial", disable=not enabled, leave=True) as bar:
        yield bar


def load_table(output: Path) -> pd.DataFrame:
    """The trials table of a run folder (empty if there is none yet)."""
    path = output / TABLE_NAME
    if not path.exists():
        return pd.DataFrame(columns=list(COLUMNS))
    return pd.read_parquet(path)


def _write_table(out: Path, rows: list[dict[str, Any]]) -> pd.DataFrame:
    table = pd.DataFrame.from_records(rows)
    for column in COLUMNS:
        if column not in table:
            table[column] = None
    table = table[list(COLUMNS)]
    steps = ("resolve_s", "mount_s", "layer_bytes", "cache_bytes_before", "cache_bytes_after")
    for column in (*METRICS, *steps):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("float64")
    counts = ("cache_hits", "cache_misses", "device_read_bytes", "rtt_ms", "mbps")
    for column in (*counts, "disk_iops", "disk_bytes_per_s"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("float64")
    tmp = out / (TABLE_NAME + ".tmp")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, out / TABLE_NAME)
    return table


# ---------------------------------------------------------------------------------------------
# One bench: the registry, the prepared images, the kept states


class _Bench:
    """The registry, images and scratch folders of one run; runs one trial at a time."""

    def __init__(self, definition: Definition) -> None:
        self.definition = definition
        self.stack = contextlib.ExitStack()
        self.images: dict[str, PreparedImage] = {}
        self.warmed: set[tuple[str, str, str]] = set()

    def __enter__(self) -> _Bench:
        from workbench.device.mount import unmount_all
        from workbench.registry.server import EmbeddedRegistry

        try:
            root = scratch_root()
            root.mkdir(parents=True, exist_ok=True)
            self.scratch = Path(tempfile.mkdtemp(prefix="run-", dir=root))
            self.stack.callback(shutil.rmtree, self.scratch, ignore_errors=True)
            self.run_dir = self.scratch / "run"
            self.stack.callback(unmount_all, self.run_dir)
            self.registry = self.stack.enter_context(EmbeddedRegistry(self.scratch / "registry"))
            self.stack.enter_context(_environment("WORKBENCH_CACHE_DIR", None))
            host = f"127.0.0.1:{self.registry.port}"
            for name in self.definition.workloads:
                self.images[name] = prepare(name, host)
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    # -- a trial ----------------------------------------------------------------------------

    def run(self, trial: Trial) -> dict[str, Any]:
        image = self.images[trial.workload]
        row = _base_row(self.definition, trial, image)
        try:
            if self.definition.kind == "sizes":
                row["bytes"] = image.sizes[trial.format]
            else:
                row.update(self._measured(trial, image))
            row["status"] = "ok"
        except (WorkbenchError, OSError, subprocess.SubprocessError) as exc:
            log.warning("trial %s failed: %s", trial.key, exc)
            row.update(status="failed", error=str(exc)[:2000])
        return row

    def _measured(self, trial: Trial, image: PreparedImage) -> dict[str, Any]:
        preset = DISK_PRESETS[trial.disk]
        with contextlib.ExitStack() as stack:
            throttle = None
            if preset.iops or preset.bytes_per_s:
                throttle = stack.enter_context(DiskThrottle(preset, self.scratch))
            keep = self._keeps_state(trial)
            state = self.scratch / "state" / "-".join(trial.state_key)
            if not keep:
                shutil.rmtree(state, ignore_errors=True)
            state.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_environment("WORKBENCH_CACHE_DIR", str(state / "blocks")))

            if keep and trial.state_key not in self.warmed:
                log.info("warm-up start for %s", "/".join(trial.state_key))
                self._once(trial, image, state, throttle, warm_up=True)
                self.warmed.add(trial.state_key)
            if trial.system == "lazy-prefetch" and trial.cache_state == "cold":
                # The recorded trace stays; the blocks it names must come from the registry.
                shutil.rmtree(state / "blocks", ignore_errors=True)

            systems.drop_caches()
            return self._once(trial, image, state, throttle)

    def _keeps_state(self, trial: Trial) -> bool:
        """Whether a trial starts from kept state (made by a warm-up start): the block cache
        of lazy-warm, the recorded trace of lazy-prefetch, everything under a warm cache."""
        return trial.cache_state == "warm" or trial.system in ("lazy-warm", "lazy-prefetch")

    def _once(
        self,
        trial: Trial,
        image: PreparedImage,
        state: Path,
        throttle: DiskThrottle | None,
        warm_up: bool = False,
    ) -> dict[str, Any]:
        """One start (or device test) through a new shaping proxy; its counters."""
        proxy = _proxy(trial.network, self.registry.port)
        with proxy.run_in_thread() as port:
            host = f"127.0.0.1:{port}"
            trace = None
            if self.definition.trace and not warm_up and trial.system != "tgz-overlayfs":
                trace = state / f"trace-{uuid.uuid4().hex[:8]}.parquet"
            setup = TrialSetup(
                workdir=state,
                run_dir=self.run_dir,
                oci_ref=_via(image.oci_ref, host),
                lazy_ref=_via(image.lazy_ref, host),
                throttle=throttle,
                trace=trace,
                timeout_s=self.definition.timeout_s,
                prefetch=_prefetch(trial, state, warm_up),
            )
            before = self.registry.statistics()
            cache_before = _cache_bytes(state / "blocks")
            if self.definition.kind == "device":
                from workbench.experiments.device import run_device_test

                measured = run_device_test(trial, image, setup, self.definition.device)
            else:
                measured = _start(trial, image, setup)
            after = self.registry.statistics()
            counters = proxy.statistics()

        row = measured.extra | {
            "registry_requests": after.requests - before.requests,
            "registry_blob_gets": after.blob_gets - before.blob_gets,
            "registry_bytes": after.blob_bytes - before.blob_bytes,
            "proxy_bytes_down": counters.bytes_down,
            "cache_bytes_before": cache_before,
            "cache_bytes_after": _cache_bytes(state / "blocks"),
        }
        if self.definition.kind == "startup":
            row |= {"pull_s": measured.pull_s, "launch_s": measured.launch_s}
            row["ready_s"] = measured.ready_s
        if trace is not None:
            row |= _trace_counts(trace)
        return row


def _prefetch(trial: Trial, state: Path, warm_up: bool) -> Any:
    """lazy-prefetch: record the warm-up start's trace, replay it in measured starts."""
    if trial.system != "lazy-prefetch":
        return None
    from workbench.prefetch import PrefetchConfig

    trace = state / "start.trace"
    if warm_up:
        trace.unlink(missing_ok=True)
        return PrefetchConfig.record(trace)
    if not trace.exists() or trace.stat().st_size == 0:
        raise ExperimentError(f"lazy-prefetch: the warm-up start recorded no trace at {trace}")
    return PrefetchConfig.replay(trace)


def _start(trial: Trial, image: PreparedImage, setup: TrialSetup) -> Phases:
    """One container start on `trial.system`: pull, then launch; everything undone after."""
    from workbench.device.mount import unmount

    phases = Phases()
    container = setup.workdir / "container"
    shutil.rmtree(container, ignore_errors=True)
    if trial.system == "tgz-overlayfs":
        layers = setup.workdir / "layers"
        if not layers.exists():
            start = time.perf_counter()
            phases.extra = systems.pull_tgz(setup, layers)
            phases.pull_s = time.perf_counter() - start
        lowers = sorted(layers.iterdir(), key=lambda path: int(path.name), reverse=True)
        start = time.perf_counter()
        with systems.overlay(lowers, container) as root:
            systems.launch(root, image.workload, setup)
        phases.launch_s = time.perf_counter() - start
        return phases

    mountpoint = setup.workdir / "image"
    start = time.perf_counter()
    mount, phases.extra = systems.pull_lazy(setup, mountpoint)
    phases.pull_s = time.perf_counter() - start
    try:
        start = time.perf_counter()
        with systems.overlay([mountpoint], container) as root:
            systems.launch(root, image.workload, setup)
        phases.launch_s = time.perf_counter() - start
    finally:
        unmount(mount.mountpoint, setup.run_dir)
        mountpoint.rmdir()
    return phases


def _proxy(network: str, registry_port: int) -> ShapingProxy:
    upstream = ("127.0.0.1", registry_port)
    if network == "none":
        return ShapingProxy(upstream=upstream)
    return ShapingProxy.from_preset(network, upstream=upstream)


def _via(reference: str, host: str) -> str:
    """`reference` with its registry host replaced by `host` (the proxy)."""
    return host + reference[reference.index("/") :]


def _cache_bytes(directory: Path) -> float:
    from workbench.blobs.cache import CacheDirectoryError, inventory

    if not directory.exists():
        return 0.0
    try:
        return float(sum(blob.present_bytes for blob in inventory(directory)))
    except CacheDirectoryError:
        return 0.0


def _trace_counts(trace: Path) -> dict[str, Any]:
    if not trace.exists():
        return {}
    events = pd.read_parquet(trace, columns=["layer", "op", "length", "hit"])
    reads = events[(events["layer"] == "cache") & (events["op"] == "read")]
    hits = int(reads["hit"].fillna(False).astype(bool).sum())
    kernel = events[(events["layer"] == "request") & (events["op"] == "fuse-read")]
    trace.unlink()
    return {
        "cache_hits": hits,
        "cache_misses": len(reads) - hits,
        "device_read_bytes": float(kernel["length"].sum()),
    }


def _base_row(definition: Definition, trial: Trial, image: PreparedImage) -> dict[str, Any]:
    link = PRESETS.get(trial.network)
    disk = DISK_PRESETS[trial.disk]
    return {
        "study": definition.name,
        "figure": definition.figure,
        "kind": definition.kind,
        "key": trial.key,
        "repetition": trial.repetition,
        **{name: getattr(trial, name) for name in CONDITIONS},
        "launcher": LAUNCHER,
        "workload_source": image.source,
        "error": "",
        "rtt_ms": link.rtt_ms if link else 0.0,
        "mbps": link.mbps if link else None,
        "disk_iops": disk.iops,
        "disk_bytes_per_s": disk.bytes_per_s,
        "started_at": pd.Timestamp.now(tz="UTC").isoformat(),
    }


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """Set (or, with None, leave as is) environment variable `name`; restored on exit."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
