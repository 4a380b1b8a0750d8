"""Small HTML summaries for notebooks: a title, a few fields, and maybe the head of a table.

Every `_repr_html_` of the workbench goes through `card`, so that objects look alike in
Jupyter: a bold title line, a two-column table of fields, then an optional DataFrame cut to
its first rows. Values are escaped; numbers of bytes read best through `human_bytes`.

Caveats:
- the markup is plain HTML with inline styles only (no CSS classes, no scripts), so it
  renders the same in JupyterLab, classic notebooks and exported HTML;
- tables are cut to `max_rows` rows; the full table is one accessor away.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["card", "human_bytes", "presence_strip"]


def human_bytes(count: int | float) -> str:
    """`count` bytes as a short text with a binary unit: ``1.5 MiB``, ``512 B``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def card(
    title: str,
    fields: Mapping[str, object],
    table: pd.DataFrame | None = None,
    *,
    max_rows: int = 8,
    extra_html: str = "",
) -> str:
    """The HTML of a summary: `title`, the `fields` as rows, `extra_html`, then `table`'s head."""
    rows = "".join(
        f"<tr><td style='text-align:left;padding-right:1em'>{html.escape(str(key))}</td>"
        f"<td style='text-align:left'>{html.escape(str(value))}</td></tr>"
        for key, value in fields.items()
    )
    parts = [f"<div><b>{html.escape(title)}</b>", f"<table>{rows}</table>", extra_html]
    if table is not None and len(table):
        shown = table.head(max_rows).to_html(max_cols=12, border=0)
        more = len(table) - max_rows
        parts.append(shown)
        if more > 0:
            parts.append(f"<i>... {more} more rows</i>")
    parts.append("</div>")
    return "".join(parts)


def presence_strip(present: list[bool] | object, cells: int = 128) -> str:
    """A row of small boxes, one per group of blocks, darker the more of the group is present.

    `present` is a boolean sequence (one per block); long sequences are binned into `cells`
    groups so the strip stays one line.
    """
    import numpy as np

    flags = np.asarray(present, dtype=bool)
    if len(flags) == 0:
        return ""
    groups = np.array_split(flags, min(cells, len(flags)))
    boxes = []
    for group in groups:
        shade = int(255 - 200 * float(group.mean()))
        colour = f"rgb({shade},{shade},255)" if group.any() else "#eee"
        boxes.append(
            f"<span style='display:inline-block;width:4px;height:14px;background:{colour}'></span>"
        )
    return "<div style='line-height:0;margin:4px 0'>" + "".join(boxes) + "</div>"
