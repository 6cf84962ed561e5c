#!/usr/bin/env bash
# Create .venv and install modnets with its dev tools. Idempotent: a second call only checks.
# TORCH_SPEC picks the torch build (default: the CPU wheel 2.13.0 this project is tested with).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[dev,sweeps,digits]"
