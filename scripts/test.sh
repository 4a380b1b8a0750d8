#!/usr/bin/env bash
# All the tests: set up, lint, then pytest. Extra arguments go to pytest.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$top/scripts/setup.sh"
cd "$top"
.venv/bin/ruff check workbench tests
.venv/bin/ruff format --check workbench tests
exec .venv/bin/python -m pytest "$@"
