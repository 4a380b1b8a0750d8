"""Analysis of experiment results, for the study notebooks: tables, the paper's numbers, plots.

`results` loads a run (``trials.parquet`` and ``run.json``) and summarises it, `paper` holds
the DADI paper's reference numbers with their provenance tags (shared/specs/dadi-evaluation.md
§2: [R] read from a primary source, [S] secondary notes, [E] read off a chart), `plots` draws
our figure beside the paper's and saves PNGs. Notebooks only read result tables.
"""

from workbench.analysis.paper import PAPER, paper_numbers
from workbench.analysis.results import Run, load_run, summary

__all__ = ["PAPER", "Run", "load_run", "paper_numbers", "summary"]
