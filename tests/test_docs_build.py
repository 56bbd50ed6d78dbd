"""The documentation site builds with ``mkdocs build --strict`` (every warning, e.g. a broken link, fails)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed: pip install -e '.[docs]' (the dev extra includes it)",
)


def test_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # mkdocs-material's end-of-life banner
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert (site / "index.html").is_file()
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    # mkdocstrings rendered the docstrings, not just the page's own text
    for anchor in (
        "pml_plugins.registry.create_loss",
        "pml_plugins.testing.check_loss",
        "pml_plugins.testing.parametrize_with_checks",
        "pml_plugins.wrappers.CrossBatchMemory",
    ):
        assert f'id="{anchor}"' in api, f"{anchor} missing from the API reference"
    guide = (site / "writing-a-plugin" / "index.html").read_text(encoding="utf-8")
    assert "new-plugin" in guide and "CosMarginLoss" in guide
