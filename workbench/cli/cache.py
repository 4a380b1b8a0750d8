"""`workbench cache stats|clear`: what the persistent block cache holds, and emptying it.

Both commands default to the cache the registry reader uses: `$WORKBENCH_CACHE_DIR`, else
`~/.cache/workbench/blocks`. They only touch directories that carry the cache's marker file.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import click

from workbench.blobs.cache import (
    BlobInventory,
    CacheDirectoryError,
    default_cache_dir,
    inventory,
    remove_blobs,
)

_CACHE_DIR = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The cache directory (default: $WORKBENCH_CACHE_DIR or ~/.cache/workbench/blocks).",
)


@click.group("cache")
def cache() -> None:
    """The persistent block cache of registry blobs (sparse files, one per blob)."""


@cache.command("stats")
@_CACHE_DIR
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def stats(cache_dir: Path | None, as_json: bool) -> None:
    """List the cached blobs (size, bytes present, % cached, last use) and the totals.

    Reads the block tables without locking, so it works while a reader uses the cache.
    """
    directory = cache_dir or default_cache_dir()
    try:
        entries = inventory(directory)
    except CacheDirectoryError as exc:
        raise click.ClickException(str(exc)) from exc

    if as_json:
        click.echo(json.dumps(_as_json(directory, entries), indent=2))
        return
    click.echo(_as_table(directory, entries))


@cache.command("clear")
@_CACHE_DIR
@click.option("--blob", "digest", default=None, help="Remove only this blob (its digest).")
def clear(cache_dir: Path | None, digest: str | None) -> None:
    """Remove every cached blob, or one with --blob; refuses directories it did not create."""
    directory = cache_dir or default_cache_dir()
    try:
        freed = remove_blobs(directory, digest)
    except CacheDirectoryError as exc:
        raise click.ClickException(str(exc)) from exc
    what = f"blob {digest}" if digest else "all blobs"
    click.echo(f"cleared {what} from {directory} ({_size(freed)} freed)")


def _last_use(entry: BlobInventory) -> str:
    if not entry.last_use_ns:
        return "-"
    moment = datetime.datetime.fromtimestamp(entry.last_use_ns / 1e9)
    return moment.isoformat(sep=" ", timespec="seconds")


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _as_table(directory: Path, entries: list[BlobInventory]) -> str:
    lines = [f"cache {directory}: {len(entries)} blobs"]
    if entries:
        width = max(len(entry.key) for entry in entries)
        lines.append(f"{'blob':<{width}}  {'size':>10}  {'present':>10}  {'cached':>7}  last use")
        for entry in entries:
            lines.append(
                f"{entry.key:<{width}}  {_size(entry.size):>10}  "
                f"{_size(entry.present_bytes):>10}  {entry.fraction_cached:>7.1%}  "
                f"{_last_use(entry)}"
            )
    size = sum(entry.size for entry in entries)
    present = sum(entry.present_bytes for entry in entries)
    lines.append(f"total: {_size(present)} present of {_size(size)} in blobs")
    return "\n".join(lines)


def _as_json(directory: Path, entries: list[BlobInventory]) -> dict[str, object]:
    return {
        "directory": str(directory),
        "blobs": [
            {
                "digest": entry.key,
                "size": entry.size,
                "present_bytes": entry.present_bytes,
                "fraction_cached": entry.fraction_cached,
                "refill_size": entry.refill_size,
                "last_use": _last_use(entry),
            }
            for entry in entries
        ],
        "total_size": sum(entry.size for entry in entries),
        "total_present_bytes": sum(entry.present_bytes for entry in entries),
    }
