"""`workbench bench`: benchmarks that print ratios against baselines measured in the same run."""

from __future__ import annotations

import json
import sys

import click

from workbench.cli.units import parse_size


@click.group("bench")
def bench() -> None:
    """Measure the workbench against baselines taken in the same run (ratios, not seconds)."""


@bench.command("formats")
@click.option("--quick", is_flag=True, help="A smoke run of a few seconds (small image, 1 repeat).")
@click.option(
    "--image-size",
    default=None,
    help="Size of the ext4 test image (e.g. 512M, the default; 32M with --quick).",
)
@click.option("--repeats", type=int, default=None, help="Repetitions per timing (best is kept).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON here.")
def formats(
    quick: bool, image_size: str | None, repeats: int | None, json_path: str | None
) -> None:
    """Index lookups, ZFile read throughput and size, and the cost of tracing when off.

    Builds an ext4 image from this machine's /usr with mkfs.ext4, compresses it as ZFile
    with lz4 and zstd in 4 KiB and 32 KiB blocks, and reads it back; each figure is printed
    next to its baseline (the bare codec on the same blocks, OverlayBD's C++ reader, the
    DADI paper's lookup rate, the same code with its tracing hooks removed).
    """
    from workbench.bench.formats import FormatsBenchmark, run

    settings = FormatsBenchmark.quick() if quick else FormatsBenchmark()
    if image_size is not None:
        settings.image_size = parse_size(image_size)
    if repeats is not None:
        settings.repeats = repeats

    tables = run(settings, out=sys.stdout)
    if json_path:
        with open(json_path, "w") as out:
            json.dump([table.to_dict() for table in tables], out, indent=2)


@bench.command("net")
@click.option("--quick", is_flag=True, help="A smoke run of a few seconds.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON here.")
def net(quick: bool, json_path: str | None) -> None:
    """The shaping proxy on loopback: configured vs measured round-trip time and bandwidth.

    Starts a small server and a `workbench shape` proxy in front of it, then measures
    ping-pong RTT and bulk download rate for several settings and the paper's presets;
    each row prints the ratio measured / configured (target: within 10%).
    """
    from workbench.bench.net import NetBenchmark, bench_shape

    tables = bench_shape(NetBenchmark.quick() if quick else NetBenchmark(), out=sys.stdout)
    if json_path:
        with open(json_path, "w") as out:
            json.dump([table.to_dict() for table in tables], out, indent=2)


@bench.command("cache")
@click.option("--quick", is_flag=True, help="A smoke run of a few seconds.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON here.")
def cache(quick: bool, json_path: str | None) -> None:
    """The block cache: hits vs a local file, and the miss path vs one whole-blob fetch.

    Cached reads are timed against reading the same bytes from a plain local file (target
    >= 0.7); a cold sequential read with readahead against one plain fetch of the whole
    blob through the same simulated link (target >= 0.8).
    """
    import tempfile
    from pathlib import Path

    from workbench.bench.cache import CacheBenchmark, bench_cache

    settings = CacheBenchmark.quick() if quick else CacheBenchmark()
    with tempfile.TemporaryDirectory(prefix="wb-bench-cache-") as workdir:
        tables = bench_cache(settings, Path(workdir), out=sys.stdout)
    if json_path:
        with open(json_path, "w") as out:
            json.dump([table.to_dict() for table in tables], out, indent=2)


@bench.command("registry")
@click.option("--quick", is_flag=True, help="A smoke run of some seconds (64 MiB, embedded only).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON here.")
def registry(quick: bool, json_path: str | None) -> None:
    """Lazy registry reads: misses vs one GET, hits vs a local file, random reads vs a ping.

    Runs against the embedded registry and, when installed, Debian's docker-registry, on
    loopback and through the shaping proxy (100 Mbit/s, 10 ms). Targets: a cold sequential
    read with readahead >= 0.8 of one plain GET of the whole blob; cached reads >= 0.7 of a
    local file; 4 KiB misses are printed as latency over an empty request.
    """
    from workbench.bench.registry import RegistryBenchmark, bench_registry

    settings = RegistryBenchmark.quick() if quick else RegistryBenchmark()
    tables = bench_registry(settings, out=sys.stdout)
    if json_path:
        with open(json_path, "w") as out:
            json.dump([table.to_dict() for table in tables], out, indent=2)


@bench.command("device")
@click.option("--quick", is_flag=True, help="A smoke run of well under a minute (32 MiB image).")
@click.option(
    "--image-size",
    default=None,
    help="Size of the ext4 test image (e.g. 768M, the default; 32M with --quick).",
)
@click.option(
    "--compress",
    type=click.Choice(["lz4", "zstd", "none"]),
    default="lz4",
    show_default=True,
    help="How the layer is stored: ZFile lz4 or zstd, or uncompressed.",
)
@click.option("--runtime", type=float, default=None, help="Seconds per fio job (10; 2 quick).")
@click.option("--repeats", type=int, default=None, help="Runs per side (median kept; 3; 1 quick).")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, exists=True),
    help="Folder for the images (default: the system's temporary folder).",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON here.")
def device(
    quick: bool,
    image_size: str | None,
    compress: str,
    runtime: float | None,
    repeats: int | None,
    workdir: str | None,
    json_path: str | None,
) -> None:
    """The mounted image vs the same ext4 on a plain loop device (needs root, fio, FUSE).

    Builds an ext4 image from part of this machine's /usr and mounts it twice: the raw file
    on a plain loop device, and the image imported as an LSMT layer through the workbench
    (FUSE disk file, loop, ext4). Targets, as ratios to the plain loop: sequential read
    >= 0.5, 4 KiB random read IOPS at queue depth 1 and 32 >= 0.25, `du` and `tar` within
    4x; and the handler's own time per 4 KiB cache hit <= 10 us.
    """
    from workbench.bench.device import DeviceBenchmark, bench_device

    settings = DeviceBenchmark.quick() if quick else DeviceBenchmark()
    settings.compress = None if compress == "none" else compress
    if image_size is not None:
        settings.image_size = parse_size(image_size)
    if runtime is not None:
        settings.runtime_s = runtime
    if repeats is not None:
        settings.repeats = repeats

    tables = bench_device(settings, workdir, out=sys.stdout)
    if json_path:
        with open(json_path, "w") as out:
            json.dump([table.to_dict() for table in tables], out, indent=2)


@bench.command("snapshotter")
@click.option("--quick", is_flag=True, help="A smoke run (200 calls, 3 starts per variant).")
@click.option("--calls", type=int, default=None, help="Round trips per gRPC figure (1000).")
@click.option("--starts", type=int, default=None, help="Container starts per variant (7).")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, exists=True),
    help="Folder for images, snapshots and containerd (default: /var/tmp).",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON here.")
def snapshotter(
    quick: bool,
    calls: int | None,
    starts: int | None,
    workdir: str | None,
    json_path: str | None,
) -> None:
    """The proxy snapshotter: gRPC cost per call and container start (needs root, containerd).

    Starts a private containerd with two workbench snapshotters (autoRemoveDev on and off)
    and a busybox image as OCI and as OverlayBD. Prints Stat and Mounts round trips against
    an empty gRPC call and, through containerd, against containerd's own overlayfs; and
    `ctr run --rm` of a warm image on each snapshotter against overlayfs.
    """
    from workbench.bench.snapshotter import SnapshotterBenchmark, bench_snapshotter

    settings = SnapshotterBenchmark.quick() if quick else SnapshotterBenchmark()
    if calls is not None:
        settings.calls = calls
    if starts is not None:
        settings.starts = starts

    tables = bench_snapshotter(settings, workdir, out=sys.stdout)
    if json_path:
        with open(json_path, "w") as out:
            json.dump([table.to_dict() for table in tables], out, indent=2)


@bench.command("prefetch")
@click.option("--quick", is_flag=True, help="A smoke run of well under a minute.")
@click.option("--rtt-ms", type=float, default=None, help="Round-trip time of the link (20).")
@click.option("--mbps", type=float, default=None, help="Rate of the link in Mbit/s (200).")
@click.option("--repeats", type=int, default=None, help="Runs per kind (median kept; 3).")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, exists=True),
    help="Folder for the image (default: the system's temporary folder).",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON here.")
def prefetch(
    quick: bool,
    rtt_ms: float | None,
    mbps: float | None,
    repeats: int | None,
    workdir: str | None,
    json_path: str | None,
) -> None:
    """A cold lazy start with and without trace replay, over a shaped link (needs root, FUSE).

    Records the reads of an application start on a cold mount, then times the same reads
    cold, warm (blocks cached) and cold with the trace replayed at mount, and prints the
    share of the cold-warm gap that replay removes (the paper: about 95%).
    """
    from workbench.bench.prefetch import PrefetchBenchmark, bench_prefetch

    settings = PrefetchBenchmark.quick() if quick else PrefetchBenchmark()
    if rtt_ms is not None:
        settings.rtt_ms = rtt_ms
    if mbps is not None:
        settings.mbps = mbps
    if repeats is not None:
        settings.repeats = repeats
    tables = bench_prefetch(settings, workdir, out=sys.stdout)
    if json_path:
        with open(json_path, "w") as out:
            json.dump([table.to_dict() for table in tables], out, indent=2)


@bench.command("convert")
@click.option("--quick", is_flag=True, help="A smoke run (2 layers of 12 MB).")
@click.option("--layers", type=int, default=None, help="Number of layers (3; 2 quick).")
@click.option("--layer-mb", type=int, default=None, help="MB of tar per layer (100; 12 quick).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON here.")
def convert_bench(
    quick: bool, layers: int | None, layer_mb: int | None, json_path: str | None
) -> None:
    """Conversion throughput (MB of layer tar per second) vs tar -xzf onto ext4, same run.

    Cuts gzip layers from /usr, converts them (OCI layout to OCI layout, ZFile lz4) and
    unpacks the same layers with tar onto an ext4 on a loop device; prints both rates and
    their ratio. Needs root.
    """
    from workbench.bench.convert import ConvertBenchmark, run

    settings = ConvertBenchmark.quick() if quick else ConvertBenchmark()
    if layers is not None:
        settings.layers = layers
    if layer_mb is not None:
        settings.layer_mb = layer_mb
    figures = run(settings, out=sys.stdout)
    if json_path:
        with open(json_path, "w") as out:
            json.dump(figures, out, indent=2)


@bench.command("p2p")
@click.option(
    "--quick", is_flag=True, help="A smoke run: 3 hosts, a 12 MiB image (under a minute)."
)
@click.option("--hosts", default=None, help="Host counts, comma-separated (default 1,2,3,4,5).")
@click.option("--mbps", type=float, default=None, help="Rate of every host's link (default 400).")
@click.option("--registry-mbps", type=float, default=None, help="Registry egress (default 100).")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    help="Folder for the image and the hosts' state (default: a temporary folder).",
)
@click.option("--repeats", type=click.IntRange(min=1), default=None, help="Runs per point (1).")
@click.option("--runs", "runs_path", type=click.Path(dir_okay=False), help="Write the raw runs.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON here.")
def p2p(
    quick: bool,
    hosts: str | None,
    mbps: float | None,
    registry_mbps: float | None,
    workdir: str | None,
    repeats: int | None,
    runs_path: str | None,
    json_path: str | None,
) -> None:
    """N hosts (network namespaces) start one image at once: P2P vs each from the registry.

    Prints registry bytes and mean/slowest start time for both, and the ratios P2P / direct
    measured in the same run (needs root, iproute2, FUSE). Target: registry bytes about 1/N.
    """
    import tempfile
    from pathlib import Path

    from workbench.bench.p2p import P2PBenchmark, bench_p2p

    settings = P2PBenchmark.quick() if quick else P2PBenchmark()
    if hosts is not None:
        settings.hosts = tuple(int(count) for count in hosts.split(","))
    if mbps is not None:
        settings.mbps = mbps or None
    if registry_mbps is not None:
        settings.registry_mbps = registry_mbps or None
    if repeats is not None:
        settings.repeats = repeats
    with tempfile.TemporaryDirectory(prefix="wb-bench-p2p-", dir=workdir) as scratch:
        tables, runs = bench_p2p(settings, Path(scratch), out=sys.stdout)
    if runs_path:
        with open(runs_path, "w") as out:
            json.dump(runs, out, indent=1)
    if json_path:
        with open(json_path, "w") as out:
            json.dump([table.to_dict() for table in tables], out, indent=2)
