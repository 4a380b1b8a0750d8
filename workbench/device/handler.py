"""The block handler: a disk's semantics over a `LayerStack`, for every transport.

A transport (TCMU's SCSI commands, FUSE's byte-range reads and writes) turns its requests into
calls on one `BlockHandler`; the handler holds what they mean for the image:

    read(lba, blocks)                  the merged view, zeros where nothing is mapped
    write(lba, data)                   appended to the writable layer
    unmap(ranges)                      zeroed mappings in the writable layer: the ranges read
                                       as zeros and hide the lowers' data below them
    write_same(lba, blocks, data, unmap=False)
                                       one block repeated; a block of zeros with ``unmap``
                                       becomes a trim, anything else is written
    synchronize_cache()                the writable layer made durable (`WritableLayer.flush`)
    capacity()                         blocks and block size (the virtual size, rounded down)

Addresses are logical blocks of `block_size` bytes (512 or a multiple of it; the stack works
in 512-byte sectors). `read_bytes`, `write_bytes` and `discard_bytes` take byte offsets and
lengths of any alignment, for transports that are not block-aligned (FUSE): the partial
sectors at either end are read, patched and written back whole (read-modify-write).

Errors: `LbaRangeError` for a range past the last block, `ReadOnlyError` for a change to a
read-only image, `ValueError` for a length that is not whole blocks; anything the stack raises
(a `WorkbenchError` such as a registry failure, an `OSError`) passes through unchanged, for the
transport to report (`workbench.device.scsi` turns it into a MEDIUM ERROR).

Concurrency: any number of threads may call the handler at once. Every change takes a range
lock over the sectors it touches (`SectorLocks`), so two changes to the same sector run one
after the other and a read-modify-write never brings back old bytes that a concurrent write to
the same sector had replaced; changes to different sectors do not wait for each other. A range
lock rather than one writer lock because the read half of a read-modify-write may go to a
remote lower layer (a registry fetch of tens of milliseconds): one writer lock would stall
every other write behind it. Reads take no lock: a read racing a write of the same blocks may
see either content (per sector), as on a disk.

Tracing: one ``device`` event per call (op = read, write, unmap, write_same, sync; target =
the handler's name; offset and length in bytes of the disk), around the stack's own events.

Caveats:
- a stack size that is not a multiple of `block_size` loses its tail: the disk ends at the
  last whole block;
- `write_same` of a non-zero block builds at most 1 MiB of repeated data at a time and
  writes it piece by piece; the pieces are not atomic as one command;
- the range lock is held for the whole change, read half included: a read-modify-write stuck
  on a slow registry read holds up later writes to the same sectors (only those).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from workbench.errors import ReadOnlyError, WorkbenchError
from workbench.formats.lsmt import ALIGNMENT
from workbench.image.stack import LayerStack
from workbench.tracing import core as trace

__all__ = ["BlockHandler", "Capacity", "LbaRangeError", "SectorLocks"]

log = logging.getLogger(__name__)

SECTOR = ALIGNMENT
"""Bytes per sector of the stack: LSMT maps whole 512-byte sectors."""

WRITE_SAME_CHUNK = 1 << 20
"""Bytes of repeated data `write_same` builds and writes at a time."""

_SECTOR_MASK = SECTOR - 1

ZERO_DETECT_MIN = 4096
"""The smallest all-zero write that ``detect_zeroes`` turns into a trim: smaller ones would
cut the writable layer's index into many short entries for a few saved bytes."""

_ZEROS = bytes(1 << 20)


class LbaRangeError(WorkbenchError, ValueError):
    """Raised when a request reaches past the last logical block of the disk."""

    def __init__(self, message: str, lba: int) -> None:
        super().__init__(message)
        self.lba = lba


@dataclass(frozen=True)
class Capacity:
    """The disk's size: `blocks` logical blocks of `block_size` bytes."""

    blocks: int
    block_size: int

    @property
    def last_lba(self) -> int:
        """The address of the last block (READ CAPACITY reports this, not the count)."""
        return self.blocks - 1

    @property
    def bytes(self) -> int:
        return self.blocks * self.block_size


class SectorLocks:
    """Exclusive locks over half-open ranges of sectors; overlapping ranges wait for each other.

    Held ranges are kept in a list: a handful of changes are in flight at once (the
    transport's queue depth), so a linear overlap check is cheaper than any tree.
    """

    def __init__(self) -> None:
        self._held: list[tuple[int, int]] = []
        self._changed = threading.Condition()

    def acquire(self, first: int, stop: int) -> None:
        with self._changed:
            while any(first < end and start < stop for start, end in self._held):
                self._changed.wait()
            self._held.append((first, stop))

    def release(self, first: int, stop: int) -> None:
        with self._changed:
            self._held.remove((first, stop))
            self._changed.notify_all()

    @property
    def held(self) -> list[tuple[int, int]]:
        with self._changed:
            return list(self._held)


class _Locked:
    """``with locks.range(first, stop):`` as a small object (no generator on the hot path)."""

    __slots__ = ("_first", "_locks", "_stop")

    def __init__(self, locks: SectorLocks, first: int, stop: int) -> None:
        self._locks, self._first, self._stop = locks, first, stop

    def __enter__(self) -> None:
        self._locks.acquire(self._first, self._stop)

    def __exit__(self, *exc: object) -> None:
        self._locks.release(self._first, self._stop)


class BlockHandler:
    """Block semantics over `stack` (module docstring): the one handler every transport calls.

    Parameters
    ----------
    stack
        The image; the handler does not own it (closing the stack is the caller's job).
    block_size
        Bytes per logical block: 512 or a multiple of it (4096 for a 4Kn disk).
    read_only
        Refuse changes even if the stack could take them; None: read-only exactly when the
        stack has no writable layer (`LayerStack.writable`). True on a writable stack gives a
        write-protected view; False on a read-only stack raises `ReadOnlyError`.
    name
        The handler's name in errors and trace events; defaults to the stack's.
    detect_zeroes
        Store a `write_bytes` whose data is all zeros (and at least `ZERO_DETECT_MIN` bytes,
        sector-aligned) as a trim: zeroed mappings instead of data, as QEMU's
        ``detect-zeroes=unmap``. The disk reads the same either way; the layer stays
        smaller. For transports that cannot pass trims on (FUSE without fallocate).
    """

    def __init__(
        self,
        stack: LayerStack,
        block_size: int = 512,
        read_only: bool | None = None,
        *,
        name: str | None = None,
        detect_zeroes: bool = False,
    ) -> None:
        if block_size <= 0 or block_size % SECTOR:
            raise ValueError(
                f"block size {block_size} is not a positive multiple of {SECTOR} bytes "
                "(the LSMT sector); use 512 or 4096"
            )
        if read_only is None:
            read_only = not stack.writable
        elif not read_only and not stack.writable:
            raise ReadOnlyError(
                f"{stack.name}: a writable handler needs a writable layer on the stack; "
                "open the image with one, or pass read_only=True"
            )
        self.stack = stack
        self.block_size = block_size
        self.read_only = read_only
        self.name = name or stack.name
        self.blocks = stack.size // block_size
        self.size = self.blocks * block_size
        self.locks = SectorLocks()
        self.detect_zeroes = detect_zeroes

    def capacity(self) -> Capacity:
        return Capacity(self.blocks, self.block_size)

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "writable"
        return f"BlockHandler({self.name!r}, {self.blocks} x {self.block_size} bytes, {mode})"

    # Blocks ----------------------------------------------------------------------------

    def read(self, lba: int, blocks: int) -> bytes:
        """`blocks` blocks from `lba` on; zeros where no layer maps them."""
        offset, length = self._byte_range(lba, blocks, "read")
        if length == 0:
            return b""
        recorder = trace.recorder
        if recorder is not None:
            start_ns = time.perf_counter_ns()

        data = self.stack.pread(offset, length)

        if recorder is not None:
            recorder.emit("device", "read", self.name, offset, length, start_ns, len(data))
        return data

    def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        """Write whole blocks at `lba` to the writable layer."""
        blocks = self._whole_blocks(len(data), "write")
        offset, length = self._byte_range(lba, blocks, "write")
        self._check_writable("write")
        if length == 0:
            return
        recorder = trace.recorder
        if recorder is not None:
            start_ns = time.perf_counter_ns()

        with self._lock_bytes(offset, length):
            self.stack.pwrite(offset, bytes(data))

        if recorder is not None:
            recorder.emit("device", "write", self.name, offset, length, start_ns, length)

    def unmap(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Trim every (lba, blocks) range: each reads as zeros and hides the lowers below.

        All ranges are checked before any is trimmed, so a bad one changes nothing.
        """
        byte_ranges = [self._byte_range(lba, blocks, "unmap") for lba, blocks in ranges]
        self._check_writable("unmap")
        recorder = trace.recorder

        for offset, length in byte_ranges:
            if length == 0:
                continue
            if recorder is not None:
                start_ns = time.perf_counter_ns()
            with self._lock_bytes(offset, length):
                self.stack.trim(offset, length)
            if recorder is not None:
                recorder.emit("device", "unmap", self.name, offset, length, start_ns, 0)

    def write_same(
        self, lba: int, blocks: int, data: bytes | bytearray | memoryview, unmap: bool = False
    ) -> None:
        """Write the one block `data` to each of `blocks` blocks from `lba`.

        A block of zeros with `unmap` trims the range instead (zeroed mappings: no data is
        stored, and a trimmed block reads as zeros, so the result is the same). Without
        `unmap`, or with a non-zero block, the data is written (SBC: unmapping is only
        allowed where the device would read back the same data).
        """
        if len(data) != self.block_size:
            raise ValueError(
                f"{self.name}: write same takes one block of {self.block_size} bytes, "
                f"got {len(data)}"
            )
        offset, length = self._byte_range(lba, blocks, "write same")
        self._check_writable("write same")
        if length == 0:
            return
        recorder = trace.recorder
        if recorder is not None:
            start_ns = time.perf_counter_ns()

        block = bytes(data)
        with self._lock_bytes(offset, length):
            if unmap and not any(block):
                self.stack.trim(offset, length)
            else:
                self._write_repeated(offset, length, block)

        if recorder is not None:
            written = 0 if unmap and not any(block) else length
            recorder.emit("device", "write_same", self.name, offset, length, start_ns, written)

    def _write_repeated(self, offset: int, length: int, block: bytes) -> None:
        chunk = block * max(1, WRITE_SAME_CHUNK // len(block))
        done = 0
        while done < length:
            piece = min(len(chunk), length - done)
            self.stack.pwrite(offset + done, chunk[:piece])
            done += piece

    def synchronize_cache(self) -> None:
        """Make every change so far durable (fsync the writable layer: data, then index).

        Nothing to do for a read-only image.
        """
        recorder = trace.recorder
        if recorder is not None:
            start_ns = time.perf_counter_ns()

        if not self.read_only:
            self.stack.flush()

        if recorder is not None:
            recorder.emit("device", "sync", self.name, 0, self.size, start_ns, 0)

    # Bytes -----------------------------------------------------------------------------

    def read_bytes(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`, any alignment; short at the end of the disk, as a file."""
        aligned = not (offset | length) & _SECTOR_MASK
        if aligned and offset >= 0 and 0 <= length <= self.size - offset:
            return self.stack.pread(offset, length)  # whole sectors: what the loop device sends

        if offset < 0 or length < 0:
            raise ValueError(f"{self.name}: read at offset {offset}, length {length}: negative")
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        first, stop = _sectors_around(offset, length)
        data = self.stack.pread(first * SECTOR, (stop - first) * SECTOR)
        skip = offset - first * SECTOR
        return data[skip : skip + length]

    def write_bytes(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write `data` at `offset`, any alignment; returns its length.

        Partial sectors at either end are read, patched and written back under the range
        lock (module docstring, "Concurrency"). Raises `LbaRangeError` past the disk's end.
        """
        length = len(data)
        self._check_bytes(offset, length, "write")
        self._check_writable("write")
        if length == 0:
            return 0
        first, stop = _sectors_around(offset, length)
        start, end = first * SECTOR, stop * SECTOR

        with self._lock_sectors(first, stop):
            if start == offset and end == offset + length:
                if self.detect_zeroes and _all_zeros(data):
                    self.stack.trim(offset, length)
                else:
                    self.stack.pwrite(offset, bytes(data))
            else:
                self.stack.pwrite(start, self._patched(start, end, offset, data))
        return length

    def discard_bytes(self, offset: int, length: int) -> None:
        """Make [offset, offset + length) read as zeros, any alignment.

        The whole sectors inside are trimmed; the partial sectors at the ends are patched
        with zeros (read-modify-write), since a trim cannot cut a sector.
        """
        self._check_bytes(offset, length, "discard")
        self._check_writable("discard")
        if length == 0:
            return
        inner_start = -(-offset // SECTOR) * SECTOR
        inner_end = (offset + length) // SECTOR * SECTOR
        if inner_end <= inner_start:
            self.write_bytes(offset, bytes(length))
            return

        if inner_start > offset:
            self.write_bytes(offset, bytes(inner_start - offset))
        with self._lock_bytes(inner_start, inner_end - inner_start):
            self.stack.trim(inner_start, inner_end - inner_start)
        if inner_end < offset + length:
            self.write_bytes(inner_end, bytes(offset + length - inner_end))

    def _patched(
        self, start: int, end: int, offset: int, data: bytes | bytearray | memoryview
    ) -> bytes:
        """The sectors [start, end) as they read now, with `data` laid over them at `offset`.

        Only the first and last sectors are read: the ones in between are all new data.
        """
        buffer = bytearray(end - start)
        buffer[offset - start : offset - start + len(data)] = data
        if offset > start:
            head = self.stack.pread(start, SECTOR)
            buffer[: offset - start] = head[: offset - start]
        tail_from = offset + len(data)
        if tail_from < end:
            last = end - SECTOR
            tail = self.stack.pread(last, SECTOR)
            buffer[tail_from - start :] = tail[tail_from - last :]
        return bytes(buffer)

    # Checks ----------------------------------------------------------------------------

    def _byte_range(self, lba: int, blocks: int, what: str) -> tuple[int, int]:
        if lba < 0 or blocks < 0:
            raise ValueError(f"{self.name}: {what} at block {lba}, {blocks} blocks: negative")
        if lba + blocks > self.blocks:
            raise LbaRangeError(
                f"{self.name}: {what} of blocks [{lba}, {lba + blocks}) reaches past the "
                f"last block {self.blocks - 1} (the disk has {self.blocks} blocks of "
                f"{self.block_size} bytes)",
                lba,
            )
        return lba * self.block_size, blocks * self.block_size

    def _whole_blocks(self, length: int, what: str) -> int:
        if length % self.block_size:
            raise ValueError(
                f"{self.name}: {what} of {length} bytes is not whole blocks of "
                f"{self.block_size} bytes; use write_bytes for unaligned data"
            )
        return length // self.block_size

    def _check_bytes(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0:
            raise ValueError(f"{self.name}: {what} at offset {offset}, length {length}: negative")
        if offset + length > self.size:
            raise LbaRangeError(
                f"{self.name}: {what} of bytes [{offset}, {offset + length}) reaches past the "
                f"end of the disk ({self.size} bytes)",
                offset // self.block_size,
            )

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyError(
                f"{self.name}: {what} refused: the device is read-only (no writable layer, "
                "or opened read-only); open the image with a writable layer to change it"
            )

    def _lock_bytes(self, offset: int, length: int) -> _Locked:
        return _Locked(self.locks, offset // SECTOR, -(-(offset + length) // SECTOR))

    def _lock_sectors(self, first: int, stop: int) -> _Locked:
        return _Locked(self.locks, first, stop)


def _sectors_around(offset: int, length: int) -> tuple[int, int]:
    """The sectors [first, stop) that hold bytes [offset, offset + length)."""
    return offset // SECTOR, -(-(offset + length) // SECTOR)


def _all_zeros(data: bytes | bytearray | memoryview) -> bool:
    """True for `ZERO_DETECT_MIN` bytes or more of zeros.

    `bytes.startswith` compares with memcmp (~5 us for 128 KiB here) and stops at the first
    non-zero byte, so a write of real data pays almost nothing; comparing memoryviews with
    ``==`` goes item by item and is 100x slower.
    """
    length = len(data)
    if length < ZERO_DETECT_MIN:
        return False
    view = memoryview(data).cast("B")
    return all(
        _ZEROS.startswith(view[start : start + len(_ZEROS)])
        for start in range(0, length, len(_ZEROS))
    )
