#!/usr/bin/env bash
# Quick start: set up .venv, install, and run the default experiment. Extra arguments are Hydra overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/modnets-train "$@"
