#!/usr/bin/env bash
# Install glmtune and its test dependencies into the current Python.
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
# On a GPU machine install the torch build you want beforehand; this keeps it if it satisfies >=2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
