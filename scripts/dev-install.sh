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
# Headless Chromium for the report's browser test (tests/test_report_browser.py), when apt is
# here and we are root; quiet, and never a reason for the install to fail (the test skips and
# says why when there is no browser).
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && ! command -v chromedriver >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; }; } \
    || echo "note: chromium could not be installed with apt-get; tests/test_report_browser.py will skip" >&2
fi
