"""Real pip-installed plugin packages: discovery, isolation of a broken one, collisions, control."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import pml_plugins


def test_example_plugin_is_discovered_listed_and_created(with_example_plugins):
    info = {p["name"]: p for p in pml_plugins.plugin_info()}
    good = info["example_good"]
    assert good["distribution"] == "pml-plugins-example-good" and good["version"] == "1.2.3"
    assert (
        good["losses"] == ["hinge_pair"]
        and good["miners"] == ["hardest_pair"]
        and good["metrics"] == ["first_neighbor_match"]
    )
    loss = pml_plugins.create_loss("example_hinge", neg_margin=0.5)  # alias, unique
    assert type(loss).__name__ == "HingePairLoss" and loss.neg_margin == 0.5
    emb, labels = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert torch.isfinite(loss(emb, labels))
    assert pml_plugins.get_miner("hardest_pair").__name__ == "HardestPairMiner"
    assert pml_plugins.get_metric("first_neighbor_match").__name__ == "mean_first_neighbor_match"


def test_broken_plugin_is_reported_and_does_not_break_others(example_plugins_site, monkeypatch, fresh_registry):
    monkeypatch.syspath_prepend(str(example_plugins_site))
    with pytest.warns(RuntimeWarning, match="example_broken.*fails on import on purpose"):
        pml_plugins.load_plugins(reload=True)
    info = {p["name"]: p for p in pml_plugins.plugin_info()}
    assert info["example_broken"]["loaded"] is False
    assert "RuntimeError" in info["example_broken"]["errors"][0]
    assert info["example_good"]["loaded"] and info["example_good"]["errors"] == []
    assert "proxy_anchor" in pml_plugins.list_losses()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once: later lookups stay silent
        pml_plugins.list_losses()


def test_colliding_plugin_makes_name_ambiguous(with_example_plugins):
    with pytest.raises(pml_plugins.AmbiguousNameError) as info:
        pml_plugins.get_loss("hinge_pair")
    message = str(info.value)
    assert "pml-plugins-example-good" in message and "pml-plugins-example-colliding" in message
    assert pml_plugins.get_loss("example_good:hinge_pair").__name__ == "HingePairLoss"
    assert pml_plugins.get_loss("example_colliding:hinge_pair").__name__ == "OtherHingePairLoss"


def test_block_list_resolves_the_collision(example_plugins_site, monkeypatch, fresh_registry):
    monkeypatch.syspath_prepend(str(example_plugins_site))
    monkeypatch.setenv("PML_PLUGINS_BLOCK", "example_colliding,example_broken")
    pml_plugins.load_plugins(reload=True)
    assert pml_plugins.get_loss("hinge_pair").__name__ == "HingePairLoss"
    assert "example_broken" not in {p["name"] for p in pml_plugins.plugin_info()}


def test_disable_autoload_and_allow_list(example_plugins_site, monkeypatch, fresh_registry):
    monkeypatch.syspath_prepend(str(example_plugins_site))
    monkeypatch.setenv("PML_PLUGINS_DISABLE_AUTOLOAD", "1")
    pml_plugins.load_plugins(reload=True)
    names = {p["name"] for p in pml_plugins.plugin_info()}
    assert names == {"builtin"}
    pml_plugins.load_plugins(allow=["example_good"], reload=True)
    names = {p["name"] for p in pml_plugins.plugin_info()}
    assert names == {"builtin", "example_good"}
    assert pml_plugins.get_loss("hinge_pair").__name__ == "HingePairLoss"  # no collision: colliding not loaded


def test_cli_list_shows_versions_errors_and_ambiguity(example_plugins_site, run_cli):
    result = run_cli("list", pythonpath=example_plugins_site)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    line = next(x for x in out.splitlines() if x.startswith("example_good "))
    assert line.startswith("example_good  [pml-plugins-example-good 1.2.3, plugin API 1, built for pml-plugins ")
    assert ">=0.1" in line and "<0.2" in line and line.endswith("]  ok")
    assert "example_broken  [pml-plugins-example-broken 0.0.1]  FAILED" in out
    assert "fails on import on purpose" in out
    assert "hinge_pair (ambiguous: use example_good:hinge_pair)" in out
    data = json.loads(run_cli("list", "--json", pythonpath=example_plugins_site).stdout)
    assert sorted(data["ambiguous"]["loss"]["hinge_pair"]) == [
        "example_colliding:hinge_pair",
        "example_good:hinge_pair",
    ]


def test_cli_info_and_unknown_name(example_plugins_site, run_cli):
    result = run_cli("info", "example_good:hinge_pair", pythonpath=example_plugins_site)
    assert result.returncode == 0, result.stderr
    assert "HingePairLoss(pos_margin: float = 0.0, neg_margin: float = 1.0, **kwargs)" in result.stdout
    assert "Hadsell et al., CVPR 2006" in result.stdout and "m-per-class sampler" in result.stdout
    bad = run_cli("info", "hinge_pairr", pythonpath=example_plugins_site)
    assert bad.returncode == 2 and "Did you mean" in bad.stderr and "Traceback" not in bad.stderr
