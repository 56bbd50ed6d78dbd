"""The Python floor the README and pyproject claim (3.9) holds: checked with a real 3.9 interpreter when one is at hand.

The full suite needs torch for that interpreter; these checks need nothing installed: every source
file compiles, the dev install's extras reader works without ``tomllib``, and the typed plugin
contract (``specs``, ``names``: standard library only) behaves the same.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: the testing extra installs tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
FLOOR = (3, 9)
SOURCE_DIRS = ("core", "plugins", "tests", "scripts", "examples", "benchmarks")


def _floor_python() -> str | None:
    """An interpreter of exactly the floor version: on PATH (``python3.9``) or under pyenv."""
    candidates = [shutil.which(f"python{FLOOR[0]}.{FLOOR[1]}")]
    candidates += sorted(str(p) for p in Path.home().glob(f".pyenv/versions/{FLOOR[0]}.{FLOOR[1]}.*/bin/python"))
    for exe in filter(None, candidates):
        out = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() == str(FLOOR):
            return exe
    return None


@pytest.fixture(scope="module")
def floor_python() -> str:
    exe = _floor_python()
    if sys.version_info[:2] == FLOOR:
        return sys.executable
    if exe is None:
        pytest.skip(f"no Python {FLOOR[0]}.{FLOOR[1]} interpreter found (python{FLOOR[0]}.{FLOOR[1]} or pyenv)")
    return exe


def test_the_claimed_floor_is_the_same_everywhere():
    floor = f"{FLOOR[0]}.{FLOOR[1]}"
    for pyproject in [ROOT / "pyproject.toml", *sorted((ROOT / "plugins").glob("*/pyproject.toml"))]:
        assert tomllib.loads(pyproject.read_text())["project"]["requires-python"] == f">={floor}", pyproject
    assert f"Python >= {floor}" in (ROOT / "README.md").read_text()
    ruff = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]
    assert ruff["target-version"] == f"py{FLOOR[0]}{FLOOR[1]}"


def test_every_source_file_compiles_on_the_floor(floor_python):
    files = [str(p) for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    code = (
        "import sys\nbad = []\nfor path in sys.argv[1:]:\n"
        "    try:\n        compile(open(path, encoding='utf-8').read(), path, 'exec')\n"
        "    except SyntaxError as exc:\n        bad.append(f'{path}:{exc.lineno}: {exc.msg}')\n"
        "print('\\n'.join(bad))\n"
    )
    out = subprocess.run([floor_python, "-c", code, *files], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr
    assert len(files) > 100  # the glob found the project


def test_dev_install_reads_extras_without_tomllib(floor_python):
    pyprojects = [ROOT / "pyproject.toml", *sorted((ROOT / "plugins").glob("*/pyproject.toml"))]
    for pyproject in pyprojects:
        expected = [
            k
            for k in tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {})
            if k not in ("gpu", "cuda")
        ]
        out = subprocess.run(
            [floor_python, str(ROOT / "scripts" / "plugin_extras.py"), str(pyproject)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == ",".join(expected), pyproject
    assert "plugin_extras.py" in (ROOT / "scripts" / "dev-install.sh").read_text()
    assert not re.search(r"\btomllib\b", (ROOT / "scripts" / "dev-install.sh").read_text())


def test_the_minimal_extras_reader_agrees_with_tomllib():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import plugin_extras
    finally:
        sys.path.pop(0)
    text = (
        '[project]\nname = "x"\n[project.optional-dependencies]\n# a comment\ntext = ["a>=1", "b"]\n'
        'gpu = ["faiss-gpu"]\n"dotted.name" = [\n    "c[extra]",\n]\n[tool.x]\nnot_an_extra = 1\n'
    )
    assert plugin_extras._extras_minimal(text) == list(tomllib.loads(text)["project"]["optional-dependencies"])
    assert plugin_extras.extras(text) == ["text", "dotted.name"]


def test_the_plugin_contract_runs_on_the_floor(floor_python):
    # specs.py and names.py use the standard library only: load them by path, without torch
    code = f"""
import importlib.util, sys, warnings
def load(name):
    spec = importlib.util.spec_from_file_location(name, {str(ROOT / "core" / "pml_plugins")!r} + f"/{{name}}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
specs, names = load("specs"), load("names")
spec = specs.LossSpec(summary="s", tags="pair", samples_per_class=4, conformance={{"num_views": 2}})
assert spec.tags == ("pair",) and spec.conformance["num_views"] == 2 and "ALIASES" not in spec.as_dict()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    converted = specs.spec_from_metadata("loss", {{"m": 8, "los_lr": 1.0}}, plugin="p", name="n")
assert converted.samples_per_class == 8 and converted.loss_lr is None
assert any("did you mean 'loss_lr'" in str(w.message) for w in caught)
assert names.snake_case("ProxyAnchorLoss", "Loss") == "proxy_anchor"
print("ok")
"""
    out = subprocess.run([floor_python, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
