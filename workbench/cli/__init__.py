"""The `workbench` command: OverlayBD's tools, an inspector, benchmarks and the demo.

Each group lives in its own module; this one only assembles them. Errors of the workbench's own
hierarchy are printed as one line, "Error: ..." with exit code 1 as click prints its own, and no
traceback: they describe bad input, not a bug.
"""

from __future__ import annotations

import logging

import click

from workbench import __version__
from workbench.errors import WorkbenchError


class _Workbench(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except WorkbenchError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Workbench, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="workbench")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """DADI workbench: block-level container images (OverlayBD's formats), observable.

    An image is a stack of LSMT layers: each layer maps ranges of a virtual disk to data in
    its own file. Read-only layers are usually compressed as ZFile (seekable, fixed-size
    blocks) and wrapped in tar so that registries accept them; a writable layer on top takes
    new writes. The commands below build, convert, inspect and read such layers, with the
    same names and file formats as OverlayBD's own tools.
    """
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from workbench.cli.bench import bench
    from workbench.cli.blob import blob
    from workbench.cli.cache import cache
    from workbench.cli.convert import convert, verify
    from workbench.cli.dataset import dataset
    from workbench.cli.debugfs import debugfs
    from workbench.cli.demo import demo
    from workbench.cli.device import commit, mount, umount
    from workbench.cli.experiment import experiment
    from workbench.cli.image import export
    from workbench.cli.inspect import inspect
    from workbench.cli.lsmt import lsmt
    from workbench.cli.p2p import p2p
    from workbench.cli.prefetch import prefetch
    from workbench.cli.registry import registry
    from workbench.cli.shape import shape
    from workbench.cli.snapshotter import rpull, snapshotter
    from workbench.cli.trace import trace
    from workbench.cli.zfile import zfile

    images = (lsmt, zfile, inspect, export)
    devices = (mount, umount, commit)
    registries = (registry, blob, cache, shape, p2p)
    containers = (snapshotter, rpull)
    tools = (convert, verify, dataset, trace, bench, demo, debugfs, prefetch, experiment)
    for command in (*images, *devices, *registries, *containers, *tools):
        cli.add_command(command)


_register()


def main() -> None:
    cli()
