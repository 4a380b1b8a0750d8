"""`workbench bench`: benchmarks that print ratios against baselines measured in the same run."""

from __future__ import annotations

import json
import sys

import click

from workbench.cli.units import parse_size


@click.group("bench")
def bench() -> None:
    """Measure the workbench against baselines taken in the same run (ratios, not seconds)."""


@bench.command("formats")
@click.option("--quick", is_flag=True, help="A smoke run of a few seconds (small image, 1 repeat).")
@click.option(
    "--image-size",
    default=None,
    help="Size of the ext4 test image (e.g. 512M, the default; 32M with --quick).",
)
@click.option("--repeats", type=int, default=None, help="Repetitions per timing (best is kept).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON here.")
def formats(
    quick: bool, image_size: str | None, repeats: int | None, json_path: str | None
) -> None:
    """Index lookups, ZFile read throughput and size, and the cost of tracing when off.

    Builds an ext4 image from this machine's /usr with mkfs.ext4, compresses it as ZFile
    with lz4 and zstd in 4 KiB and 32 KiB blocks, and reads it back; each figure is printed
    next to its baseline (the bare codec on the same blocks, OverlayBD's C++ reader, the
    DADI paper's lookup rate, the same code with its tracing hooks removed).
    """
    from workbench.bench.formats import FormatsBenchmark, run

    settings = FormatsBenchmark.quick() if quick else FormatsBenchmark()
    if image_size is not None:
        settings.image_size = parse_size(image_size)
    if repeats is not None:
        settings.repeats = repeats

    tables = run(settings, out=sys.stdout)
    if json_path:
        with open(json_path, "w") as out:
            json.dump([table.to_dict() for table in tables], out, indent=2)
