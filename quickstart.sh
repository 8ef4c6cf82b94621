#!/usr/bin/env bash
# One command on a fresh machine: install glmtune (CPU torch) and run the quickstart end to end.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
python scripts/quickstart.py
