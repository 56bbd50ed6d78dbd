"""The command line's frame: `python -m pml_plugins`, help, version, JSON listing."""

from __future__ import annotations

import json

import pml_plugins


def test_python_m_is_the_command_line(run_cli):
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("list", "info"):
        assert command in result.stdout
    assert run_cli("--version").stdout.strip() == f"pml-plugins {pml_plugins.__version__}"


def test_list_json_includes_builtin(run_cli):
    data = json.loads(run_cli("list", "--json").stdout)
    builtin = next(p for p in data["plugins"] if p["name"] == "builtin")
    assert "proxy_anchor" in builtin["losses"] and "multi_similarity" in builtin["miners"]


def test_info_prints_needs(run_cli):
    out = run_cli("info", "proxy_anchor", "--kind", "loss").stdout
    assert "ProxyAnchorLoss(num_classes, embedding_size, margin=0.1, alpha=32" in out
    assert "an optimizer for its own parameters" in out
