"""`workbench bench formats`: how fast the formats are, as ratios measured in one run.

Every figure is printed next to a baseline measured in the same run on the same data (or, for
OverlayBD's C++ reader, next to the figures measured on these machines and quoted in the
issue that set the targets), so that a slower or faster machine does not change the verdict.

Sections:
- lookups: merged-index lookups per second, one at a time and batched, on 1k..1M segments,
  against the DADI paper's C figure (more than 6M lookups/s per core);
- zfile read: sequential read throughput through `ZFileReader` as a ratio of decompressing the
  same blocks with the bare codec (target >= 0.85), and against OverlayBD's C++ reader;
- zfile size: ZFile lz4/zstd on a realistic ext4 image next to whole-file lz4 and zstd;
- tracing off: reads through image -> lsmt -> zfile with the tracing hooks in place, against
  the same objects running copies of their code without the hooks (target <= 3%).

Caveats:
- the ext4 image is made with `mkfs.ext4 -d` from directories of this machine (/usr), so
  its content, and with it the compression figures, differs a little from machine to machine;
- timings take the best of several repetitions, which measures the code, not the noise of a
  shared machine; the read figures are warm-cache (the page cache holds the ZFile).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import lz4.block
import lz4.frame
import numpy as np
import zstandard

from workbench.bench.untraced import without_tracing
from workbench.blobs import LocalFile
from workbench.formats.lsmt import SegmentIndex
from workbench.formats.zfile import ZFileReader, ZFileWriter
from workbench.image.commit import import_raw
from workbench.image.layer import ReadOnlyLayer
from workbench.image.merge import merge_indexes
from workbench.image.stack import LayerStack
from workbench.tracing import recording

log = logging.getLogger(__name__)

__all__ = ["FormatsBenchmark", "Table", "run"]

PAPER_LOOKUPS_PER_SECOND = 6_000_000
"""DADI paper: the merged index answers more than 6M lookups per second per core (C++)."""

# OverlayBD's own C++ reader on these machines, single thread, warm cache, 512 MiB ext4 image
# (MB/s, low and high end of the measured range).
OVERLAYBD_READ_MBPS = {
    ("lz4", 4096): (650, 730),
    ("zstd", 4096): (106, 106),
    ("lz4", 32768): (790, 900),
    ("zstd", 32768): (350, 390),
}

READ_CHUNK = 1 << 20
"""Sequential reads go through the ZFile in 1 MiB requests."""

MB = 1_000_000


@dataclass
class Table:
    """One section of the report: a title, column names, rows, and notes below."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        cells = [self.columns] + [[_format_cell(value) for value in row] for row in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        lines = [self.title, "-" * len(self.title)]
        for number, row in enumerate(cells):
            padded = (cell.rjust(width) for cell, width in zip(row, widths, strict=True))
            lines.append("  ".join(padded))
            if number == 0:
                lines.append("  ".join("-" * width for width in widths))
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows}


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def best_of(repeats: int, work: Callable[[], object]) -> float:
    """The shortest wall time of `repeats` runs of `work`, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


# ---------------------------------------------------------------------------------------------
# Lookups


def random_index(segments: int, rng: np.random.Generator, spread: int = 256) -> SegmentIndex:
    """A sorted, non-overlapping index of `segments` entries with gaps between them."""
    length = rng.integers(1, spread, segments, dtype=np.uint64)
    gap = rng.integers(0, spread, segments, dtype=np.uint64)
    offset = np.cumsum(length + gap) - length
    moffset = np.cumsum(length) - length + np.uint64(8)
    return SegmentIndex.from_fields(offset, length, moffset)


def merged_index(segments: int, rng: np.random.Generator) -> tuple[SegmentIndex, float]:
    """The merged index of a 4-layer stack with about `segments` entries, and the merge time.

    Each layer maps scattered ranges of the same disk, so upper layers split lower
    segments, as in a real stack.
    """
    layers = [random_index(max(1, segments // 3), rng, spread=256) for _ in range(4)]
    start = time.perf_counter()
    merged = merge_indexes(layers)
    return merged, time.perf_counter() - start


def bench_lookups(sizes: list[int], repeats: int) -> Table:
    table = Table(
        "Merged-index lookups (sector -> segment), 4-layer stacks",
        ["segments", "merge ms", "single/s", "batched/s", "batched vs paper (6M/s)"],
    )
    rng = np.random.default_rng(1)
    for target in sizes:
        index, merge_s = merged_index(target, rng)
        end = int(index.end[-1])
        probes = rng.integers(0, end, 1_000_000, dtype=np.uint64)
        singles = [int(p) for p in probes[:20_000]]

        def one_at_a_time(index: SegmentIndex = index, singles: list[int] = singles) -> None:
            find_one = index.find_one
            for sector in singles:
                find_one(sector)

        single_s = best_of(repeats, one_at_a_time)
        batched_s = best_of(repeats, lambda index=index, probes=probes: index.find(probes))
        batched_rate = len(probes) / batched_s
        table.rows.append(
            [
                len(index),
                1000 * merge_s,
                len(singles) / single_s,
                batched_rate,
                f"{batched_rate / PAPER_LOOKUPS_PER_SECOND:.2f}x",
            ]
        )
    table.notes.append(
        "single = one `find_one()` call per sector; batched = one `find()` "
        "over 1M random sectors, in random order"
    )
    return table


# ---------------------------------------------------------------------------------------------
# A realistic ext4 image


def make_ext4_image(path: Path, size: int, sources: list[str]) -> None:
    """An ext4 image of `size` bytes filled from `sources` (directories) with mkfs.ext4 -d.

    The directories are copied into a staging folder until about 60% of the image is used,
    as a container root file system would be.
    """
    mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    if not os.path.exists(mkfs):
        raise RuntimeError("mkfs.ext4 is missing; install Debian's e2fsprogs")

    budget = int(size * 0.6)
    with tempfile.TemporaryDirectory(prefix="wb-ext4-") as staging:
        used, entries = _stage_files(sources, staging, budget)
        with open(path, "wb") as image:
            image.truncate(size)

        # Enough inodes for every staged file and folder: the default ratio (one per 16 KiB)
        # runs out on a small image of small files.
        inodes = int(entries * 1.25) + 128
        command = [mkfs, "-q", "-F", "-O", "^has_journal", "-N", str(inodes), "-d", staging]
        done = subprocess.run([*command, str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"mkfs.ext4 failed to build the test image: {done.stderr.strip()}")
    log.info("made a %d MiB ext4 image with %d MiB of files", size >> 20, used >> 20)


def _stage_files(sources: list[str], staging: str, budget: int) -> tuple[int, int]:
    """Copy regular files from `sources` into `staging` up to `budget` bytes.

    Returns the bytes copied and the number of files and folders made.
    """
    used = 0
    for source in sources:
        for root, _dirs, files in os.walk(source):
            for name in files:
                src = os.path.join(root, name)
                if not os.path.isfile(src) or os.path.islink(src):
                    continue
                file_size = os.path.getsize(src)
                if used + file_size > budget:
                    continue
                dst = os.path.join(staging, os.path.relpath(src, "/"))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                try:
                    shutil.copyfile(src, dst)
                except OSError:
                    continue
                used += file_size
    entries = sum(len(dirs) + len(files) for _root, dirs, files in os.walk(staging))
    return used, entries


# ---------------------------------------------------------------------------------------------
# ZFile read and size


def compress_to(path: Path, image: bytes, algorithm: str, block_size: int) -> float:
    """Write `image` as a ZFile at `path`; returns the compression time in seconds."""
    start = time.perf_counter()
    with open(path, "wb") as out:
        writer = ZFileWriter(out, algorithm=algorithm, block_size=block_size, verify=True)
        view = memoryview(image)
        for offset in range(0, len(image), READ_CHUNK):
            writer.write(view[offset : offset + READ_CHUNK])
        writer.close()
    return time.perf_counter() - start


def stored_blocks(path: Path) -> tuple[list[bytes], int]:
    """The compressed payload of every block of a ZFile (CRC stripped), and the block size."""
    with LocalFile(path) as source:
        reader = ZFileReader(source)
        data = source.pread(0, source.size)
        starts = reader.block_offsets()
        crc = 4 if reader.verify else 0
        blocks = [data[int(start) : int(end) - crc] for start, end in pairwise(starts)]
        return blocks, reader.block_size


def decompress_all(blocks: list[bytes], algorithm: str, block_size: int) -> None:
    """The baseline: the bare codec over every block, in the tightest loop Python allows."""
    if algorithm == "lz4":
        decompress = lz4.block.decompress
        for block in blocks:
            decompress(block, block_size)
    else:
        decompress = zstandard.ZstdDecompressor().decompress
        for block in blocks:
            decompress(block)


def read_sequentially(reader: Any, size: int) -> None:
    for offset in range(0, size, READ_CHUNK):
        reader.pread(offset, READ_CHUNK)


def bench_zfile(image_path: Path, workdir: Path, repeats: int) -> tuple[Table, Table]:
    image = image_path.read_bytes()
    size = len(image)
    reads = Table(
        f"ZFile sequential read, {size >> 20} MiB ext4 image, 1 MiB requests, warm cache",
        [
            "codec",
            "block",
            "bare codec MB/s",
            "ZFileReader MB/s",
            "ratio (>= 0.85)",
            "OverlayBD C++ MB/s",
            "vs OverlayBD",
        ],
    )
    sizes = Table(
        f"Compressed size of the {size >> 20} MiB ext4 image",
        ["format", "bytes", "% of image"],
    )
    for algorithm, block_size in OVERLAYBD_READ_MBPS:
        path = workdir / f"image.{algorithm}.{block_size}.zfile"
        compress_s = compress_to(path, image, algorithm, block_size)
        sizes.rows.append(
            [
                f"ZFile {algorithm} {block_size // 1024} KiB (written in {compress_s:.1f} s)",
                path.stat().st_size,
                100 * path.stat().st_size / size,
            ]
        )

        # Baseline: the bare codec over the same blocks, already in memory.
        blocks, _ = stored_blocks(path)
        bare_s = best_of(
            repeats, lambda b=blocks, a=algorithm, s=block_size: decompress_all(b, a, s)
        )

        # The reader: the whole file through pread, from the page cache.
        with LocalFile(path) as source:
            reader = ZFileReader(source)
            read_s = best_of(repeats, lambda reader=reader: read_sequentially(reader, size))

        low, high = OVERLAYBD_READ_MBPS[(algorithm, block_size)]
        read_mbps = size / read_s / MB
        reads.rows.append(
            [
                algorithm,
                f"{block_size // 1024} KiB",
                size / bare_s / MB,
                read_mbps,
                f"{bare_s / read_s:.2f}",
                f"{low}-{high}" if low != high else f"{low}",
                f"{read_mbps / high:.2f}x",
            ]
        )
        path.unlink()

    reads.notes.append(
        "ratio = bare codec time / reader time over the same blocks (the reader also reads, "
        "checks CRC32C and copies); vs OverlayBD = ours / the top of its range"
    )
    for name, compressed in _whole_file_sizes(image):
        sizes.rows.append([name, compressed, 100 * compressed / size])
    nonzero = _nonzero_bytes(image)
    sizes.rows.append(["non-zero 4 KiB blocks, uncompressed", nonzero, 100 * nonzero / size])
    return reads, sizes


def _whole_file_sizes(image: bytes) -> list[tuple[str, int]]:
    zstd_size = len(zstandard.ZstdCompressor(level=3).compress(image))
    lz4_size = len(lz4.frame.compress(image))
    return [("whole-file zstd (level 3)", zstd_size), ("whole-file lz4 (frame)", lz4_size)]


def _nonzero_bytes(image: bytes) -> int:
    blocks = np.frombuffer(image, np.uint64).reshape(-1, 512)
    return int(blocks.any(axis=1).sum()) * 4096


# ---------------------------------------------------------------------------------------------
# The cost of tracing hooks when tracing is off

# The modules on the read path whose hooks are measured, outermost first.
TRACED_MODULES = ("workbench.image.stack", "workbench.image.layer", "workbench.formats.zfile")


def twin(stack: LayerStack, strip: bool) -> tuple[LayerStack, int]:
    """`stack` with every object on its read path switched to a copy of its class.

    The copies are compiled from the same source (`workbench.bench.untraced`), without the
    tracing hooks if `strip`; the objects keep their state and only the code of their
    methods changes. Returns the stack and the number of hooks removed.
    """
    copies = {}
    removed = 0
    for name in TRACED_MODULES:
        copies[name], count = without_tracing(name, strip=strip)
        removed += count

    stack.__class__ = copies["workbench.image.stack"].LayerStack
    for layer in stack.layers:
        if type(layer) is ReadOnlyLayer:
            layer.__class__ = copies["workbench.image.layer"].ReadOnlyLayer
            if type(layer.file) is ZFileReader:
                layer.file.__class__ = copies["workbench.formats.zfile"].ZFileReader
    return stack, removed


def bench_tracing(image_path: Path, workdir: Path, repeats: int) -> Table:
    """Reads through image -> lsmt -> zfile with tracing off, hooks in place vs removed."""
    layer_path = workdir / "layer.zfile"
    import_raw(image_path, layer_path, compress="lz4")
    # Both sides are copies loaded the same way; only the hooks differ.
    traced, _ = twin(LayerStack([ReadOnlyLayer.open(layer_path)]), strip=False)
    plain, hooks = twin(LayerStack([ReadOnlyLayer.open(layer_path)]), strip=True)
    size = traced.size

    # Random reads of the mapped part of the disk: reads of holes would only time the index.
    rng = np.random.default_rng(3)
    mapped = [offset for start, stop in traced.data_ranges() for offset in range(start, stop, 4096)]
    offsets = rng.choice(mapped, 5_000).tolist()

    def random_4k(stack: LayerStack) -> None:
        for offset in offsets:
            stack.pread(offset, 4096)

    def sequential_1m(stack: LayerStack) -> None:
        for offset in range(0, size, READ_CHUNK):
            stack.pread(offset, READ_CHUNK)

    table = Table(
        "Tracing hooks on the read path (image -> lsmt -> zfile lz4 4 KiB), tracing off",
        ["workload", "hooks removed", "hooks, off", "cost (<= 3%)", "tracing on"],
    )
    workloads = (("5,000 random 4 KiB reads", random_4k), ("1 MiB sequential", sequential_1m))
    for name, work in workloads:
        ratios, on_ratios, plain_times, off_times = [], [], [], []
        for _ in range(max(11, 4 * repeats + 1)):
            plain_s = best_of(1, lambda work=work: work(plain))
            off_s = best_of(1, lambda work=work: work(traced))
            plain_times.append(plain_s)
            off_times.append(off_s)
            ratios.append(off_s / plain_s)
        with recording():
            on_ratios.append(best_of(1, lambda work=work: work(traced)) / min(plain_times))
        table.rows.append(
            [
                name,
                f"{1000 * float(np.median(plain_times)):.0f} ms",
                f"{1000 * float(np.median(off_times)):.0f} ms",
                f"{100 * (float(np.median(ratios)) - 1):+.1f}%",
                f"{100 * (on_ratios[0] - 1):+.0f}%",
            ]
        )
    table.notes.append(
        f"hooks removed = the objects switched to copies of {len(TRACED_MODULES)} modules "
        f"compiled without their {hooks} tracing hooks, against copies compiled with them; "
        "cost = median over alternating rounds of the paired ratio"
    )
    traced.close()
    plain.close()
    return table


# ---------------------------------------------------------------------------------------------
# The whole benchmark


@dataclass
class FormatsBenchmark:
    """Settings of one run; `quick` shrinks everything to a smoke test of a few seconds."""

    image_size: int = 512 << 20
    lookup_sizes: list[int] = field(default_factory=lambda: [1_000, 10_000, 100_000, 1_000_000])
    repeats: int = 3
    sources: list[str] = field(default_factory=lambda: ["/usr/lib", "/usr/share", "/usr/bin"])

    @classmethod
    def quick(cls) -> FormatsBenchmark:
        return cls(image_size=32 << 20, lookup_sizes=[1_000, 100_000], repeats=1)


def run(settings: FormatsBenchmark, out: io.TextIOBase | None = None) -> list[Table]:
    """Run every section, printing each table as it completes; returns the tables."""

    def show(table: Table) -> None:
        if out is not None:
            out.write(table.render() + "\n\n")
            out.flush()

    tables = [bench_lookups(settings.lookup_sizes, settings.repeats)]
    show(tables[-1])

    with tempfile.TemporaryDirectory(prefix="wb-bench-") as tmp:
        workdir = Path(tmp)
        image_path = workdir / "image.ext4"
        make_ext4_image(image_path, settings.image_size, settings.sources)
        for table in bench_zfile(image_path, workdir, settings.repeats):
            tables.append(table)
            show(table)
        tables.append(bench_tracing(image_path, workdir, settings.repeats))
        show(tables[-1])
    return tables
