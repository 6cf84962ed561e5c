#!/usr/bin/env bash
# The test command (CI runs exactly this): install if needed, lint, run the default test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the long tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export WANDB_SILENT=true
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
