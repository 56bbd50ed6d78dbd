"""Lint in CI: ``ruff check .`` and ``ruff format --check .`` with the root pyproject's ``[tool.ruff]``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    """The ruff command: the executable on PATH, else ``python -m ruff``; skip when neither is installed."""
    exe = shutil.which("ruff")
    if exe:
        return [exe]
    probe = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True, text=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "ruff"]
    pytest.skip("ruff is not installed: pip install 'pml-plugins[dev]' (or pip install ruff) to lint")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*_ruff(), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_check_passes():
    out = _run("check", ".", "--no-cache", "--output-format", "concise")
    assert out.returncode == 0, f"ruff check . found problems:\n{out.stdout}{out.stderr}"


def test_ruff_format_check_passes():
    out = _run("format", "--check", ".", "--no-cache")
    assert out.returncode == 0, f"ruff format --check . would reformat:\n{out.stdout}{out.stderr}"


def test_ruff_sees_the_project_configuration():
    # a check that can fail: the config is the root pyproject's, with our line length and rules
    out = _run("check", "--show-settings", "core/pml_plugins/registry.py")
    assert out.returncode == 0, out.stderr
    assert f'Settings path: "{ROOT / "pyproject.toml"}"' in out.stdout
    assert "linter.line_length = 120" in out.stdout
