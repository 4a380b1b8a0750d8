"""A discrete-event model (SimPy) of batch cold starts: registry, P2P tree, hosts, traces.

The model replays a block-access trace (`Trace`, recorded from a real start: the device's
reads of its layer blob) on every container of every host at once and reports when each start
finishes and how many bytes the registry served. It follows the real system's structure:

- **blocks**: the blob is cut into refill-sized blocks (256 KiB); a start needs the blocks
  its trace touches, in first-touch order, with up to `window` fetches in flight (the
  device's readahead) and the trace's think time (time not waiting on reads) spread over it;
- **caches**: each peer (the root, each host's agent) keeps every block it has fetched; a
  block in flight is waited for, not fetched again (the cache's shared fills), so containers
  of one host (Fig 20) share their host's fetches;
- **links**: each host (the root's included) has an uplink and a downlink of `host_mbps`, the
  registry one egress of `registry_mbps` shared by all its readers (as parallel lanes of
  `host_mbps`, at least one), each a FIFO pipe; a
  block moving from a parent to a child holds the parent's uplink and the child's downlink;
  every request costs `request_s` per hop (RTT plus handling);
- **tree**: hosts join in order, breadth first, `fanout` children per node (`Topology`);
- **CPU**: every request and every MiB a node receives take `cpu_request_s` / `cpu_mib_s` of
  that node's `cpu_cores` cores; with `shared_cpu` all nodes draw on one pool of
  `cpu_cores` instead, the way all namespaces of one machine share its 2 cores (calibration).

Modes: ``p2p`` (lazy reads through the tree), ``direct`` (lazy reads, each host from the
registry), ``p2p-whole`` (each host downloads the whole blob through the tree, then starts
from local disk), ``tgz`` (each host pulls a .tgz of `tgz_bytes` from the registry and unpacks
it at `unpack_mbps`, then starts from local disk: Docker's default), ``warm`` (the image is
on every host already: a start is mount, local reads and think time).

`sweep` runs many parameter sets locally (a process pool) or on a Ray cluster when given its
address (``ray`` is imported only then).

Caveats:
- links are FIFO pipes, not TCP fair sharing; a transfer holding an uplink while it waits
  for the downlink wastes the uplink meanwhile (conservative for P2P);
- no failures, no topology expiry, no block cache eviction;
- the trace's think time is taken as independent of the network (it includes the recording
  machine's kernel and FUSE time); `window` is a calibrated constant, not the adaptive
  readahead of `BlockCache`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from workbench.errors import WorkbenchError

__all__ = ["Params", "SimResult", "Trace", "simulate", "sweep"]

log = logging.getLogger(__name__)

MiB = 1 << 20
Mode = Literal["p2p", "direct", "p2p-whole", "tgz", "warm"]
MODES: tuple[str, ...] = ("p2p", "direct", "p2p-whole", "tgz", "warm")


# Traces --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    """The blocks one start reads, in first-touch order, and the time it spends not reading.

    `blocks` are indices of `block_size` blocks of a blob of `blob_size` bytes; `think_s` is
    the part of the recorded start during which no read was outstanding.
    """

    blocks: tuple[int, ...]
    block_size: int
    blob_size: int
    think_s: float
    name: str = "trace"

    @property
    def nbytes(self) -> int:
        return len(self.blocks) * self.block_size

    @classmethod
    def from_events(
        cls, events, block_size: int = 256 << 10, blob_size: int | None = None, name: str = ""
    ) -> Trace:
        """A trace of the ``cache``-layer reads of the largest blob in a recording."""
        reads = events[(events.layer == "cache") & (events.op == "read")]
        if reads.empty:
            raise WorkbenchError("the recording has no cache reads; record a lazy (remote) start")
        target = reads.groupby("target").length.sum().idxmax()
        reads = reads[reads.target == target].sort_values("start_ns")
        return cls.from_reads(
            reads.start_ns.to_numpy(),
            reads.duration_ns.to_numpy(),
            reads.offset.to_numpy(),
            reads.length.to_numpy(),
            block_size=block_size,
            blob_size=blob_size or int((reads.offset + reads.length).max()),
            name=name or str(target),
        )

    @classmethod
    def from_reads(cls, start_ns, duration_ns, offset, length, *, block_size, blob_size, name):
        seen: dict[int, None] = {}
        for first, count in zip(offset, length, strict=True):
            for block in range(int(first) // block_size, -(-int(first + count) // block_size)):
                seen.setdefault(block, None)
        busy_ns = _union_length(start_ns, start_ns + duration_ns)
        span_ns = int((start_ns + duration_ns).max() - start_ns.min())
        return cls(tuple(seen), block_size, blob_size, max(0, span_ns - busy_ns) / 1e9, name)

    def to_json(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=None) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Trace:
        document = json.loads(Path(path).read_text())
        document["blocks"] = tuple(document["blocks"])
        return cls(**document)

    def scaled(self, nbytes: int, blob_size: int | None = None) -> Trace:
        """The same access pattern stretched to `nbytes` read of a `blob_size` blob.

        Each block of the trace becomes a run of consecutive blocks at the same relative
        position of the larger blob, in the same order: locality and order are kept, the
        think time is kept as it is.
        """
        blob_size = blob_size or int(self.blob_size * nbytes / max(self.nbytes, 1))
        old_blocks = max(1, -(-self.blob_size // self.block_size))
        new_blocks = max(1, -(-blob_size // self.block_size))
        run = max(1, round(nbytes / self.block_size / max(len(self.blocks), 1)))
        stretched: dict[int, None] = {}
        for block in self.blocks:
            first = block * new_blocks // old_blocks
            for number in range(first, min(first + run, new_blocks)):
                stretched.setdefault(number, None)
        return dataclasses.replace(self, blocks=tuple(stretched), blob_size=blob_size)


def _union_length(starts, ends) -> int:
    order = np.argsort(starts)
    total, current_start, current_end = 0, None, None
    for start, end in zip(np.asarray(starts)[order], np.asarray(ends)[order], strict=True):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return int(total)


# Parameters and results ----------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    """One scenario. Rates in Mbit/s, times in seconds."""

    hosts: int = 4
    mode: Mode = "p2p"
    containers_per_host: int = 1
    fanout: int = 4
    host_mbps: float = 10_000.0
    registry_mbps: float = 10_000.0
    request_s: float = 0.5e-3
    registry_request_s: float = 2e-3
    mount_s: float = 0.3
    mount_cpu_s: float = 0.0
    window: int = 4
    cpu_cores: int = 4
    shared_cpu: bool = False
    cpu_request_s: float = 0.0
    cpu_mib_s: float = 0.0
    whole_chunk_bytes: int = 4 * MiB
    """Unit of a whole-blob P2P download (Dragonfly-style pieces; keeps big runs cheap)."""
    tgz_bytes: int = 165 * MiB
    unpack_mbps: float = 800.0
    start_spread_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.hosts < 1 or self.containers_per_host < 1 or self.fanout < 1 or self.window < 1:
            raise ValueError("hosts, containers_per_host, fanout and window must be at least 1")


@dataclass(frozen=True)
class SimResult:
    """Start times of every container (seconds from the batch start) and registry bytes."""

    params: Params
    start_s: tuple[float, ...] = field(repr=False)
    registry_bytes: int
    trace_bytes: int

    @property
    def mean_s(self) -> float:
        return float(np.mean(self.start_s))

    @property
    def max_s(self) -> float:
        return float(np.max(self.start_s))

    def row(self) -> dict:
        """A flat record for a table: the parameters and the results."""
        starts = np.asarray(self.start_s)
        return {
            **dataclasses.asdict(self.params),
            "containers": len(starts),
            "mean_s": float(starts.mean()),
            "p50_s": float(np.percentile(starts, 50)),
            "p99_s": float(np.percentile(starts, 99)),
            "max_s": float(starts.max()),
            "std_s": float(starts.std()),
            "registry_bytes": self.registry_bytes,
            "trace_bytes": self.trace_bytes,
        }


# The model -----------------------------------------------------------------------------------


class _Model:
    def __init__(self, params: Params, trace: Trace) -> None:
        import simpy

        self.simpy = simpy
        self.p = params
        self.trace = trace
        self.env = simpy.Environment()
        self.rng = np.random.default_rng(params.seed)
        # the registry's egress serves as many readers at once as it has host links' worth
        # of rate (10 Gbit/s to 1.5 Gbit/s VMs: 6), each at the host's rate
        lanes = max(1, int(params.registry_mbps // params.host_mbps))
        self.registry_link = simpy.Resource(self.env, lanes)
        self.up = [simpy.Resource(self.env, 1) for _ in range(params.hosts + 1)]
        self.down = [simpy.Resource(self.env, 1) for _ in range(params.hosts + 1)]
        self.caches: list[dict[int, object]] = [{} for _ in range(params.hosts + 1)]
        shared = simpy.Resource(self.env, params.cpu_cores) if params.shared_cpu else None
        self.cpus = [
            shared if shared is not None else simpy.Resource(self.env, params.cpu_cores)
            for _ in range(params.hosts + 1)
        ]
        self.registry_bytes = 0
        self.starts: list[float] = []
        # node 0 is the root (a host of its own, next to the registry), node i is host i-1

    # Costs

    def _seconds(self, nbytes: int, mbps: float) -> float:
        return nbytes * 8 / (mbps * 1e6)

    def _cpu(self, node: int, requests: int, nbytes: int):
        cost = requests * self.p.cpu_request_s + nbytes / MiB * self.p.cpu_mib_s
        if cost > 0:
            with self.cpus[node].request() as slot:
                yield slot
                yield self.env.timeout(cost)

    def _transfer(self, sender, receiver, nbytes: int, mbps: float):
        """Hold the sender's and the receiver's link for the bytes' time at `mbps`."""
        with sender.request() as sending:
            yield sending
            with receiver.request() as receiving:
                yield receiving
                yield self.env.timeout(self._seconds(nbytes, mbps))

    def _from_registry(self, node: int, nbytes: int):
        yield self.env.timeout(self.p.registry_request_s)
        yield from self._cpu(node, 1, nbytes)
        rate = min(self.p.registry_mbps, self.p.host_mbps)
        yield from self._transfer(self.registry_link, self.down[node], nbytes, rate)
        self.registry_bytes += nbytes

    # Blocks

    def parent(self, node: int) -> int:
        return (node - 1) // self.p.fanout  # breadth first: root 0; hosts 1..N

    def block(self, node: int, block, size: int | None = None):
        """Make `block` (`size` bytes, default a trace block) present at `node`, fetching it
        through its ancestors, and wait for it."""
        cache = self.caches[node]
        event = cache.get(block)
        if event is None:
            event = cache[block] = self.env.event()
            self.env.process(self._fill(node, block, size or self.trace.block_size, event))
        yield event

    def _fill(self, node: int, block, size: int, event):
        if node == 0 or self.p.mode in ("direct", "tgz"):
            yield from self._from_registry(node, size)
        else:
            parent = self.parent(node)
            yield from self.block(parent, block, size)
            yield self.env.timeout(self.p.request_s)
            yield from self._cpu(node, 1, size)
            yield from self._transfer(self.up[parent], self.down[node], size, self.p.host_mbps)
        event.succeed()

    def blocks(self, node: int, blocks: Sequence, think_s: float, size: int | None = None):
        """Read `blocks` in order at `node`, `window` in flight, thinking between them."""
        window = self.p.window
        pending: list = []
        pause = think_s / max(len(blocks), 1)
        for block in blocks:
            pending.append(self.env.process(self.block(node, block, size)))
            if len(pending) >= window:
                yield pending.pop(0)
                if pause:
                    yield self.env.timeout(pause)
        for fetch in pending:
            yield fetch
            if pause:
                yield self.env.timeout(pause)

    # Starts

    def container(self, node: int, local: bool, begin: float):
        """One container's start; its time counts from `begin`, when its host was told to
        start (a pull before it included)."""
        yield self.env.timeout(self.p.mount_s)
        if self.p.mount_cpu_s:
            with self.cpus[node].request() as slot:
                yield slot
                yield self.env.timeout(self.p.mount_cpu_s)
        if local:  # the device still reads (and decompresses) the start set, from local disk
            yield from self._cpu(node, 0, self.trace.nbytes)
            yield self.env.timeout(self.trace.think_s)
        else:
            yield from self._cpu(node, len(self.trace.blocks), self.trace.nbytes)
            yield from self.blocks(node, self.trace.blocks, self.trace.think_s)
        self.starts.append(self.env.now - begin)

    def host(self, node: int):
        yield self.env.timeout(self.rng.uniform(0, self.p.start_spread_s))
        begin = self.env.now
        mode = self.p.mode
        if mode == "p2p-whole":
            chunk = self.p.whole_chunk_bytes
            full, tail = divmod(self.trace.blob_size, chunk)
            yield from self.blocks(node, [("whole", n) for n in range(full)], 0.0, chunk)
            if tail:
                yield from self.blocks(node, [("whole", full)], 0.0, tail)
        elif mode == "tgz":
            yield from self._pull_tgz(node)
        local = mode in ("p2p-whole", "tgz", "warm")
        starts = [
            self.env.process(self.container(node, local, begin))
            for _ in range(self.p.containers_per_host)
        ]
        yield self.env.all_of(starts)

    def _pull_tgz(self, node: int):
        chunk = 4 * MiB
        remaining = self.p.tgz_bytes
        while remaining > 0:
            piece = min(chunk, remaining)
            yield from self._from_registry(node, piece)
            remaining -= piece
        yield self.env.timeout(self._seconds(self.p.tgz_bytes * 3, self.p.unpack_mbps))

    def run(self) -> SimResult:
        for node in range(1, self.p.hosts + 1):
            self.env.process(self.host(node))
        self.env.run()
        return SimResult(self.p, tuple(self.starts), self.registry_bytes, self.trace.nbytes)


def simulate(params: Params, trace: Trace) -> SimResult:
    """Run one scenario to completion."""
    return _Model(params, trace).run()


def _simulate_row(args: tuple[Params, Trace]) -> dict:
    return simulate(*args).row()


def sweep(
    scenarios: Iterable[Params],
    trace: Trace,
    *,
    ray_address: str | None = None,
    workers: int | None = None,
) -> list[dict]:
    """Rows (`SimResult.row`) of every scenario, in order: locally in a process pool, or on
    the Ray cluster at `ray_address` (``"auto"``, ``"ray://host:10001"``)."""
    jobs = [(params, trace) for params in scenarios]
    if ray_address is not None:
        return _sweep_on_ray(jobs, ray_address)
    if workers == 1 or len(jobs) <= 1:
        return [_simulate_row(job) for job in jobs]
    with ProcessPoolExecutor(workers or min(len(jobs), os.cpu_count() or 1)) as pool:
        return list(pool.map(_simulate_row, jobs))


def _sweep_on_ray(jobs: list[tuple[Params, Trace]], address: str) -> list[dict]:
    try:
        import ray
    except ImportError as exc:
        raise WorkbenchError(
            "ray is not installed; pip install 'ray[default]' to sweep on a cluster, or drop "
            "the Ray address to sweep locally"
        ) from exc
    ray.init(address=address, ignore_reinit_error=True)
    remote = ray.remote(_simulate_row)
    return ray.get([remote.remote(job) for job in jobs])


# Calibration ---------------------------------------------------------------------------------

CALIBRATED = ("mount_s", "mount_cpu_s", "request_s", "cpu_request_s", "cpu_mib_s")
"""The constants `calibrate` fits; the rest come from the measured runs' set-up."""


@dataclass(frozen=True)
class Calibration:
    """Fitted constants and, per measured run, the measured and predicted mean start."""

    base: Params
    rows: tuple[dict, ...]
    fitted_on: tuple[tuple[str, int], ...]

    @property
    def max_error(self) -> float:
        return max(abs(row["error"]) for row in self.rows)

    def table(self):
        import pandas as pd

        return pd.DataFrame(list(self.rows))


def scenario_of(run: dict, base: Params) -> Params:
    """The parameters of a measured run (`Cluster.summary`) on top of `base`."""
    return _scenario(base, run["mode"], run["hosts"], _links(run))


def calibrate(
    runs: Sequence[dict],
    trace: Trace,
    *,
    fit_hosts: Sequence[int] = (1, 2, 3),
    cpu_cores: int = 2,
    rounds: int = 3,
    base: Params | None = None,
    fit_points: Sequence[tuple[str, int]] | None = None,
) -> Calibration:
    """Fit `CALIBRATED` to the runs with `fit_hosts` hosts, or to the (mode, hosts) points
    `fit_points` when given (coordinate search on the mean relative error of the mean
    start), then predict every run."""
    base = base or Params(cpu_cores=cpu_cores, shared_cpu=True, window=4)
    points = measured_points(runs)
    chosen = (
        set(fit_points)
        if fit_points is not None
        else {key for key in points if key[1] in fit_hosts}
    )
    fitting = {key: value for key, value in points.items() if key in chosen}
    if not fitting:
        raise WorkbenchError(f"no measured run matches {sorted(chosen)}; fit on others")

    def loss(params: Params) -> float:
        errors = [
            _error(mode, hosts, seconds, params, trace)
            for (mode, hosts), seconds in fitting.items()
        ]
        return float(np.mean(np.abs(errors)))

    best, best_loss = base, loss(base)
    scale = {
        "mount_s": 0.5,
        "mount_cpu_s": 0.5,
        "request_s": 5e-3,
        "cpu_request_s": 5e-3,
        "cpu_mib_s": 0.05,
    }
    for _round in range(rounds):
        for name in CALIBRATED:
            current = getattr(best, name)
            span = scale[name] / (2**_round)
            for value in np.linspace(max(0.0, current - span), current + span, 9):
                candidate = dataclasses.replace(best, **{name: float(value)})
                candidate_loss = loss(candidate)
                if candidate_loss < best_loss:
                    best, best_loss = candidate, candidate_loss

    rows = []
    for (mode, hosts), (measured, links, repeats) in sorted(points.items()):
        predicted = simulate(_scenario(best, mode, hosts, links), trace).mean_s
        rows.append(
            {
                "mode": mode,
                "hosts": hosts,
                "repeats": repeats,
                "fitted": (mode, hosts) in chosen,
                "measured_s": measured,
                "predicted_s": predicted,
                "error": (predicted - measured) / measured,
            }
        )
    return Calibration(best, tuple(rows), tuple(sorted(chosen)))


def measured_points(
    runs: Sequence[dict],
) -> dict[tuple[str, int], tuple[float, tuple[float, float], int]]:
    """(mode, hosts) -> (median over repeats of the mean start, (host, registry) Mbit/s,
    repeats)."""
    grouped: dict[tuple[str, int], list[dict]] = {}
    for run in runs:
        grouped.setdefault((run["mode"], run["hosts"]), []).append(run)
    points = {}
    for key, group in grouped.items():
        means = [float(np.mean([start["seconds"] for start in run["starts"]])) for run in group]
        points[key] = (float(np.median(means)), _links(group[0]), len(group))
    return points


def _links(run: dict) -> tuple[float, float]:
    """A run's (host, registry) link rates; unshaped counts as 10 Gbit/s."""
    return run.get("mbps") or 10_000.0, run.get("registry_mbps") or 10_000.0


def _scenario(base: Params, mode: str, hosts: int, links: tuple[float, float]) -> Params:
    host_mbps, registry_mbps = links
    return dataclasses.replace(
        base, hosts=hosts, mode=mode, host_mbps=host_mbps, registry_mbps=registry_mbps
    )


def _error(mode: str, hosts: int, point: tuple, params: Params, trace: Trace) -> float:
    measured, links, _repeats = point
    return (simulate(_scenario(params, mode, hosts, links), trace).mean_s - measured) / measured


# The paper's numbers and set-ups -------------------------------------------------------------

PAPER_FIG17 = {
    "pseudo-Slacker": {2: 1.49, 4: 1.48, 8: 1.56, 16: 1.75, 32: 2.33},
    "DADI": {3: 0.72, 12: 0.73, 39: 0.74},
}
"""Fig 17, batch cold start (mean s), read off the paper's plot (spec dadi-evaluation §2, [E])."""

PAPER_FIG20 = {"cold_all_started_s": 4.0, "warm_minus_cold_s": (1.0, 2.0)}
"""Fig 20: 1,000 VMs x 10 containers all started in about 4 s; cold 1-2 s behind warm."""

PAPER_WORDPRESS = {"image_mib": 274, "tgz_mib": 165, "tgz_pull_s": 10.6, "registry_start_s": 2.2}
"""Fig 14's WordPress: DADI LZ4 image, .tgz size and pull time, start from the registry."""

HOST_10GBE = 10_000.0
"""Fig 17's physical hosts (>= 10 GbE)."""
VM_SUSTAINED = 1_500.0
"""Fig 20-21's VMs: 5 Gbit/s burst, 1.5 Gbit/s sustained vNIC."""


def default_trace_path() -> Path:
    """The committed recorded start (datasets/traces/p2p-sample-start.json in the repository)."""
    return Path(__file__).resolve().parents[2] / "datasets" / "traces" / "p2p-sample-start.json"
