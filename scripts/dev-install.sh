#!/usr/bin/env bash
# Installs the core (with the train, testing and FAISS-CPU extras) and every plugin under
# plugins/ in editable mode. Usage: bash scripts/dev-install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
args=(-e ".[dev,cpu]")
for pyproject in plugins/*/pyproject.toml; do
  [ -e "$pyproject" ] && args+=(-e "$(dirname "$pyproject")")
done
python -m pip install --quiet "${args[@]}"
