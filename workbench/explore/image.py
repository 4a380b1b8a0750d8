"""An image for notebooks: the CLI's `LayerStack`, with its layers and indexes as DataFrames.

`open` takes what a user has at hand and returns an `Image`:

    image = explore.open("config.v1.json")                 # as workbench mount/export do
    image = explore.open(["base.tar", "app.zfile"])        # layer files, bottom first
    image = explore.open("127.0.0.1:5000/demo/app:v1",     # an OverlayBD image in a registry,
                         cache_dir="/tmp/cache")           # read lazily through the cache

An `Image` holds the very objects the CLI uses: `stack` is the `LayerStack` that
`workbench.image.open.open_image` builds, its layers are `ReadOnlyLayer`s (and a
`WritableLayer` on top, if any), remote layers read through a `RegistrySession`'s
`BlockCache`. It adds views:

    image.layers()            one row per layer: tag, wrapping, compression, segments, sizes
    image.layer_index(i)      one layer's own index, in bytes
    image.merged_index()      the merged index: which layer serves each range (tag, name)
    image.segments(o, n)      `LayerStack.segments`: the merged view of a range, gaps included
    image.read(o, n)          a `TracedRead`: the data and every event it caused
    image.cache_state()       per remote layer: blocks present, hits, misses, bytes fetched
    image.blob_cache(i)       a `BlobCache` of one layer: presence map and statistics
    image.zfile_blocks(i)     the jump table of a ZFile layer, one row per block

Layers are named by position (0 = bottom, as in a config's ``lowers``); a layer's name or a
`ReadOnlyLayer` works too. Offsets and lengths in every table are bytes.

Caveats:
- an image opened from a registry reference or with `cache_dir` owns its session and closes
  it with the image; one session per cache directory and process (the cache locks it);
- `merged_index` and `layer_index` of a writable layer rebuild its index (O(its entries));
  fine between writes, not per read (see `workbench.image.stack`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from workbench.errors import ImageConfigError
from workbench.formats.lsmt import SECTOR_SHIFT, SegmentIndex
from workbench.formats.zfile import ZFileReader
from workbench.image.layer import ReadOnlyLayer
from workbench.image.open import UpperMode, open_image
from workbench.image.stack import Layer, LayerStack, WritableUpper
from workbench.tracing import core, report

if TYPE_CHECKING:
    from workbench.explore.cache import BlobCache
    from workbench.explore.trace import TracedRead
    from workbench.registry.session import RegistrySession

__all__ = ["Image", "open"]

log = logging.getLogger(__name__)

LayerKey = int | str | Layer
"""A layer named by position (0 = bottom lower; the upper comes last), by name, or itself."""


def open(  # shadows the builtin on purpose: `explore.open` is the entry point
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str] | Layer],
    *,
    upper: UpperMode | WritableUpper | None = "readonly",
    session: RegistrySession | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    readahead: bool = True,
) -> Image:
    """Open an image from a config, layer files (bottom first) or a registry reference.

    Parameters
    ----------
    source
        A config.v1.json path; a layer file path or a list of them (and/or open layers),
        bottom first; or a registry reference ``host[:port]/name[:tag]`` of an OverlayBD image.
    upper
        For a config: ``"readonly"`` (default: its writes show, nothing is modified),
        ``"writable"`` or ``"none"`` (`open_image`). For layer files: an open writable layer
        to stack on top, or None.
    session
        The `RegistrySession` for remote layers (the caller keeps it); else, with
        `cache_dir`, a new session over that cache directory that the image owns; else the
        process-wide default session.
    readahead
        For a session the image makes: sequential readahead in the block cache.

    Raises
    ------
    ImageConfigError
        When `source` is neither an existing file nor a registry reference.
    """
    owned = None
    if session is None and cache_dir is not None:
        from workbench.registry.session import RegistrySession

        owned = session = RegistrySession(cache_dir, readahead=readahead).start()
    try:
        stack, config, reference = _open_stack(source, upper, session)
    except BaseException:
        if owned is not None:
            owned.close()
        raise
    return Image(stack, config=config, reference=reference, session=session, owns_session=owned)


def _open_stack(
    source: object, upper: object, session: RegistrySession | None
) -> tuple[LayerStack, Path | None, str | None]:
    if isinstance(source, str | os.PathLike) and _is_config(source):
        mode = upper if isinstance(upper, str) else "readonly"
        stack = open_image(source, upper=mode, session=session)  # type: ignore[arg-type]
        return stack, Path(source), None

    if isinstance(source, str | os.PathLike) and not os.path.exists(source):
        return _open_reference(os.fspath(source), upper, session)

    items = [source] if isinstance(source, str | os.PathLike | ReadOnlyLayer) else list(source)
    lowers: list[Layer] = []
    try:
        for item in items:
            lowers.append(
                item if not isinstance(item, str | os.PathLike) else ReadOnlyLayer.open(item)
            )
    except BaseException:
        for layer in lowers:
            if layer not in items:
                layer.close()
        raise
    top = None if isinstance(upper, str) or upper is None else upper
    return LayerStack(lowers, top), None, None


def _is_config(path: str | os.PathLike[str]) -> bool:
    if not os.path.isfile(path):
        return False
    with Path(path).open("rb") as file:
        return file.read(64).lstrip().startswith(b"{")


def _open_reference(
    text: str, upper: object, session: RegistrySession | None
) -> tuple[LayerStack, None, str]:
    from workbench.device.mount import looks_like_reference
    from workbench.registry.image import resolve_image

    if text.endswith(".json") or not looks_like_reference(text):
        raise ImageConfigError(
            f"{text}: no such file, and not a registry reference; pass a config.v1.json, layer "
            "files, or host[:port]/name[:tag]"
        )
    config = resolve_image(text, session)
    return open_image(config, upper="none", session=session), None, text


class Image:
    """A `LayerStack` with notebook views; see the module docstring.

    `stack` is the stack itself: `pread`, `pwrite`, `trim` and `flush` go straight to it.
    """

    def __init__(
        self,
        stack: LayerStack,
        *,
        config: Path | None = None,
        reference: str | None = None,
        session: RegistrySession | None = None,
        owns_session: RegistrySession | None = None,
    ) -> None:
        self.stack = stack
        self.config = config
        self.reference = reference
        self.session = session
        self._owned_session = owns_session

    # The stack, as the CLI uses it ---------------------------------------------------------

    @property
    def name(self) -> str:
        return self.reference or (str(self.config) if self.config else self.stack.name)

    @property
    def size(self) -> int:
        return self.stack.size

    def pread(self, offset: int, length: int) -> bytes:
        return self.stack.pread(offset, length)

    def pwrite(self, offset: int, data: bytes) -> int:
        return self.stack.pwrite(offset, data)

    def trim(self, offset: int, length: int) -> None:
        self.stack.trim(offset, length)

    def flush(self) -> None:
        self.stack.flush()

    def segments(self, offset: int = 0, length: int | None = None) -> pd.DataFrame:
        """`LayerStack.segments`: which layer serves which part of a range, gaps included."""
        return self.stack.segments(offset, length)

    # Layers --------------------------------------------------------------------------------

    def layer(self, key: LayerKey) -> Layer:
        """A layer by position (0 = bottom lower, the upper last), by name, or itself."""
        layers = self.stack.layers
        if isinstance(key, int):
            if not -len(layers) <= key < len(layers):
                raise IndexError(f"layer {key}: the image has {len(layers)} layers (0 = bottom)")
            return layers[key]
        if isinstance(key, str):
            for layer in layers:
                if key in (layer.name, report.short_target(layer.name)):
                    return layer
            names = ", ".join(report.short_target(layer.name) for layer in layers)
            raise KeyError(f"no layer named {key!r}; the layers are {names}")
        return key

    def tag_of(self, layer: Layer) -> int:
        """OverlayBD's tag of a layer: 0 for the topmost lower, n for the writable layer."""
        if layer is self.stack.upper:
            return len(self.stack.lowers)
        return len(self.stack.lowers) - 1 - self.stack.lowers.index(layer)

    def layers(self) -> pd.DataFrame:
        """One row per layer, bottom first (the writable layer, if any, last)."""
        rows = []
        for position, layer in enumerate(self.stack.layers):
            index = layer.index
            zeroed = index.zeroed
            lengths = index.length.astype(np.int64) << SECTOR_SHIFT
            zfile = _zfile_of(layer)
            source = getattr(layer, "source", None)
            rows.append(
                {
                    "position": position,
                    "tag": self.tag_of(layer),
                    "name": report.short_target(layer.name),
                    "kind": "upper" if layer is self.stack.upper else "lower",
                    "wrapping": "+".join(getattr(layer, "wrapping", ())) or "-",
                    "compression": zfile.algorithm if zfile is not None else "-",
                    "segments": len(index),
                    "data_bytes": int(lengths[~zeroed].sum()),
                    "zeroed_bytes": int(lengths[zeroed].sum()),
                    "virtual_size": layer.virtual_size,
                    "blob_bytes": source.size if source is not None else None,
                    "remote": _cached_blob_of(layer) is not None,
                }
            )
        return pd.DataFrame(rows).set_index("position")

    def layer_index(self, key: LayerKey) -> pd.DataFrame:
        """One layer's own index, in bytes: offset, length, end (disk), kind, moffset (file)."""
        layer = self.layer(key)
        return _index_frame(layer.index, {self.tag_of(layer): layer.name}, tag=self.tag_of(layer))

    def merged_index(self) -> pd.DataFrame:
        """The merged index (writable layer included): which layer serves each range."""
        names = {self.tag_of(layer): layer.name for layer in self.stack.layers}
        return _index_frame(self.stack.index, names)

    # Reading, traced -----------------------------------------------------------------------

    def read(self, offset: int, length: int) -> TracedRead:
        """Read [offset, offset + length) of the disk with tracing on; data and events."""
        from workbench.explore.trace import TracedRead

        with (
            core.recording() as recorder,
            core.request("explore.read", self.stack.name, offset, length),
        ):
            data = self.stack.pread(offset, length)
        return TracedRead(data, offset, length, recorder, name=f"read [{offset}, +{length})")

    # ZFile and cache -----------------------------------------------------------------------

    def zfile_blocks(self, key: LayerKey) -> pd.DataFrame:
        """The ZFile jump table of a layer: one row per block (raises if it is not ZFile)."""
        layer = self.layer(key)
        zfile = _zfile_of(layer)
        if zfile is None:
            raise ValueError(
                f"layer {layer.name} is not ZFile-compressed (wrapping: "
                f"{'+'.join(getattr(layer, 'wrapping', ())) or 'none'})"
            )
        return zfile_blocks(zfile)

    def blob_cache(self, key: LayerKey) -> BlobCache:
        """The block cache's state for a remote layer's blob (raises for a local layer)."""
        from workbench.explore.cache import BlobCache

        layer = self.layer(key)
        blob = _cached_blob_of(layer)
        if blob is None:
            raise ValueError(
                f"layer {layer.name} is not read through a block cache; open the image from a "
                "registry (a reference, or a config with remote lowers)"
            )
        return BlobCache(blob, name=report.short_target(layer.name))

    def cache_state(self) -> pd.DataFrame:
        """Per remote layer: blocks present and the cache's counters since it opened."""
        from workbench.explore.cache import blob_row

        rows = []
        for position, layer in enumerate(self.stack.layers):
            blob = _cached_blob_of(layer)
            if blob is not None:
                rows.append({"position": position, **blob_row(blob)})
        return pd.DataFrame(rows).set_index("position") if rows else pd.DataFrame()

    # Lifetime and display ------------------------------------------------------------------

    def close(self) -> None:
        """Close the stack (and the session, when the image made it)."""
        try:
            self.stack.close()
        finally:
            if self._owned_session is not None:
                self._owned_session.close()
                self._owned_session = None

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        upper = self.stack.upper
        return (
            f"Image({self.name!r}: {len(self.stack.lowers)} lowers, "
            f"upper {'none' if upper is None else report.short_target(upper.name)}, "
            f"{self.size} bytes, {len(self.stack.ro_index)} merged segments)"
        )

    def _repr_html_(self) -> str:
        from workbench.explore.html import card, human_bytes

        upper = self.stack.upper
        fields = {
            "virtual size": human_bytes(self.size),
            "lowers": len(self.stack.lowers),
            "upper": "none" if upper is None else upper.name,
            "merged segments": len(self.stack.ro_index),
        }
        if self.session is not None and self.session.cache is not None:
            fields["block cache"] = str(self.session.cache.directory)
        return card(f"Image {self.name}", fields, self.layers(), max_rows=12)


def zfile_blocks(zfile: ZFileReader) -> pd.DataFrame:
    """One row per block of a ZFile: where it lives compressed, and what it decompresses to.

    Columns: ``block``, ``offset`` (of the decompressed content), ``stored_offset`` and
    ``stored_length`` (bytes in the compressed file, CRC included), ``ratio``
    (stored / original).
    """
    starts = zfile.block_offsets().astype(np.int64)
    stored = np.diff(starts)
    count = len(stored)
    original = np.full(count, zfile.block_size, dtype=np.int64)
    if count:
        original[-1] = zfile.size - (count - 1) * zfile.block_size
    return pd.DataFrame(
        {
            "block": np.arange(count),
            "offset": np.arange(count, dtype=np.int64) * zfile.block_size,
            "stored_offset": starts[:-1],
            "stored_length": stored,
            "ratio": stored / np.maximum(original, 1),
        }
    )


def _index_frame(
    index: SegmentIndex, names: dict[int, str], tag: int | None = None
) -> pd.DataFrame:
    """An index in bytes: offset, length, end, kind, moffset (-1 if zeroed), tag, layer."""
    zeroed = index.zeroed
    offset = index.offset.astype(np.int64) << SECTOR_SHIFT
    length = index.length.astype(np.int64) << SECTOR_SHIFT
    tags = (
        np.full(len(index), tag, dtype=np.int64) if tag is not None else index.tag.astype(np.int64)
    )
    return pd.DataFrame(
        {
            "offset": offset,
            "length": length,
            "end": offset + length,
            "kind": np.where(zeroed, "zeroed", "data"),
            "moffset": np.where(zeroed, -1, index.moffset.astype(np.int64) << SECTOR_SHIFT),
            "tag": tags,
            "layer": [report.short_target(names.get(int(t), "?")) for t in tags],
        }
    )


def _zfile_of(layer: Layer) -> ZFileReader | None:
    file = getattr(layer, "file", None)
    return file if isinstance(file, ZFileReader) else None


def _cached_blob_of(layer: Layer):  # -> CachedBlob | None
    return getattr(getattr(layer, "source", None), "blob", None)
