#!/usr/bin/env bash
# The main job: set up, then run the quick Fig 14 study (cold start, .tgz + overlayfs vs lazy
# from the embedded registry through the shaping proxy) end to end, print our figures beside
# the paper's, compare the run with the committed baseline, and say where the figure is.
# A few minutes on a 2-core machine. Extra arguments go to `workbench experiment run`.
# `workbench demo` (the walk through the formats) is still a command of its own.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$top/scripts/setup.sh"
cd "$top"

runs=${WORKBENCH_EXPERIMENTS_CACHE:-/var/tmp/workbench-experiments}/runs
out="$runs/fig14-cold-start-quick-$(date -u +%Y%m%dT%H%M%SZ)"
.venv/bin/workbench experiment run experiments/fig14-cold-start.toml --quick --output "$out" "$@"

echo
echo "against the committed baseline (experiments/baselines/fig14-cold-start-quick.csv):"
.venv/bin/workbench experiment compare experiments/baselines/fig14-cold-start-quick.csv "$out"
echo
echo "run folder: $out (trials.parquet, run.json, fig14-cold-start.png)"
echo "notebook:   notebooks/fig14-cold-start.ipynb (with WORKBENCH_RESULTS=$out it reads this run)"
