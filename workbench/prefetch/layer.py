"""The acceleration layer: a trace file shipped in the image, as its top layer.

What ACI's ``ctr record-trace`` builds (spec sections 4.3 and 5): a plain tar holding one
file, ``trace`` (mode 0444), pushed as the image's top layer with the annotation
``containerd.io/snapshot/overlaybd/acceleration-layer: "yes"`` beside the usual blob
annotations. The snapshotter appends it as the last lower of the config and sets
``accelerationLayer``; the block device leaves that lower out of the disk and replays its
trace at start. Here:

    build_trace_layer(trace, "accel.tar")             the layer blob
    with_acceleration_layer(config, "accel.tar")      the config with it on top
    push_image(that config, reference)                pushes it with the annotation
                                                      (`workbench.registry.image`)
    read_acceleration_trace(config)                   what the FUSE server replays

The tar is deterministic (mtime 0, owner 0, no user names), so the same trace gives the same
layer digest.

Caveats:
- an image has one acceleration layer at most, and recording is refused for an image that has
  one (OverlayBD: recording and accelerationLayer are mutually exclusive);
- a remote acceleration layer is read whole (it is a few KiB to a few MiB).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.errors import ImageConfigError
from workbench.formats.config import ImageConfig, LowerConfig, RemoteBlob
from workbench.prefetch.tracefile import TraceFile

if TYPE_CHECKING:
    from workbench.registry.session import RegistrySession

__all__ = [
    "TRACE_MEMBER",
    "build_trace_layer",
    "read_acceleration_trace",
    "trace_from_tar",
    "with_acceleration_layer",
]

TRACE_MEMBER = "trace"
"""The one file of an acceleration layer."""


def build_trace_layer(trace: str | os.PathLike[str], out: str | os.PathLike[str]) -> int:
    """Write the acceleration layer of `trace` (checked first) to `out`; returns its size."""
    data = Path(trace).read_bytes()
    TraceFile.from_bytes(data, os.fspath(trace))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo(TRACE_MEMBER)
        info.size = len(data)
        info.mode = 0o444
        info.mtime = 0
        archive.addfile(info, io.BytesIO(data))
    Path(out).write_bytes(buffer.getvalue())
    return len(buffer.getvalue())


def with_acceleration_layer(config: ImageConfig, layer: str | os.PathLike[str]) -> ImageConfig:
    """A copy of `config` with the acceleration layer file `layer` as its top lower."""
    if config.acceleration_layer:
        raise ImageConfigError(
            "the config already has an acceleration layer (accelerationLayer is set); build "
            "the new one on the config without it"
        )
    import dataclasses

    # Paths made absolute, so the new config may be written anywhere.
    lowers = [
        dataclasses.replace(
            lower,
            file=str(config.resolve_path(lower.file)) if lower.file else "",
            dir=str(config.resolve_path(lower.dir)) if lower.dir else "",
        )
        for lower in config.lowers
    ]
    lowers.append(LowerConfig(file=os.path.abspath(layer)))
    return dataclasses.replace(config, lowers=lowers, acceleration_layer=True)


def trace_from_tar(data: bytes, name: str) -> TraceFile:
    """The trace held by an acceleration layer's tar."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            member = archive.extractfile(TRACE_MEMBER)
            if member is None:
                raise KeyError(TRACE_MEMBER)
            return TraceFile.from_bytes(member.read(), f"{name}:{TRACE_MEMBER}")
    except (tarfile.TarError, KeyError) as exc:
        raise ImageConfigError(
            f"{name}: the acceleration layer is not a tar holding a file {TRACE_MEMBER!r} "
            f"({exc}); rebuild it with `workbench prefetch layer`"
        ) from exc


def read_acceleration_trace(
    config: ImageConfig, session: RegistrySession | None = None
) -> TraceFile | None:
    """The trace of the config's acceleration layer, or None if it has none."""
    if not config.acceleration_layer or not config.lowers:
        return None
    lower = config.lowers[-1]
    if lower.dir:
        folder = config.resolve_path(lower.dir)
        if (folder / TRACE_MEMBER).is_file():
            return TraceFile.load(folder / TRACE_MEMBER)
    source = config.resolve_lower(lower)
    if isinstance(source, RemoteBlob):
        from workbench.registry.session import default_session

        active = session if session is not None else default_session()
        with active.open_blob(source.repo_blob_url, source.digest, source.size or None) as blob:
            return trace_from_tar(blob.pread(0, blob.size), source.url)
    return trace_from_tar(Path(source).read_bytes(), str(source))
