"""`workbench dataset`: the evaluation images of ``datasets/`` (build, list, push, run).

`build NAME` builds a recipe into the cache (``$WORKBENCH_DATASETS_DIR``, default
~/.cache/workbench/datasets) and prints the OCI layout's path; a cached image returns at once.
`list` shows every recipe, whether it is built and its layers' sizes; `path NAME` prints the
layout's path (an error if not built); `push NAME REF` uploads it to a registry and prints
the manifest digest; `workload NAME` prints the workload as JSON; `run NAME` starts the
workload over the unpacked image in unshare + chroot and prints the time to ready.

Caveats:
- `build`, `push` of an unbuilt image and `run` need root (see workbench.datasets.engine);
- `run` unpacks the image into a temporary directory under $TMPDIR (default /var/tmp) on
  every call, which takes a few seconds for the large images.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click

from workbench import datasets
from workbench.datasets.engine import LayerRecord, default_cache_dir
from workbench.datasets.recipe import load_recipe, recipe_hash
from workbench.errors import RecipeError

__all__ = ["dataset"]

_cache_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The dataset cache (default $WORKBENCH_DATASETS_DIR or ~/.cache/workbench/datasets).",
)


@click.group()
def dataset() -> None:
    """Evaluation images built from the recipes in datasets/, with their workloads."""


@dataset.command("list")
@_cache_option
def list_(cache_dir: Path | None) -> None:
    """Every recipe, whether it is built, and its layers (tar and gzip sizes)."""
    cache = cache_dir or default_cache_dir()
    for name in datasets.recipes():
        recipe = load_recipe(name)
        image_dir = cache / "images" / name
        stamp = image_dir / "recipe.sha256"
        built = stamp.is_file() and stamp.read_text().strip() == recipe_hash(recipe)
        state = "built" if built else "not built"
        click.echo(f"{name:22s} {state:10s} {recipe.description}")
        if built:
            for raw in json.loads((image_dir / "layers.json").read_text()):
                layer = LayerRecord(**raw)
                click.echo(
                    f"  {layer.digest[:19]}  {layer.tar_size / 2**20:8.1f} MiB tar "
                    f"{layer.size / 2**20:7.1f} MiB gz {layer.entries:6d} entries  "
                    f"{layer.comment}"
                )


@dataset.command()
@click.argument("name")
@_cache_option
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def build(name: str, cache_dir: Path | None, quiet: bool) -> None:
    """Build recipe NAME (at once when cached) and print its OCI layout directory."""
    click.echo(datasets.build(name, cache_dir=cache_dir, progress=not quiet))


@dataset.command()
@click.argument("name")
@_cache_option
def path(name: str, cache_dir: Path | None) -> None:
    """Print the OCI layout directory of NAME (it must be built)."""
    recipe = load_recipe(name)
    image_dir = (cache_dir or default_cache_dir()) / "images" / name
    stamp = image_dir / "recipe.sha256"
    if not stamp.is_file() or stamp.read_text().strip() != recipe_hash(recipe):
        raise RecipeError(
            f"dataset {name} is not built (or its recipe changed); run "
            f"`workbench dataset build {name}`"
        )
    click.echo(image_dir)


@dataset.command()
@click.argument("name")
@click.argument("reference")
@_cache_option
@click.option("--tls", is_flag=True, help="Use HTTPS even for a non-loopback registry.")
def push(name: str, reference: str, cache_dir: Path | None, tls: bool) -> None:
    """Push NAME (built if needed) to REFERENCE (host/repository:tag); print the digest."""
    click.echo(datasets.push(name, reference, insecure=not tls, cache_dir=cache_dir))


@dataset.command()
@click.argument("name")
@click.option("--variant", default=None, help="A [workloads.VARIANT] of the recipe.")
def workload(name: str, variant: str | None) -> None:
    """Print the workload of NAME as JSON (command, env, ports, ready probe and meaning)."""
    click.echo(json.dumps(datasets.workload(name, variant).to_json(), indent=2))


@dataset.command()
@click.argument("name")
@click.option("--variant", default=None, help="A [workloads.VARIANT] of the recipe.")
@click.option("--repeat", default=1, show_default=True, help="Starts, each on a fresh upper.")
@click.option(
    "--net",
    type=click.Choice(["private", "host"]),
    default="private",
    show_default=True,
    help="A network namespace of its own (probed from inside), or the host's.",
)
@_cache_option
def run(name: str, variant: str | None, repeat: int, net: str, cache_dir: Path | None) -> None:
    """Start NAME's workload in unshare + chroot over the unpacked image; print time to ready."""
    from workbench.datasets.chroot import start, unpack

    wl = datasets.workload(name, variant)
    layout = datasets.build(name, cache_dir=cache_dir)
    base = Path(os.environ.get("TMPDIR", "/var/tmp"))
    with tempfile.TemporaryDirectory(prefix=f"workbench-dataset-{name}-", dir=base) as tmp:
        rootfs = unpack(layout, Path(tmp) / "bundle")
        for attempt in range(repeat):
            with start(wl, rootfs, Path(tmp) / f"run{attempt}", net=net) as running:
                result = running.wait_ready()
            seconds = result.ready_at - running.started_at
            click.echo(f"{wl.name}: ready in {seconds:.3f} s: {result.evidence}")
