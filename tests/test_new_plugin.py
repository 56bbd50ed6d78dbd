"""``pml-plugins new-plugin``: the generated package installs with pip, passes its own tests and is listed."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pml_plugins.cli import main
from pml_plugins.cli.new_plugin_command import plugin_names
from pml_plugins.testing import check_loss

EXPECTED_FILES = (
    "pyproject.toml",
    "README.md",
    "src/pml_plugin_toy_margin/__init__.py",
    "src/pml_plugin_toy_margin/toy_margin_loss.py",
    "src/pml_plugin_toy_margin/plugin.py",
    "tests/test_toy_margin_loss.py",
)


def _env_with(path: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH", "")]))
    return env


def test_generated_plugin_installs_passes_its_tests_and_is_listed(tmp_path):
    made = subprocess.run(
        [sys.executable, "-m", "pml_plugins", "new-plugin", "toy-margin", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    package = tmp_path / "toy_margin"
    for relative in EXPECTED_FILES:
        assert (package / relative).is_file(), f"{relative} was not generated"
    pyproject = (package / "pyproject.toml").read_text()
    assert 'name = "pml-plugin-toy-margin"' in pyproject
    assert '[project.entry-points.pml_plugins]\ntoy_margin = "pml_plugin_toy_margin.plugin"' in pyproject
    assert "pml-plugins>=0.1,<0.2" in pyproject
    plugin_py = (package / "src/pml_plugin_toy_margin/plugin.py").read_text()
    assert "pml_plugins_api_version = 1" in plugin_py and "@pml_plugins.hookimpl" in plugin_py
    assert "parametrize_with_checks" in (package / "tests/test_toy_margin_loss.py").read_text()

    # a real pip install (not a mocked entry point), into a private folder as tests/conftest.py does
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--target",
            str(site),
            str(package),
        ],
        check=True,
        timeout=300,
    )
    assert list(site.glob("pml_plugin_toy_margin-0.1.0.dist-info/entry_points.txt"))

    # its own tests: hand value, loop reference, registration by name, the conformance kit
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests"],
        cwd=package,
        env=_env_with(site),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    for case in (
        "test_value_by_hand",
        "test_matches_loop_reference",
        "test_registered_by_name",
        "test_conformance[ToyMarginLoss-check_is_pml_loss]",
        "test_conformance[ToyMarginLoss-check_trainer_step]",
    ):
        assert f"{case} PASSED" in tests.stdout, f"{case} did not pass:\n{tests.stdout[-4000:]}"

    listed = subprocess.run(
        [sys.executable, "-m", "pml_plugins", "list"], env=_env_with(site), capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    header = next(
        (i for i, line in enumerate(lines) if line.startswith("toy_margin  [pml-plugin-toy-margin 0.1.0")), None
    )
    assert header is not None, listed.stdout
    assert lines[header].rstrip().endswith("ok") and lines[header + 1].split() == ["losses", "toy_margin"]


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("my_margin", ("my_margin", "pml-plugin-my-margin", "pml_plugin_my_margin", "MyMarginLoss", "my_margin_loss")),
        ("my-margin", ("my_margin", "pml-plugin-my-margin", "pml_plugin_my_margin", "MyMarginLoss", "my_margin_loss")),
        ("MyMargin", ("my_margin", "pml-plugin-my-margin", "pml_plugin_my_margin", "MyMarginLoss", "my_margin_loss")),
        ("focal_loss", ("focal_loss", "pml-plugin-focal-loss", "pml_plugin_focal_loss", "FocalLoss", "focal_loss")),
        ("arc2", ("arc2", "pml-plugin-arc2", "pml_plugin_arc2", "Arc2Loss", "arc2_loss")),
    ],
)
def test_names_derived_from_name(raw, expected):
    names = plugin_names(raw)
    assert (names.name, names.dist, names.module, names.class_name, names.loss_module) == expected


@pytest.mark.parametrize("raw", ["9lives", "my loss", "a.b", "", "builtin", "class", "my__margin", "_x"])
def test_bad_names_are_refused(raw):
    with pytest.raises(ValueError, match="plugin name"):
        plugin_names(raw)


def test_refuses_an_existing_folder_and_a_taken_name(tmp_path, capsys, fresh_registry):
    (tmp_path / "my_margin").mkdir()
    (tmp_path / "my_margin" / "keep.txt").write_text("mine")
    assert main(["new-plugin", "my_margin", "--dir", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "my_margin" / "keep.txt").read_text() == "mine"
    assert main(["new-plugin", "proxy_anchor", "--dir", str(tmp_path)]) == 2
    assert "already registered by builtin:proxy_anchor" in capsys.readouterr().err
    assert not (tmp_path / "proxy_anchor").exists()


def test_generated_sources_compile(tmp_path, capsys, fresh_registry):
    assert main(["new-plugin", "compiles_ok", "--dir", str(tmp_path)]) == 0
    assert "next steps" in capsys.readouterr().out
    for path in (tmp_path / "compiles_ok").rglob("*.py"):
        compile(path.read_text(), str(path), "exec")
    assert "${" not in "".join(p.read_text() for p in (tmp_path / "compiles_ok").rglob("*") if p.is_file())


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_the_guides_loss_passes_its_tests_and_the_kit(tmp_path, capsys, fresh_registry):
    """docs/writing-a-plugin.md turns the template into CosFace: its code and tests stay correct."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "writing-a-plugin.md").read_text(encoding="utf-8")
    blocks = _python_blocks(guide)
    loss_class = next(b for b in blocks if b.startswith("class CosMarginLoss("))
    tests = [b for b in blocks if "def test_value_by_hand" in b or "def test_matches_pml_cosface" in b]
    assert len(tests) == 2
    assert main(["new-plugin", "cos_margin", "--dir", str(tmp_path)]) == 0
    generated = (tmp_path / "cos_margin/src/pml_plugin_cos_margin/cos_margin_loss.py").read_text()
    header = generated[: generated.index("class CosMarginLoss(")]  # the template's imports
    namespace: dict = {"__name__": "guide_cos_margin"}
    exec(compile(header + loss_class, "writing-a-plugin.md", "exec"), namespace)
    cls = namespace["CosMarginLoss"]
    test_namespace = {"CosMarginLoss": cls, "math": math, "pytest": pytest, "torch": torch}
    for block in tests:
        exec(compile(block, "writing-a-plugin.md", "exec"), test_namespace)
    test_namespace["test_value_by_hand"]()
    test_namespace["test_matches_pml_cosface"]()
    check_loss(lambda: cls(num_classes=10, embedding_size=8), embedding_size=8, num_classes=10, max_examples=5)
