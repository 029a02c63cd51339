#!/usr/bin/env bash
# The suite on Python 3.12 with the newest megatron-core 0.19 (a manual check: CI runs Python 3.11 with
# megatron-core 0.16, and checks 0.19's API statically, because no CPU torch wheel for 3.12 is at hand
# there; a GPU machine has Python 3.12 and torch). Uses the python3.12 on PATH (or $PYTHON312) and the
# torch it already has, or pip's.
#
#   bash tests/compat/run_py312.sh [pytest args]      # e.g. -m "not slow", or tests/test_train.py
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON312:-python3.12}
venv=.venv-py312
"$py" -m venv --system-site-packages "$venv"
"$venv/bin/python" -c "import torch" 2>/dev/null || "$venv/bin/python" -m pip install --quiet torch
"$venv/bin/python" -m pip install --quiet "megatron-core>=0.19,<0.20" -e ".[dev]"
"$venv/bin/python" -c "import sys, torch; from importlib.metadata import version; print(f'python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {version(\"megatron-core\")}')"
exec "$venv/bin/python" -m pytest -q "$@"
