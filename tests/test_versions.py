"""The versioning scheme of CHANGELOG.md holds: versions agree, every release is in the changelog,
every plugin's core range admits this core."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: the testing extra installs tomli
    import tomli as tomllib

import pml_plugins

ROOT = Path(__file__).resolve().parents[1]
PYPROJECTS = [ROOT / "pyproject.toml", *sorted((ROOT / "plugins").glob("*/pyproject.toml"))]


def _project(path: Path) -> dict:
    return tomllib.loads(path.read_text())["project"]


def test_core_version_attribute_matches_its_pyproject():
    assert pml_plugins.__version__ == _project(ROOT / "pyproject.toml")["version"]


@pytest.mark.parametrize("pyproject", PYPROJECTS, ids=lambda p: p.parent.name)
def test_every_distribution_version_is_in_the_changelog(pyproject):
    project = _project(pyproject)
    assert f"**{project['name']} {project['version']}**" in (ROOT / "CHANGELOG.md").read_text()


@pytest.mark.parametrize("pyproject", PYPROJECTS[1:], ids=lambda p: p.parent.name)
def test_every_plugin_requires_a_core_range_that_admits_this_core(pyproject):
    reqs = [Requirement(r) for r in _project(pyproject)["dependencies"]]
    core = [r for r in reqs if r.name == "pml-plugins"]
    assert len(core) == 1 and core[0].specifier, f"{pyproject}: needs one versioned pml-plugins requirement"
    assert pml_plugins.__version__ in core[0].specifier
