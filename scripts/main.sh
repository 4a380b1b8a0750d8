#!/usr/bin/env bash
# The main job on the embedded defaults: set up, then run the workbench demo end to end.
# Extra arguments go to `workbench demo` (e.g. --workdir DIR --keep).
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$top/scripts/setup.sh"
exec "$top/.venv/bin/workbench" demo "$@"
