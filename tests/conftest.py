"""Shared fixtures: the example plugin packages, pip-installed into a private folder."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import pml_plugins
from pml_plugins import registry as reg

EXAMPLES = Path(__file__).parent / "example_plugins"


@pytest.fixture(scope="session")
def example_plugins_site(tmp_path_factory) -> Path:
    """A folder with the three example plugins installed by pip (real dist-info and entry points).

    Installed with ``--target`` rather than into the environment, so a developer's
    ``pml-plugins list`` never shows the deliberately broken test plugins afterwards.
    """
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target),
         str(EXAMPLES / "good"), str(EXAMPLES / "broken"), str(EXAMPLES / "colliding")],
        check=True,
    )
    return target


@pytest.fixture
def fresh_registry():
    """Start every registry test from an empty registry, and leave none behind."""
    reg.registry.reset()
    yield reg.registry
    reg.registry.reset()


@pytest.fixture
def with_example_plugins(example_plugins_site, monkeypatch, fresh_registry):
    """The example plugins visible to entry-point discovery in this process."""
    monkeypatch.syspath_prepend(str(example_plugins_site))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the broken plugin warns; tested separately
        pml_plugins.load_plugins(reload=True)
    yield example_plugins_site


@pytest.fixture
def run_cli():
    """``run_cli(*args, pythonpath=None, env=None)`` runs ``python -m pml_plugins ARGS`` in a subprocess."""
    return _run_cli


def _run_cli(*args: str, pythonpath: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, **(env or {}))
    if pythonpath is not None:
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), environment.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "pml_plugins", *args], capture_output=True, text=True, env=environment, timeout=300
    )
