"""Peel a layer blob: tar wrapping, then ZFile compression, down to the layer file.

OverlayBD opens every lower layer the same way (shared/specs/overlaybd-formats.md, section
0): if the first 512 bytes are a valid ustar header the tar payload is used; if that starts
with the ZFile magic it is decompressed; what remains is the LSMT file (or anything else,
which the caller then rejects). `unwrap` does exactly this and reports which wrappers it
found, outermost first, so `workbench inspect` can show each one.

OverlayBD also wants a valid header digest before it takes a file for a ZFile, and would
pass a corrupt one on raw; we open it as a ZFile and report the damage instead.

Caveats:
- detection looks only at the first 512 bytes of each level, as OverlayBD does; a raw LSMT
  file that happened to start with a valid ustar header would be taken for a tar (the LSMT
  magic makes that impossible for real layer files);
- a tar inside a ZFile, or a ZFile inside a ZFile, is not unwrapped further (OverlayBD does
  not either).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from workbench.blobs.common import LocalFile, RandomAccessFile
from workbench.formats.tar import BLOCK, TarPayload, is_tar
from workbench.formats.zfile import MAGIC0, MAGIC1, ZFileReader

__all__ = ["Unwrapped", "open_blob", "unwrap"]

ZFILE_MAGIC = MAGIC0 + MAGIC1


@dataclass(frozen=True)
class Unwrapped:
    """A blob with its wrappers peeled off.

    `file` is the innermost random-access file (an LSMT file, normally); `layers` names the
    wrappers found, outermost first (``("tar", "zfile")``, ``("zfile",)`` or ``()``);
    `source` is the blob itself, `tar` and `zfile` the wrapper objects when present (their
    `offset`, `header`, `block_offsets()` are what `inspect` shows). Closing closes the
    whole chain.
    """

    file: RandomAccessFile
    layers: tuple[str, ...]
    source: RandomAccessFile
    tar: TarPayload | None = None
    zfile: ZFileReader | None = None

    @property
    def name(self) -> str:
        return self.source.name

    def close(self) -> None:
        # Each wrapper closes the one it wraps, so closing the innermost closes all.
        self.file.close()

    def __enter__(self) -> Unwrapped:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unwrap(source: RandomAccessFile, *, check_crc: bool = True) -> Unwrapped:
    """Detect and open the wrappers of `source`: tar (if a ustar header is at 0), then ZFile.

    Raises the wrapper's errors (`FormatError` family) if a detected wrapper is broken; a
    blob with no wrapper comes back as is.
    """
    current = source
    layers: list[str] = []
    tar: TarPayload | None = None
    zfile: ZFileReader | None = None

    if is_tar(source.pread(0, BLOCK)):
        tar = TarPayload(source)
        current = tar
        layers.append("tar")

    # The ZFile magic alone decides: a ZFile with a corrupt header should fail as a ZFile,
    # with its own error, rather than be passed on raw and fail as "not an LSMT file".
    if current.pread(0, len(ZFILE_MAGIC)) == ZFILE_MAGIC:
        zfile = ZFileReader(current, check_crc=check_crc)
        current = zfile
        layers.append("zfile")

    return Unwrapped(file=current, layers=tuple(layers), source=source, tar=tar, zfile=zfile)


def open_blob(path: str | os.PathLike[str], *, check_crc: bool = True) -> Unwrapped:
    """Open a local blob file and unwrap it; see `unwrap`."""
    source = LocalFile(path)
    try:
        return unwrap(source, check_crc=check_crc)
    except BaseException:
        source.close()
        raise
