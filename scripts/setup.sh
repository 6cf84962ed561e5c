#!/usr/bin/env bash
# Quick start: set up .venv, install, and run the quick-start experiment (docs: README "A first result").
# With arguments, runs `modnets-train ARGUMENTS` instead (Hydra overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
QUICKSTART=(experiment=quickstart)  # the run a newcomer sees first: one place to change it
bash scripts/install.sh
if [ $# -gt 0 ]; then
  .venv/bin/modnets-train "$@"
else
  .venv/bin/modnets-train "${QUICKSTART[@]}"
fi
