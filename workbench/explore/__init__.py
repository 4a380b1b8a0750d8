"""Explore the design from a notebook: images, indexes, traced reads, the block cache, figures.

    from workbench import explore

    image = explore.open("config.v1.json")     # or layer files, or a registry reference
    image.layers()                             # one row per layer
    image.merged_index()                       # which layer serves which range
    read = image.read(0, 1 << 20)              # data + every event it caused
    read.served_by(); read.blocks; read.fetches
    with explore.tracing() as trace:           # any code, traced
        ...
    trace.events; trace.summary(); trace.tree()
    explore.plots.segment_map(image)

Everything here wraps the objects the CLI uses (`open_image`, `LayerStack`, `ReadOnlyLayer`,
`SegmentIndex`, the tracing recorder, `BlockCache`/`CachedBlob`, `RegistrySession`); see
`workbench.explore.image`, `.trace`, `.cache` and `.plots`; `.build` makes small ext4
images of this machine's files for the teaching notebooks.
"""

from workbench.explore import build, plots
from workbench.explore.cache import BlobCache, cache_frame, inventory_frame
from workbench.explore.image import Image, open, zfile_blocks
from workbench.explore.trace import Trace, TracedRead, tracing

__all__ = [
    "BlobCache",
    "Image",
    "Trace",
    "TracedRead",
    "build",
    "cache_frame",
    "inventory_frame",
    "open",
    "plots",
    "tracing",
    "zfile_blocks",
]
