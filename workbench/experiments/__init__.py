"""Experiments: the paper's studies as definitions, run into tidy result tables.

`definition` parses a study's TOML file, `runner` runs its trials (`run_experiment`) into
``OUTPUT/trials.parquet``, `systems` holds the systems compared (tgz + overlayfs, lazy,
lazy with a warm block cache) and the container start, `device` the fio and tree-walk trials,
`workloads` finds a workload's image (datasets or the stand-ins of `standin`), `compare` tells
whether two runs differ beyond noise. `workbench experiment run|compare` is the command line.
"""

from workbench.experiments.definition import Definition, load_definition
from workbench.experiments.runner import RunResult, run_experiment

__all__ = ["Definition", "RunResult", "load_definition", "run_experiment"]
