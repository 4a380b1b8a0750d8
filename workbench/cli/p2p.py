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
