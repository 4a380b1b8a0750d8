"""The block cache's state for notebooks: which blocks of a blob are present, and counters.

`BlobCache` looks at one `CachedBlob` (a remote layer's blob, `Image.blob_cache`): its
presence map (one boolean per refill-sized block), its `BlobStatistics`, and a per-block
DataFrame. `cache_frame` gives one row per blob of an open `BlockCache`, and
`inventory_frame` the same for a cache directory nobody holds open (after a mount ended),
read with `workbench.blobs.cache.inventory`.

Caveats:
- the presence map is a snapshot; background readahead may fill blocks right after it;
- counters (hits, misses, bytes fetched) count since the cache was opened in this process;
  a directory's inventory has only what is on disk.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pandas as pd

from workbench.blobs.cache import BlockCache, CachedBlob, inventory

__all__ = ["BlobCache", "blob_row", "cache_frame", "inventory_frame"]


class BlobCache:
    """One blob's cached state: `presence`, `statistics`, `blocks()`."""

    def __init__(self, blob: CachedBlob, name: str | None = None) -> None:
        self.blob = blob
        self.name = name or blob.key

    @property
    def presence(self) -> np.ndarray:
        """One boolean per block, True where present (a snapshot)."""
        return self.blob.presence()

    @property
    def statistics(self):  # -> BlobStatistics
        return self.blob.statistics()

    @property
    def fraction_present(self) -> float:
        lengths = self.blob.block_lengths()
        return float(lengths[self.presence].sum() / max(self.blob.size, 1))

    def blocks(self) -> pd.DataFrame:
        """One row per block: block, offset, length, present."""
        lengths = self.blob.block_lengths()
        return pd.DataFrame(
            {
                "block": np.arange(len(lengths)),
                "offset": np.arange(len(lengths), dtype=np.int64) * self.blob.refill_size,
                "length": lengths,
                "present": self.presence,
            }
        )

    def __repr__(self) -> str:
        presence = self.presence
        return (
            f"BlobCache({self.name}: {int(presence.sum())}/{len(presence)} blocks of "
            f"{self.blob.refill_size >> 10} KiB present, {100 * self.fraction_present:.1f}% "
            f"of {self.blob.size} bytes)"
        )

    def _repr_html_(self) -> str:
        from workbench.explore.html import card, human_bytes, presence_strip

        presence = self.presence
        stats = self.statistics
        fields = {
            "present": f"{int(presence.sum())} of {len(presence)} blocks "
            f"({100 * self.fraction_present:.1f}% of {human_bytes(self.blob.size)})",
            "block size": human_bytes(self.blob.refill_size),
            "hits / misses": f"{stats.hits} / {stats.misses}",
            "fetched": f"{human_bytes(stats.bytes_fetched)} in {stats.fetches} fetches",
        }
        return card(f"BlobCache {self.name}", fields, extra_html=presence_strip(presence))


def blob_row(blob: CachedBlob) -> dict[str, object]:
    """A blob's cache figures as one table row."""
    stats = dataclasses.asdict(blob.statistics())
    present = blob.presence()
    return {
        "key": stats.pop("key"),
        "size": stats.pop("size"),
        "blocks": len(present),
        "present_blocks": int(present.sum()),
        "fraction_present": stats["present_bytes"] / max(blob.size, 1),
        **stats,
    }


def cache_frame(cache: BlockCache) -> pd.DataFrame:
    """One row per blob the open cache has touched: present bytes and counters."""
    rows = [dataclasses.asdict(blob) for blob in cache.statistics().blobs]
    frame = pd.DataFrame(rows)
    if len(frame):
        frame["fraction_present"] = frame.present_bytes / frame["size"].clip(lower=1)
    return frame


def inventory_frame(directory: str | os.PathLike[str]) -> pd.DataFrame:
    """One row per blob a cache directory holds (read without opening the cache)."""
    rows = [
        {**dataclasses.asdict(entry), "fraction_present": entry.fraction_cached}
        for entry in inventory(directory)
    ]
    return pd.DataFrame(rows)
