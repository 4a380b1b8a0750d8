"""`workbench registry serve DIR`: the embedded OCI registry in the foreground.

The first line on stdout is "serving DIR at http://HOST:PORT" (flushed), so scripts that ask for
port 0 learn the port the kernel chose. Ctrl-C (SIGINT) or SIGTERM stops the server and exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import click

from workbench.registry.server import EmbeddedRegistry

__all__ = ["registry"]

log = logging.getLogger(__name__)


def parse_addr(addr: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or :PORT (loopback) into (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"{addr!r} is not HOST:PORT (for example 127.0.0.1:5000)")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


@click.group()
def registry() -> None:
    """The embedded OCI registry (distribution API over a local directory)."""


@registry.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--addr",
    default="127.0.0.1:5000",
    show_default=True,
    help="Address to listen on, HOST:PORT; port 0 picks a free one.",
)
def serve(directory: Path, addr: str) -> None:
    """Serve the registry stored in DIRECTORY (created if missing) until interrupted.

    Plain HTTP, no authentication: for loopback use, tests and demos. Clients need their
    insecure switches, e.g. `skopeo copy --dest-tls-verify=false` or `ctr pull --plain-http`.
    """
    host, port = parse_addr(addr)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with EmbeddedRegistry(directory, host=host, port=port) as server:
            click.echo(f"serving {server.storage.root} at {server.url}")
            click.get_text_stream("stdout").flush()
            try:
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                log.info("interrupted")
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {addr}: {exc.strerror or exc}") from exc
    finally:
        signal.signal(signal.SIGTERM, previous)
