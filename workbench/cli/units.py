"""Parsing sizes given on the command line (64G, 512M, 4096)."""

from __future__ import annotations

import re

import click

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes in `text`: a number with an optional binary suffix K, M, G or T (KiB, MiB...)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise click.BadParameter(
            f"{text!r} is not a size; write bytes or a number with K, M, G or T (e.g. 64G)"
        )
    return int(match.group(1)) * _UNITS[match.group(2).upper()]
