"""`workbench bench snapshotter`: gRPC cost per call and container start, against baselines.

One run builds the busybox image of `workbench.snapshotter.images` twice (OverlayBD and
OCI), pushes both to an embedded registry, and starts two workbench snapshotters (one with
autoRemoveDev, one keeping devices: ``--keep-devices``) and a private containerd that
knows them as ``workbench`` and ``workbench-keep``. The OCI image is pulled for containerd's
own ``overlayfs`` snapshotter and for ``workbench``, the OverlayBD image with `rpull` for
both workbench snapshotters. Then, each figure with its baseline measured in the same run:

gRPC per call (`calls` round trips each, median and p90):
- an empty gRPC call (bytes in, bytes out) to a Python grpcio server in another process,
  on a unix socket as the snapshotter: the floor of any Python gRPC server; Stat and
  Mounts sent straight to the snapshotter's socket are shown against it;
- Stat and Mounts through containerd's snapshots API (what containerd's clients pay):
  ``snapshotter=workbench`` (containerd's proxy forwards to the Python server) against
  ``snapshotter=overlayfs`` (containerd's own, in its process).

Container start on a warm image (`starts` runs of ``ctr run --rm IMAGE ID /bin/true`` per
variant, the variants taking turns, each run once before timing; median wall time): the OCI
image on ``overlayfs`` is the baseline; against it the OCI image on ``workbench``, and the
OverlayBD image on ``workbench`` (its device attached at every start, block cache warm) and
on ``workbench-keep`` (the device stays attached between containers).

Caveats:
- needs root, FUSE, containerd and runc; a shared 2-vCPU machine makes every wall time
  noisy (medians of interleaved runs, ratios rather than seconds);
- ``ctr run`` is a Go process start, a task through the runc shim and a delete: most of a
  container start is not the snapshotter's; the ratios say how much the snapshotter adds;
- the Mounts call through containerd is measured on an active snapshot made with Prepare
  through the same API (its key is removed afterwards).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from workbench.bench.formats import Table

__all__ = ["SnapshotterBenchmark", "bench_snapshotter"]

log = logging.getLogger(__name__)

NAMESPACE = "bench"
AUTO, KEEP = "workbench", "workbench-keep"


@dataclass
class SnapshotterBenchmark:
    calls: int = 1000
    """Round trips per gRPC figure."""
    starts: int = 7
    """Container starts per variant (median kept)."""

    @classmethod
    def quick(cls) -> SnapshotterBenchmark:
        return cls(calls=200, starts=3)


@dataclass
class _Setup:
    containerd: Any
    snapshotters: dict[str, Any]
    oci: str
    obd: str
    chain_id: str
    """The OCI image's chain ID (its one layer), in overlayfs and workbench."""


def bench_snapshotter(
    settings: SnapshotterBenchmark,
    workdir: str | Path | None = None,
    out: TextIO | None = None,
) -> list[Table]:
    """Run the benchmark (see the module docstring); the tables, also printed to `out`."""
    from workbench.snapshotter import peer

    reason = peer.missing()
    if reason is not None:
        raise peer.ContainerdError(f"bench snapshotter: {reason}")

    with _environment(workdir) as setup:
        tables = [_grpc_table(setup, settings), _start_table(setup, settings)]
    for table in tables:
        if out is not None:
            print(table.render(), file=out)
            print(file=out)
    return tables


# ---------------------------------------------------------------------------------------------
# The environment


@contextlib.contextmanager
def _environment(workdir: str | Path | None) -> Iterator[_Setup]:
    from workbench.registry.image import push_image
    from workbench.registry.server import EmbeddedRegistry
    from workbench.snapshotter import images, peer
    from workbench.snapshotter.client import ContainerdClient
    from workbench.snapshotter.rpull import chain_ids, rpull

    base = Path(tempfile.mkdtemp(prefix="wb-bench-snapshotter-", dir=workdir or "/var/tmp"))
    sockets = Path(tempfile.mkdtemp(prefix="wbsn-", dir="/tmp"))
    snapshotters: dict[str, Any] = {}
    try:
        tree = images.busybox_tree(base / "rootfs")
        config = images.overlaybd_layer(tree, base / "overlaybd")
        layer = images.oci_layer(tree)
        with EmbeddedRegistry(base / "registry") as registry:
            host = registry.url.removeprefix("http://")
            oci, obd = f"{host}/bench/oci:v1", f"{host}/bench/obd:v1"
            images.push_oci_image(layer, oci)
            push_image(config, obd)

            for name, options in ((AUTO, ()), (KEEP, ("--keep-devices",))):
                snapshotters[name] = peer.SnapshotterProcess(
                    base / name, sockets / f"{name}.sock", *options
                ).start()
            proxies = {name: str(process.socket) for name, process in snapshotters.items()}
            with peer.containerd(base / "containerd", proxies, debug=False) as daemon:
                for snapshotter in ("overlayfs", AUTO):
                    daemon.ctr(
                        NAMESPACE, "image", "pull", "--plain-http", "--snapshotter", snapshotter,
                        oci, timeout=300,
                    )  # fmt: skip
                with ContainerdClient(daemon.socket, NAMESPACE) as client:
                    for name in (AUTO, KEEP):
                        rpull(obd, client, name)
                import hashlib

                chain_id = chain_ids(["sha256:" + hashlib.sha256(layer[0]).hexdigest()])[-1]
                try:
                    yield _Setup(daemon, snapshotters, oci, obd, chain_id)
                finally:
                    _remove_all(daemon)
    finally:
        for process in snapshotters.values():
            process.stop()
        _cleanup_devices(base)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)


def _remove_all(daemon: Any) -> None:
    for container in daemon.ctr(NAMESPACE, "containers", "ls", "-q").split():
        daemon.ctr(NAMESPACE, "containers", "rm", container)
    images = daemon.ctr(NAMESPACE, "image", "ls", "-q").split()
    if images:
        daemon.ctr(NAMESPACE, "image", "rm", "--sync", *images, timeout=300)


def _cleanup_devices(base: Path) -> None:
    """Whatever a snapshotter left mounted (a failed run): its devices, then its mounts."""
    from workbench.device.mount import unmount_all

    for name in (AUTO, KEEP):
        if (base / name / "run").exists():
            unmount_all(base / name / "run")
    subprocess.run(["umount", "-R", "-l", str(base)], capture_output=True)


# ---------------------------------------------------------------------------------------------
# gRPC per call


def _grpc_table(setup: _Setup, settings: SnapshotterBenchmark) -> Table:
    from workbench.snapshotter.client import ContainerdClient

    table = Table(
        "gRPC per call (round trip, this process as the client)",
        ["call", "median us", "p90 us", "ratio", "baseline"],
    )
    with _empty_server() as empty_call:
        floor = _latencies(settings.calls, empty_call)
    table.rows.append(["empty gRPC call (Python server)", *_us(floor), 1.0, "itself"])

    # Straight to the snapshotter's socket.
    direct = ContainerdClient(setup.snapshotters[AUTO].socket)
    pb = direct.api.snapshots
    try:
        committed = next(name for name, kind in setup.snapshotters[AUTO].snapshots() if kind == 3)
        stat = _latencies(
            settings.calls, lambda: direct.snapshots.Stat(pb.StatSnapshotRequest(key=committed))
        )
        table.rows.append(
            ["Stat, snapshotter socket", *_us(stat), _ratio(stat, floor), "empty call"]
        )
        direct.snapshots.Prepare(pb.PrepareSnapshotRequest(key="bench-direct", parent=committed))
        try:
            mounts = _latencies(
                settings.calls,
                lambda: direct.snapshots.Mounts(pb.MountsRequest(key="bench-direct")),
            )
        finally:
            direct.snapshots.Remove(pb.RemoveSnapshotRequest(key="bench-direct"))
        table.rows.append(
            ["Mounts, snapshotter socket", *_us(mounts), _ratio(mounts, floor), "empty call"]
        )
    finally:
        direct.close()

    # Through containerd: its own overlayfs against the proxied workbench snapshotter.
    with ContainerdClient(setup.containerd.socket, NAMESPACE) as client:
        pb = client.api.snapshots
        results: dict[str, dict[str, list[float]]] = {}
        for snapshotter in ("overlayfs", AUTO):

            def stat_call(name: str = snapshotter) -> None:
                client.snapshots.Stat(pb.StatSnapshotRequest(snapshotter=name, key=setup.chain_id))

            key = f"bench-active-{snapshotter}"
            # A gc.root label, or containerd's collector may take it (it has no lease).
            labels = {"containerd.io/gc.root": "bench"}
            client.snapshots.Prepare(
                pb.PrepareSnapshotRequest(
                    snapshotter=snapshotter, key=key, parent=setup.chain_id, labels=labels
                )
            )
            try:

                def mounts_call(name: str = snapshotter, key: str = key) -> None:
                    client.snapshots.Mounts(pb.MountsRequest(snapshotter=name, key=key))

                results[snapshotter] = {
                    "Stat": _latencies(settings.calls, stat_call),
                    "Mounts": _latencies(settings.calls, mounts_call),
                }
            finally:
                client.snapshots.Remove(pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=key))
        for call in ("Stat", "Mounts"):
            own, proxied = results["overlayfs"][call], results[AUTO][call]
            table.rows.append([f"{call}, containerd -> overlayfs", *_us(own), 1.0, "itself"])
            table.rows.append(
                [
                    f"{call}, containerd -> workbench",
                    *_us(proxied),
                    _ratio(proxied, own),
                    "overlayfs",
                ]
            )
    table.notes.append(f"{settings.calls} calls per row; ratio = median / median of the baseline")
    return table


_EMPTY_SERVER = """
import sys
from concurrent import futures
import grpc
server = grpc.server(futures.ThreadPoolExecutor(8))
handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"")
generic = grpc.method_handlers_generic_handler("bench.Empty", {"Call": handler})
server.add_generic_rpc_handlers([generic])
server.add_insecure_port("unix:" + sys.argv[1])
server.start()
sys.stdin.read()
server.stop(0)
"""
"""A grpcio server with one empty method, in a child process like the snapshotter; it stops
when its stdin closes."""


@contextlib.contextmanager
def _empty_server() -> Iterator[Callable[[], None]]:
    """A call to an empty unary method of a grpcio server in another process (unix socket)."""
    import grpc

    folder = Path(tempfile.mkdtemp(prefix="wbgrpc-", dir="/tmp"))
    socket_path = folder / "empty.sock"
    server = subprocess.Popen(
        [sys.executable, "-c", _EMPTY_SERVER, str(socket_path)], stdin=subprocess.PIPE
    )
    channel = grpc.insecure_channel(f"unix:{socket_path}")
    method = channel.unary_unary("/bench.Empty/Call")
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield lambda: method(b"", timeout=10)
    finally:
        channel.close()
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


def _latencies(count: int, call: Callable[[], object]) -> list[float]:
    for _ in range(min(20, count)):
        call()  # warm up: connections, caches
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def _us(times: list[float]) -> list[float]:
    ordered = sorted(times)
    return [statistics.median(ordered) * 1e6, ordered[int(len(ordered) * 0.9)] * 1e6]


def _ratio(times: list[float], baseline: list[float]) -> float:
    return statistics.median(times) / statistics.median(baseline)


# ---------------------------------------------------------------------------------------------
# Container start


def _start_table(setup: _Setup, settings: SnapshotterBenchmark) -> Table:
    variants = [
        ("OCI image, overlayfs (containerd's own)", "overlayfs", setup.oci),
        ("OCI image, workbench", AUTO, setup.oci),
        ("OverlayBD image, workbench (device per start)", AUTO, setup.obd),
        ("OverlayBD image, workbench --keep-devices", KEEP, setup.obd),
    ]
    times: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    for round_ in range(settings.starts + 1):
        for label, snapshotter, image in variants:
            started = time.perf_counter()
            setup.containerd.ctr(
                NAMESPACE, "run", "--rm", "--snapshotter", snapshotter, image,
                f"start-{round_}", "/bin/true", timeout=120,
            )  # fmt: skip
            if round_ > 0:  # round 0 warms every variant up
                times[label].append(time.perf_counter() - started)

    table = Table(
        "container start on a warm image (ctr run --rm IMAGE ID /bin/true)",
        ["variant", "median s", "min s", "ratio"],
    )
    baseline = statistics.median(times[variants[0][0]])
    for label, _, _ in variants:
        median = statistics.median(times[label])
        table.rows.append([label, median, min(times[label]), median / baseline])
    table.notes.append(
        f"{settings.starts} runs per variant, taking turns; ratio = median / median of overlayfs"
    )
    return table
