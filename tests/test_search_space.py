"""Search-space declarations (registry metadata ``search_space``) and what ``pml-plugins info`` shows."""

from __future__ import annotations

import pytest

import pml_plugins
from pml_plugins.cli import main
from pml_plugins.search_space import (
    SearchParam,
    entry_search_space,
    parse_search_space,
    suggest,
)


def test_declaration_forms():
    space = parse_search_space(
        {
            "margin": (0.0, 0.5),
            "scale": (4, 64, "log"),
            "k": (1, 8, "int"),
            "n": [2, 64, "int", "log"],
            "reducer": {"choices": ["mean", "sum"]},
            "t": {"low": 0.01, "high": 1.0, "log": True},
            "p": SearchParam(low=1, high=2),
        }
    )
    assert space["margin"] == SearchParam(low=0.0, high=0.5)
    assert space["scale"].log and not space["scale"].integer
    assert space["k"].integer and not space["k"].log and space["n"].integer and space["n"].log
    assert space["reducer"].choices == ("mean", "sum") and space["t"].log
    assert space["scale"].describe() == "[4, 64] log" and space["k"].describe() == "{1..8} int"
    assert parse_search_space(None) == {}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"m": (0.5, 0.1)}, "low must be < high"),
        ({"m": (0.0, 1.0, "log")}, "log-scaled range needs low > 0"),
        ({"m": (0.5, 2.5, "int")}, "integer range needs integer bounds"),
        ({"m": (0.0, 1.0, "square")}, "unknown flags"),
        ({"m": 0.5}, "expected (low, high"),
        ({"m": {"choices": []}}, "at least one value"),
        ({"m": {"low": 0, "hi": 1}}, "unknown keys"),
        ({"not a name": (0, 1)}, "argument names"),
    ],
)
def test_bad_declarations_name_the_entry(bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_search_space(bad)


def test_suggest_draws_within_the_space():
    optuna = pytest.importorskip("optuna")
    space = parse_search_space({"a": (0.1, 10.0, "log"), "b": (1, 3, "int"), "c": {"choices": ["x", "y"]}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        values = suggest(trial, space)
        assert 0.1 <= values["a"] <= 10 and values["b"] in (1, 2, 3) and values["c"] in ("x", "y")
        study.tell(trial, values["a"])
    assert study.trials[0].distributions["a"].log is True


def test_reference_and_plugin_losses_declare_spaces(capsys):
    for name in ("proxy_anchor", "soft_triple", "normalized_softmax", "contrastive"):
        space = entry_search_space(pml_plugins.get_entry("loss", name))
        assert space, name
    assert "loss_lr" in entry_search_space(pml_plugins.get_entry("loss", "proxy_anchor"))
    assert "loss_lr" not in entry_search_space(pml_plugins.get_entry("loss", "contrastive"))  # no parameters
    assert main(["info", "proxy_anchor"]) == 0
    shown = capsys.readouterr().out
    assert "search space for compare --tune (3 parameters)" in shown and "alpha" in shown and "[4, 128] log" in shown
    assert main(["info", "n_pairs"]) == 0
    assert "no search space declared" in capsys.readouterr().out
    installed = set(pml_plugins.list_losses())
    for name in ("multi_proxy_anchor", "class_anchor_margin", "group_loss", "adaptive_margin_softmax", "dmcac"):
        if name in installed:
            assert entry_search_space(pml_plugins.get_entry("loss", name)), name
