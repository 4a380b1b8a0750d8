"""`workbench blob cat`: read a registry blob, or a range of it, lazily through the cache."""

from __future__ import annotations

import sys

import click

from workbench.blobs.cache import default_cache_dir

CHUNK = 4 << 20


@click.group("blob")
def blob() -> None:
    """Read blobs of an OCI registry lazily (HTTP Range reads through the block cache)."""


@blob.command("cat")
@click.argument("ref")
@click.argument("digest")
@click.option("--offset", type=int, default=0, show_default=True, help="First byte to read.")
@click.option("--length", type=int, default=None, help="Bytes to read (default: to the end).")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help=f"Block cache directory (default: $WORKBENCH_CACHE_DIR or {default_cache_dir()}).",
)
@click.option("--no-cache", is_flag=True, help="Read straight from the registry.")
@click.option(
    "--credentials",
    type=click.Path(exists=True, dir_okay=False),
    help="A docker config.json or OverlayBD cred.json with the registry's credentials.",
)
@click.option("--stats", is_flag=True, help="Print cache and registry statistics to stderr.")
def cat(
    ref: str,
    digest: str,
    offset: int,
    length: int | None,
    cache_dir: str | None,
    no_cache: bool,
    credentials: str | None,
    stats: bool,
) -> None:
    """Write bytes of blob DIGEST of repository REF to standard output.

    REF names the repository as an image reference (127.0.0.1:5000/library/redis) or as a
    blob URL (http://127.0.0.1:5000/v2/library/redis/blobs, config.v1.json's repoBlobUrl).
    Only the requested range is fetched, in blocks that the cache keeps for the next read.
    """
    from workbench.registry.session import RegistrySession

    if offset < 0 or (length is not None and length < 0):
        raise click.BadParameter("--offset and --length must not be negative")

    session = RegistrySession(cache_dir, use_cache=not no_cache, credentials=credentials)
    with session:
        remote = session.open_blob(ref, digest)
        with remote:
            end = remote.size if length is None else min(remote.size, offset + length)
            out = sys.stdout.buffer
            for position in range(offset, end, CHUNK):
                out.write(remote.pread(position, min(CHUNK, end - position)))
            out.flush()
        if stats:
            if session.cache is not None:
                click.echo(str(session.cache.statistics()), err=True)
            click.echo(str(session.client.statistics()), err=True)
