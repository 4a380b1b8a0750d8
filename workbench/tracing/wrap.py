"""A tracing layer that wraps any random-access file from outside."""

from __future__ import annotations

import time

from workbench.blobs.common import FileWrapper, RandomAccessFile
from workbench.tracing import core

__all__ = ["TracedFile"]


class TracedFile(FileWrapper):
    """Forward reads to `inner` and emit one `read` event per call, under `layer`.

    For layers that do not trace themselves (a plain local file, a test double), or to see
    what one layer asks of the layer below it.
    """

    def __init__(self, inner: RandomAccessFile, layer: str = "blob") -> None:
        super().__init__(inner)
        self.layer = layer

    def pread(self, offset: int, length: int) -> bytes:
        recorder = core.recorder
        if recorder is None:
            return self.inner.pread(offset, length)

        start_ns = time.perf_counter_ns()
        data = self.inner.pread(offset, length)
        recorder.emit(self.layer, "read", self.name, offset, length, start_ns, len(data))
        return data
