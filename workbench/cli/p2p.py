"""`workbench p2p root|agent|simulate`: DADI's P2P tree as real peers, and its scale model.

`root` and `agent` run one peer (`workbench.p2p.peer`) in the foreground until SIGTERM or
Ctrl-C; the first line on stdout is ``ready URL`` once it serves, and a JSON line of its
counters is printed when it stops. `simulate` runs the discrete-event model
(`workbench.p2p.sim`).

    workbench p2p root --registry http://127.0.0.1:5000 --cache /var/tmp/root --listen :7000
    workbench p2p agent --parent http://127.0.0.1:7000 --cache /var/tmp/a1 --listen :7001
    workbench mount 127.0.0.1:7001/library/app:v1 /mnt/app     # reads through the agent
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import click

from workbench.p2p.peer import DEFAULT_FANOUT, Peer

__all__ = ["p2p"]


@click.group("p2p")
def p2p() -> None:
    """Peer-to-peer blob distribution: a root, agents, and a scale model."""


def _peer_options(command):
    options = [
        click.option(
            "--cache",
            "cache_dir",
            type=click.Path(file_okay=False, path_type=Path),
            required=True,
            help="The peer's persistent block cache (one peer per folder).",
        ),
        click.option(
            "--listen",
            default="127.0.0.1:0",
            show_default=True,
            help="HOST:PORT to serve at (port 0: any free port; :PORT means 0.0.0.0:PORT).",
        ),
        click.option(
            "--advertise",
            default=None,
            help="URL other peers reach this one at (needed with a 0.0.0.0 listen address).",
        ),
        click.option(
            "--refill-kib",
            type=click.IntRange(min=4),
            default=256,
            show_default=True,
            help="Block size fetched and cached, KiB.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@p2p.command("root")
@click.option("--registry", required=True, help="Base URL of the registry (http://host:port).")
@click.option("--fanout", type=click.IntRange(min=1), default=DEFAULT_FANOUT, show_default=True)
@_peer_options
def root(
    registry: str,
    fanout: int,
    cache_dir: Path,
    listen: str,
    advertise: str | None,
    refill_kib: int,
) -> None:
    """Run the root of the P2P trees: the one peer that reads from the registry."""
    peer = Peer(
        "root",
        cache_dir,
        registry=registry,
        listen=_listen(listen),
        advertise=advertise,
        fanout=fanout,
        refill_size=refill_kib << 10,
    )
    _serve(peer)


@p2p.command("agent")
@click.option("--parent", default=None, help="URL of a fixed parent (the root or an agent).")
@click.option("--root", "root_url", default=None, help="URL of the root (default: the parent's).")
@_peer_options
def agent(
    parent: str | None,
    root_url: str | None,
    cache_dir: Path,
    listen: str,
    advertise: str | None,
    refill_kib: int,
) -> None:
    """Run an agent: serves its host and its children from its cache, fills from its parent."""
    if parent is None and root_url is None:
        raise click.UsageError("give --parent URL or --root URL")
    peer = Peer(
        "agent",
        cache_dir,
        parent=parent,
        root=root_url,
        listen=_listen(listen),
        advertise=advertise,
        refill_size=refill_kib << 10,
    )
    _serve(peer)


def _listen(text: str) -> str:
    return f"0.0.0.0{text}" if text.startswith(":") else text


def _serve(peer: Peer) -> None:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with peer:
        click.echo(f"ready {peer.url}")
        sys.stdout.flush()
        stop.wait()
        counters = peer.statistics()
    counters.pop("blobs", None)
    counters.pop("topology", None)
    click.echo(json.dumps(counters))


@p2p.command("record")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--mbps", type=float, default=None, help="Rate of the host's link (default: none).")
@click.option("--registry-mbps", type=float, default=None, help="Registry egress (default: none).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None)
def record(
    out: Path, mbps: float | None, registry_mbps: float | None, workdir: Path | None
) -> None:
    """Record the block trace of one cold start (a host, its agent, the sample image) to OUT.

    OUT is the JSON the scale model replays (`workbench p2p simulate --trace OUT`). Needs
    root, iproute2 and FUSE.
    """
    import tempfile

    from workbench.p2p.cluster import record_trace

    with tempfile.TemporaryDirectory(prefix="wb-p2p-record-", dir=workdir) as scratch:
        trace = record_trace(scratch, out, mbps=mbps, registry_mbps=registry_mbps)
    click.echo(
        f"recorded {len(trace.blocks)} blocks ({trace.nbytes / 2**20:.1f} MiB of a "
        f"{trace.blob_size / 2**20:.1f} MiB blob), {trace.think_s:.3f} s think time, to {out}"
    )


@p2p.command("simulate")
@click.option("--hosts", default="3,12,39", show_default=True, help="Host counts, comma-separated.")
@click.option(
    "--mode",
    "modes",
    default="p2p,direct",
    show_default=True,
    help="Comma-separated: p2p, direct, p2p-whole, tgz, warm.",
)
@click.option("--containers", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--fanout", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--host-mbps", type=float, default=10_000.0, show_default=True)
@click.option("--registry-mbps", type=float, default=10_000.0, show_default=True)
@click.option(
    "--trace",
    "trace_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A recorded start (`workbench p2p record`); default: the committed sample.",
)
@click.option(
    "--scale-mib", type=float, default=None, help="Stretch the trace to this many MiB read."
)
@click.option("--ray", "ray_address", default=None, help="Sweep on this Ray cluster (needs ray).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the rows here.")
def simulate(
    hosts: str,
    modes: str,
    containers: int,
    fanout: int,
    host_mbps: float,
    registry_mbps: float,
    trace_path: Path | None,
    scale_mib: float | None,
    ray_address: str | None,
    json_path: str | None,
) -> None:
    """Simulate a batch cold start of HOSTS hosts x CONTAINERS containers (SimPy model).

    Prints the mean, p99 and slowest start and the registry's bytes per scenario; runs
    locally in a process pool, or on a Ray cluster with --ray ADDRESS.
    """
    from workbench.p2p.sim import MODES, Params, Trace, default_trace_path, sweep

    trace = Trace.from_json(trace_path or default_trace_path())
    if scale_mib is not None:
        trace = trace.scaled(int(scale_mib * 2**20))
    chosen = [mode.strip() for mode in modes.split(",")]
    if unknown := [mode for mode in chosen if mode not in MODES]:
        raise click.BadParameter(f"{unknown} not among {', '.join(MODES)}", param_hint="--mode")
    scenarios = [
        Params(
            hosts=int(count),
            mode=mode,
            containers_per_host=containers,
            fanout=fanout,
            host_mbps=host_mbps,
            registry_mbps=registry_mbps,
        )
        for mode in chosen
        for count in hosts.split(",")
    ]
    rows = sweep(scenarios, trace, ray_address=ray_address)
    click.echo(f"{'mode':>10} {'hosts':>6} {'containers':>10} {'mean s':>8} {'p99 s':>8} "
               f"{'max s':>8} {'registry MB':>12}")  # fmt: skip
    for row in rows:
        click.echo(
            f"{row['mode']:>10} {row['hosts']:>6} {row['containers']:>10} {row['mean_s']:>8.3f} "
            f"{row['p99_s']:>8.3f} {row['max_s']:>8.3f} {row['registry_bytes'] / 1e6:>12.1f}"
        )
    if json_path:
        with open(json_path, "w") as out:
            json.dump(rows, out, indent=1)
