#!/usr/bin/env bash
# The test command (CI runs exactly this): install if needed, lint, run the default test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the long tests; TEST_WORKERS=1 for one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export WANDB_SILENT=true
.venv/bin/ruff check .
.venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadgroup "$@"  # 2 workers: CI has 2 cores
