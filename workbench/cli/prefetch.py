"""`workbench prefetch ...`: trace files (OverlayBD's format), acceleration layers, status.

    workbench prefetch show TRACE                 the records of a trace file
    workbench prefetch layer TRACE OUT.tar        the acceleration layer of a trace
        [--config C --out-config C2]              and a config with it on top
    workbench prefetch status MOUNTPOINT          what a mount's prefetcher did so far

Recording and replaying are options of `workbench mount` (``--record-trace``,
``--replay-trace``, ``--prefetch-list``); see `workbench.prefetch`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

__all__ = ["prefetch"]


@click.group("prefetch")
def prefetch() -> None:
    """Trace-based prefetch: trace files, acceleration layers, a mount's prefetch status."""


@prefetch.command("show")
@click.argument("trace", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--limit", type=int, default=20, show_default=True, help="Records to list.")
def show(trace: Path, limit: int) -> None:
    """Check the trace file TRACE and list its records (layer, offset, count)."""
    from workbench.errors import FormatError
    from workbench.prefetch.tracefile import TraceFile

    try:
        loaded = TraceFile.load(trace)
    except FormatError as exc:
        raise click.ClickException(str(exc)) from exc
    layers = sorted({record.layer_index for record in loaded.records})
    click.echo(
        f"{trace}: {len(loaded)} reads, {loaded.total_bytes} bytes, layers {layers or 'none'}"
    )
    for record in loaded.records[:limit]:
        click.echo(
            f"  {record.op.decode()} layer {record.layer_index:>3} "
            f"offset {record.offset:>12} count {record.count:>8}"
        )
    if len(loaded) > limit:
        click.echo(f"  ... {len(loaded) - limit} more")


@prefetch.command("layer")
@click.argument("trace", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A config.v1.json to put the layer on (written to --out-config).",
)
@click.option("--out-config", type=click.Path(dir_okay=False, path_type=Path))
def layer(trace: Path, out: Path, config: Path | None, out_config: Path | None) -> None:
    """Build the acceleration layer OUT (a tar holding TRACE as `trace`).

    With --config and --out-config, also write a config with the layer as its top lower and
    accelerationLayer set; `workbench registry push` of it pushes the layer with the
    acceleration-layer annotation, and mounting it replays the trace.
    """
    from workbench.errors import FormatError
    from workbench.formats.config import ImageConfig
    from workbench.prefetch.layer import build_trace_layer, with_acceleration_layer

    if (config is None) != (out_config is None):
        raise click.UsageError("give --config and --out-config together")
    try:
        size = build_trace_layer(trace, out)
    except FormatError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote the acceleration layer {out} ({size} bytes)")
    if config is not None and out_config is not None:
        with_acceleration_layer(ImageConfig.load(config), out).dump(out_config)
        click.echo(f"wrote {out_config}: {config}'s lowers and the acceleration layer on top")


@prefetch.command("status")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
def status(mountpoint: Path, run_dir: Path | None) -> None:
    """What the prefetcher (or the recorder) of the mount at MOUNTPOINT has done so far."""
    from workbench.device.mount import find_mount
    from workbench.prefetch import prefetch_status

    click.echo(json.dumps(prefetch_status(find_mount(mountpoint, run_dir)), indent=2))
