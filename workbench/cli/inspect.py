"""`workbench inspect FILE`: what a file is, its header fields, flags and index summary."""

from __future__ import annotations

import json

import click

from workbench.inspect import describe, render_text


@click.command("inspect")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def inspect(file: str, as_json: bool) -> None:
    """Describe FILE: a layer (tar, ZFile, LSMT committed or writable) or a config.v1.json.

    Wrappings are peeled the way a reader does, outermost first: a tar wrapper, then a
    ZFile, then the LSMT file inside, each with its header fields and, for a layer, a
    summary of its index (entries, bytes mapped, bytes zeroed).
    """
    description = describe(file)
    if as_json:
        click.echo(json.dumps(description, indent=2))
    else:
        click.echo(render_text(description))
