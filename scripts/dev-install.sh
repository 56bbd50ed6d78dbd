#!/usr/bin/env bash
# Installs the core (with the train, testing and FAISS-CPU extras) and every plugin under
# plugins/ in editable mode. Usage: bash scripts/dev-install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
args=(-e ".[dev,cpu]")
for pyproject in plugins/*/pyproject.toml; do
  [ -e "$pyproject" ] || continue
  # each plugin with its optional extras (e.g. adaptive_margin[text]) so their tests run too;
  # extras named gpu/cuda are left out (no GPU wheels on CPU machines)
  # (read by a helper that works on Python 3.9+, before tomli can be installed)
  extras=$(python scripts/plugin_extras.py "$pyproject")
  args+=(-e "$(dirname "$pyproject")${extras:+[$extras]}")
done
python -m pip install --quiet "${args[@]}"
