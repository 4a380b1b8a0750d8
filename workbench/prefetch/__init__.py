"""Trace-based prefetch: record the block accesses of a container start, replay them later.

The DADI paper's startup acceleration (section 4.4, Fig 16) in OverlayBD's own trace file
format (`workbench.prefetch.tracefile`, spec section 5), so a trace recorded here replays in
OverlayBD and back. Three modes, all run by the FUSE server of a mount:

- **record**: every read of a lower layer is appended to the trace while the image is mounted;
  the trace file is written at unmount, or when ``TRACE.lock`` is deleted (then ``TRACE.ok``
  appears), the way ACI's ``ctr record-trace`` drives OverlayBD;
- **replay**: at mount, the recorded reads are fetched through the block cache by
  `concurrency` threads (default 16) while the application runs; its own reads then hit;
- **list** (priority list): a text file of paths; once ext4 is mounted their data extents
  are looked up (FIEMAP) and prefetched the same way.

A trace reaches a mount in one of two ways:

- per application, at run time, without rebuilding the image: a trace file path given at
  mount time. ``PrefetchConfig(trace=PATH)`` decides as ACI's record-trace label does: no
  file or an empty one records into PATH, a trace file replays it, any other text is a
  priority list;
- at build time, in the image: the trace as an acceleration layer on top of the image
  (`workbench.prefetch.layer`); mounting such an image replays it by itself.

Python API (what the Fig 16 study calls)::

    from workbench.device.mount import mount_image, unmount
    from workbench.prefetch import PrefetchConfig

    mount_image(ref, mnt, prefetch=PrefetchConfig.record("app.trace"))  # cold start, recorded
    ... run the application ...; unmount(mnt)                         # app.trace written
    m = mount_image(ref, mnt, prefetch=PrefetchConfig.replay("app.trace", concurrency=16))
    prefetch_status(m)          # {"done": ..., "bytes": ..., "finished": ...} from the server
    wait_for_prefetch(m)        # block until the replay has fetched everything

Command line: ``workbench mount IMAGE MP --record-trace FILE | --replay-trace FILE |
--prefetch-list FILE`` and ``workbench prefetch ...`` (show, layer, status).

Caveats:
- recording and an acceleration layer exclude each other (as in OverlayBD);
- replay warms the cache; a cache too small for the trace evicts what it prefetched first.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from workbench.prefetch.runtime import DEFAULT_CONCURRENCY
from workbench.prefetch.tracefile import TraceFile, TraceRecord, classify

if TYPE_CHECKING:
    from workbench.device.mount import Mount

__all__ = [
    "DEFAULT_CONCURRENCY",
    "PrefetchConfig",
    "TraceFile",
    "TraceRecord",
    "classify",
    "prefetch_status",
    "wait_for_prefetch",
]

Mode = Literal["auto", "record", "replay", "list"]


@dataclass(frozen=True)
class PrefetchConfig:
    """What a mount does with a trace: record it, replay it, or prefetch a list of paths.

    ``mode="auto"`` decides from the file at mount time (`classify`).
    """

    trace: str
    mode: Mode = "auto"
    concurrency: int = DEFAULT_CONCURRENCY

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "record", "replay", "list"):
            raise ValueError(f"prefetch mode {self.mode!r}: expected auto, record, replay or list")
        if self.concurrency < 1:
            raise ValueError(f"prefetch concurrency must be >= 1, not {self.concurrency}")

    @classmethod
    def record(cls, trace: str | os.PathLike[str]) -> PrefetchConfig:
        return cls(os.path.abspath(trace), "record")

    @classmethod
    def replay(
        cls, trace: str | os.PathLike[str], concurrency: int = DEFAULT_CONCURRENCY
    ) -> PrefetchConfig:
        return cls(os.path.abspath(trace), "replay", concurrency)

    @classmethod
    def priority_list(
        cls, path: str | os.PathLike[str], concurrency: int = DEFAULT_CONCURRENCY
    ) -> PrefetchConfig:
        return cls(os.path.abspath(path), "list", concurrency)

    def resolved(self) -> PrefetchConfig:
        """The same config with ``auto`` replaced by what the file asks for now."""
        if self.mode != "auto":
            return self
        return PrefetchConfig(os.path.abspath(self.trace), classify(self.trace), self.concurrency)


def prefetch_status(mount: Mount) -> dict[str, Any] | None:
    """What the mount's prefetcher (or recorder) has done so far; None if it has none."""
    import json

    from workbench.device.introspect import query

    return json.loads(query(mount.control, "prefetch"))


def wait_for_prefetch(mount: Mount, timeout: float = 120.0) -> dict[str, Any] | None:
    """Poll the mount's prefetch status until it is finished; its last status."""
    deadline = time.monotonic() + timeout
    while True:
        status = prefetch_status(mount)
        if status is None or status.get("finished") or time.monotonic() > deadline:
            return status
        time.sleep(0.05)
