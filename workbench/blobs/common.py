"""The random-access file: the one interface every layer of the read path speaks.

A registry blob, a tar payload, a ZFile and an LSMT stack all answer the same question: "give
me `length` bytes at `offset`". Because they share this shape, a layer can wrap any other one,
and a cache, a tracer or a fault injector can sit between two layers without either knowing.

The contract of `pread`:
- `offset` and `length` are non-negative; reading past `size` returns the bytes up to `size`
  (a short read), reading at or after `size` returns `b""`;
- it either returns correct bytes or raises; it never returns bytes it could not verify;
- it is safe to call from several threads at once (reads have no shared cursor).

The interface is synchronous on purpose: decompression and checksums release the GIL, so a pool
of threads reads in parallel, and an asynchronous transport (the FUSE loop on trio) calls it
through `trio.to_thread`. A registry-backed file bridges back to its event loop itself.

An optional capability, `evict(offset, length) -> None`: "forget these bytes; the next read
fetches them again". Files that keep fetched bytes (a cached registry blob) or forward to one
(a tar payload, a registry blob file) have it; plain local and in-memory files do not. A reader
that finds bytes wrong which a checksum below it could not catch (a ZFile block whose CRC fails
although the cache checked what the registry sent) evicts them and reads again, as OverlayBD
does; test for it with `getattr(source, "evict", None)`. Evicting bytes that are not held, or
whose fetch is still running, does nothing.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

__all__ = ["BytesFile", "FileWrapper", "LocalFile", "RandomAccessFile", "read_exact"]


@runtime_checkable
class RandomAccessFile(Protocol):
    """A readable file with a known size and positional reads; see the module docstring."""

    name: str

    @property
    def size(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


def read_exact(source: RandomAccessFile, offset: int, length: int, what: str) -> bytes:
    """Read exactly `length` bytes or raise `CorruptFileError` naming `what` was cut short."""
    data = source.pread(offset, length)
    if len(data) != length:
        from workbench.errors import CorruptFileError

        raise CorruptFileError(
            f"{source.name}: truncated {what}: wanted {length} bytes at offset {offset}, "
            f"the file has {len(data)} (size {source.size}); the file was cut short, "
            "fetch or copy it again"
        )
    return data


class LocalFile:
    """A file on local disk, read with `os.pread` (no shared file position)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = os.fspath(path)
        self._fd = os.open(self.name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        # os.pread itself stops at the end of the file (a short read, b"" past it).
        if length <= 0:
            return b""
        return os.pread(self._fd, length, offset)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> LocalFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalFile({self.name!r}, size={self._size})"


class FileWrapper:
    """A layer over another random-access file that forwards everything to it.

    Subclasses override `pread` to look at the reads (tracing, recording). The optional
    `evict` capability of the inner file is kept, so that wrapping a cached blob does not turn
    off healing above it.
    """

    def __init__(self, inner: RandomAccessFile) -> None:
        self.inner = inner
        self.name = inner.name
        evict = getattr(inner, "evict", None)
        if evict is not None:
            self.evict = evict

    @property
    def size(self) -> int:
        return self.inner.size

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    def close(self) -> None:
        self.inner.close()


class BytesFile:
    """An in-memory file; used by tests and by tools that build a blob before writing it."""

    def __init__(self, data: bytes | bytearray | memoryview, name: str = "<memory>") -> None:
        self.name = name
        self._data = bytes(data)

    @property
    def size(self) -> int:
        return len(self._data)

    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        return self._data[offset : offset + length]

    def close(self) -> None:
        pass

    def __enter__(self) -> BytesFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BytesFile({self.name!r}, size={len(self._data)})"
