"""Packaging as users install it: sdists and wheels of every distribution, installed into a
fresh virtual environment (no source tree, no editable installs), then used.

Slow (a fresh venv with torch): marked ``packaging``; skip locally with ``-m "not packaging"``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))

pytestmark = pytest.mark.packaging

VERIFY = textwrap.dedent("""
    import inspect, json, sys, warnings
    import pml_plugins
    from pml_plugins.testing import check_loss, check_miner

    assert "site-packages" in pml_plugins.__file__, pml_plugins.__file__
    info = {p["name"]: p for p in pml_plugins.plugin_info()}
    report = {"plugins": {}, "checked": []}
    for name, plugin in info.items():
        keys = ("distribution", "version", "requires_core", "errors", "losses", "miners", "metrics")
        report["plugins"][name] = {k: plugin[k] for k in keys}
    for name, plugin in info.items():
        if name == "builtin":
            continue
        for kind in ("loss", "miner"):
            for short in plugin["losses" if kind == "loss" else "miners"]:
                entry = pml_plugins.get_entry(kind, f"{name}:{short}")
                params = inspect.signature(entry.obj).parameters
                kwargs = {}
                if "num_classes" in params:
                    kwargs["num_classes"] = 6
                if "embedding_size" in params:
                    kwargs["embedding_size"] = 8
                factory = entry.metadata.get("conformance_factory")
                if factory is not None:
                    make = lambda factory=factory: factory(6, 8)
                elif kind == "loss":
                    make = lambda q=entry.qualified_name, kw=kwargs: pml_plugins.create_loss(q, **kw)
                else:
                    make = lambda q=entry.qualified_name, kw=kwargs: pml_plugins.create_miner(q, **kw)
                make()  # create by name works
                options = dict(entry.metadata.get("conformance", {}))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if kind == "loss":
                        check_loss(make, embedding_size=8, num_classes=6 if "num_classes" in params else None,
                                   max_examples=5, **options)
                    else:
                        check_miner(make, embedding_size=8, max_examples=5, **options)
                report["checked"].append(entry.qualified_name)
    print(json.dumps(report))
""")


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def _dist_name(project: Path) -> str:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11: the testing extra installs tomli
        import tomli as tomllib

    return tomllib.loads((project / "pyproject.toml").read_text())["project"]["name"]


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheels")
    for project in [ROOT, *PLUGINS]:
        # sdist first, then the wheel built from that sdist: proves the sdist is complete
        _run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", out, project])
    return out


def test_every_distribution_builds_an_sdist_and_a_wheel(wheelhouse):
    built = {p.name for p in wheelhouse.iterdir()}
    for project in [ROOT, *PLUGINS]:
        stem = _dist_name(project).replace("-", "_")
        assert any(n.startswith(stem) and n.endswith(".whl") for n in built), f"no wheel for {stem}: {sorted(built)}"
        assert any(n.startswith(stem) and n.endswith(".tar.gz") for n in built), f"no sdist for {stem}: {sorted(built)}"


def test_clean_venv_install_lists_creates_and_passes_the_kit(wheelhouse, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PML_PLUGINS_BLOCK", "PML_PLUGINS_ALLOW", "PML_PLUGINS_DISABLE_AUTOLOAD")
    }
    pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--find-links", wheelhouse]
    # torch first: the CPU build on this machine's disk (small); any torch PML supports would do
    torch_spec = "torch==2.13.0"
    if subprocess.run([*map(str, pip), torch_spec], capture_output=True, env=env).returncode != 0:
        import torch

        _run([*pip, f"torch=={torch.__version__.split('+')[0]}"], env=env)
    if PLUGINS:
        # a plugin alone must pull the core in
        first = _dist_name(PLUGINS[0])
        _run([*pip, first], env=env, cwd=tmp_path)
        _run([py, "-c", "import pml_plugins, sys; print(pml_plugins.__version__)"], env=env, cwd=tmp_path)
    _run([*pip, "pml-plugins[cpu,testing]", *[_dist_name(p) for p in PLUGINS]], env=env, cwd=tmp_path)

    listing = _run([venv / "bin" / "pml-plugins", "list"], env=env, cwd=tmp_path).stdout
    assert "FAILED" not in listing and "error " not in listing, listing
    verify = tmp_path / "verify.py"
    verify.write_text(VERIFY)
    report = json.loads(_run([py, verify], env=env, cwd=tmp_path, timeout=900).stdout.strip().splitlines()[-1])
    distributions = {p["distribution"] for p in report["plugins"].values()}
    for project in PLUGINS:
        assert _dist_name(project) in distributions, f"{_dist_name(project)} not discovered: {report['plugins']}"
    for name, plugin in report["plugins"].items():
        assert plugin["errors"] == [], f"{name}: {plugin['errors']}"
        if name != "builtin":
            assert plugin["requires_core"], f"{name} does not declare which pml-plugins it was built for"
    expected = sum(len(p["losses"]) + len(p["miners"]) for n, p in report["plugins"].items() if n != "builtin")
    assert len(report["checked"]) == expected
