"""`workbench registry`: the embedded OCI registry, and OverlayBD images pushed to registries.

`serve DIR` runs the embedded registry in the foreground. The first line on stdout is
"serving DIR at http://HOST:PORT" (flushed), so scripts that ask for port 0 learn the port the
kernel chose. Ctrl-C (SIGINT) or SIGTERM stops the server and exits 0.

`push CONFIG REF` pushes the lowers of a config.v1.json as an OverlayBD image and prints the
manifest digest; `config REF` prints (or writes) the config.v1.json that reads an OverlayBD
image from its registry (`workbench.registry.image`).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import click

from workbench.blobs.cache import default_cache_dir
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
    """The embedded OCI registry, and OverlayBD images pushed to and resolved from registries."""


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


_credentials_option = click.option(
    "--credentials",
    type=click.Path(exists=True, dir_okay=False),
    help="A docker config.json or OverlayBD cred.json with the registry's credentials.",
)
_platform_option = click.option(
    "--platform",
    default="linux/amd64",
    show_default=True,
    help="os/arch[/variant] of the image.",
)


@registry.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("ref")
@click.option(
    "--fs-type",
    default="ext4",
    show_default=True,
    help="Filesystem on the image's disk, written to each layer's blob-fs-type annotation.",
)
@_platform_option
@_credentials_option
def push(config: Path, ref: str, fs_type: str, platform: str, credentials: str | None) -> None:
    """Push the lowers of CONFIG (a config.v1.json) to REF as an OverlayBD image.

    Each lower becomes a layer blob, as stored (normally tar around ZFile), with the
    OverlayBD annotations; an OCI image config and manifest follow, tagged as REF says
    (HOST[:PORT]/REPOSITORY:TAG). Blobs the repository has are not uploaded again. Prints
    the manifest digest. The writable layer, if the config has one, is not pushed.
    """
    from workbench.registry.image import push_image
    from workbench.registry.session import RegistrySession

    with RegistrySession(use_cache=False, credentials=credentials) as session:
        digest = push_image(config, ref, session, fs_type=fs_type, platform=platform)
    click.echo(digest)


@registry.command("config")
@click.argument("ref")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the config.v1.json here instead of printing it.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Also open the image through the registry (layer headers and indexes only) and "
    "print its virtual size to stderr.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help=f"Block cache directory for --check (default: $WORKBENCH_CACHE_DIR or "
    f"{default_cache_dir()}).",
)
@_platform_option
@_credentials_option
def config_command(
    ref: str,
    output: Path | None,
    check: bool,
    cache_dir: str | None,
    platform: str,
    credentials: str | None,
) -> None:
    """Print the config.v1.json that reads the OverlayBD image REF from its registry.

    The lowers are the image's layers, bottom first, as remote blobs (digest and size) under
    repoBlobUrl; there is no upper. An image that is not OverlayBD (a plain OCI image, a
    TurboOCI image) is refused with the reason.
    """
    from workbench.image.open import open_image
    from workbench.registry.image import resolve_image
    from workbench.registry.session import RegistrySession

    session = RegistrySession(cache_dir, use_cache=check, credentials=credentials)
    with session:
        image_config = resolve_image(ref, session, platform)
        if check:
            with open_image(image_config, upper="none", session=session) as image:
                click.echo(
                    f"{ref}: {len(image_config.lowers)} layers, virtual size {image.size}",
                    err=True,
                )

    if output is None:
        click.echo(image_config.dumps(), nl=False)
    else:
        image_config.dump(output)
