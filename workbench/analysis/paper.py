"""The DADI paper's reference numbers, each with its provenance tag and where it comes from.

Tags as in shared/specs/dadi-evaluation.md: **[R]** read directly from a primary source,
**[S]** secondary notes citing the paper with page numbers (likely right, not verified
against the PDF), **[E]** read off the paper's own plots (docs/assets of containerd/overlaybd)
by pixel measurement, ±3%, or derived arithmetic. The paper's systems are mapped to ours by
`SYSTEM_NAMES`; a number with no counterpart here (CRFS, pseudo-Slacker, thin LVM, P2P) is
kept for context and drawn greyed.

Caveats:
- the paper's app is WordPress (21 layers, 165 MiB .tgz) on 4-vCPU cloud VMs or physical
  hosts; our workloads are stand-ins or the datasets' images on a shared 2-vCPU VM, so
  absolute seconds are not comparable, ratios are;
- Fig 14's pull/launch split is read off the chart only for .tgz + overlay2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Final

import pandas as pd

__all__ = ["PAPER", "SYSTEM_NAMES", "Reference", "paper_numbers"]


@dataclass(frozen=True)
class Reference:
    """One number of the paper."""

    figure: str
    system: str
    """The paper's name of the system."""
    condition: str
    metric: str
    value: float
    unit: str
    tag: str
    source: str


_FIG14 = "paper Fig 14 chart (docs/assets/cold_startup_latency.png), dadi-evaluation.md §2"
_FIG15 = "paper Fig 15 chart (docs/assets/warm_startup_latency.png), dadi-evaluation.md §2"
_FIG16 = "paper Fig 16 chart (docs/assets/startup_latency_with_prefetch.png), §2"
_TEXT = "secondary notes citing the paper's text, dadi-evaluation.md §2"

PAPER: Final[tuple[Reference, ...]] = (
    # Fig 14: cold start, one WordPress instance.
    Reference("Fig 14", ".tgz + overlay2", "cold", "ready_s", 11.1, "s", "[E]", _FIG14),
    Reference("Fig 14", ".tgz + overlay2", "cold", "pull_s", 10.6, "s", "[E]", _FIG14),
    Reference("Fig 14", ".tgz + overlay2", "cold", "launch_s", 0.5, "s", "[E]", _FIG14),
    Reference("Fig 14", "CRFS", "cold", "ready_s", 18.9, "s", "[E]", _FIG14),
    Reference("Fig 14", "pseudo-Slacker", "cold", "ready_s", 3.8, "s", "[E]", _FIG14),
    Reference("Fig 14", "DADI from registry", "cold", "ready_s", 2.2, "s", "[E]", _FIG14),
    Reference("Fig 14", "DADI from P2P root", "cold", "ready_s", 0.6, "s", "[E]", _FIG14),
    # Fig 15: warm start, NVMe and a cloud disk of 2,000 IOPS / 100 MB/s.
    Reference("Fig 15", ".tgz + overlay2", "local", "ready_s", 0.49, "s", "[E]", _FIG15),
    Reference("Fig 15", "thin LVM", "local", "ready_s", 0.55, "s", "[E]", _FIG15),
    Reference("Fig 15", "DADI", "local", "ready_s", 0.43, "s", "[E]", _FIG15),
    Reference("Fig 15", ".tgz + overlay2", "cloud-disk", "ready_s", 2.12, "s", "[E]", _FIG15),
    Reference("Fig 15", "thin LVM", "cloud-disk", "ready_s", 1.97, "s", "[E]", _FIG15),
    Reference("Fig 15", "DADI", "cloud-disk", "ready_s", 0.75, "s", "[E]", _FIG15),
    # Fig 16: trace-based prefetch, warm and cold block cache.
    Reference("Fig 16", "DADI warm", "warm", "ready_s", 0.43, "s", "[E]", _FIG16),
    Reference("Fig 16", "DADI warm + prefetch", "warm", "ready_s", 0.44, "s", "[E]", _FIG16),
    Reference("Fig 16", "DADI cold", "cold", "ready_s", 2.15, "s", "[E]", _FIG16),
    Reference("Fig 16", "DADI cold + prefetch", "cold", "ready_s", 0.51, "s", "[E]", _FIG16),
    Reference("Fig 16", "gap removed by prefetch", "cold", "share", 0.95, "1", "[E]", _FIG16),
    # Figs 22-24: random reads and tree walks (text only).
    Reference("Fig 22", "DADI uncompressed", "QD128", "iops", 120_000, "IOPS", "[S]", _TEXT),
    Reference("Fig 22", "ZFile vs uncompressed", "QD<32", "ratio", 1.15, "1", "[S]", _TEXT),
    # Image sizes (WordPress).
    Reference("sizes", "WordPress", ".tgz", "bytes", 165 * 2**20, "B", "[S]", _TEXT),
    Reference("sizes", "WordPress", "unpacked", "bytes", 501 * 2**20, "B", "[S]", _TEXT),
    Reference("sizes", "WordPress", "DADI LZ4", "bytes", 274 * 2**20, "B", "[S]", _TEXT),
)
"""Every number the notebooks draw or quote. Fig 22's 1.15 is the middle of "10-20% faster";
Figs 23-24 have no number in the notes ("DADI faster than overlay2 and LVM, larger margin on
cloud disk" [S]); the size study's rule "FS overhead < 5% vs .tar for layers > 10 MiB" [S]
is quoted in its notebook."""

SYSTEM_NAMES: Final[dict[str, str]] = {
    ".tgz + overlay2": "tgz-overlayfs",
    "DADI from registry": "lazy",
    "DADI": "lazy-warm",
    "DADI cold": "lazy",
    "DADI warm": "lazy-warm",
    "DADI cold + prefetch": "lazy-prefetch",
}
"""The paper's system names that have a counterpart among ours."""


def paper_numbers(figure: str | None = None) -> pd.DataFrame:
    """The reference numbers as a table (of one figure, e.g. ``"Fig 14"``), with ours' names."""
    table = pd.DataFrame([asdict(reference) for reference in PAPER])
    table["ours"] = table["system"].map(SYSTEM_NAMES)
    if figure is not None:
        table = table[table["figure"] == figure].reset_index(drop=True)
    return table


def paper_value(figure: str, system: str, metric: str = "ready_s", condition: str = "") -> float:
    """One reference number, by figure, paper system name, metric (and condition)."""
    table = paper_numbers(figure)
    rows = table[(table["system"] == system) & (table["metric"] == metric)]
    if condition:
        rows = rows[rows["condition"] == condition]
    if len(rows) != 1:
        raise KeyError(f"no single paper number for {figure} {system} {metric} {condition}")
    return float(rows["value"].iloc[0])
