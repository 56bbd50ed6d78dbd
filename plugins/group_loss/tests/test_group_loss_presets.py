"""The two registered presets: ``group_loss`` (released code: w_ii = 1, CE weight 1) and
``group_loss_paper`` (the paper: w_ii = 0, no CE term), checked against the loop reference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import pml_plugins
from pml_plugin_group_loss import GroupLoss, GroupLossPaper
from pml_plugins.cli import main as cli_main

sys.path.insert(0, str(Path(__file__).parent))  # the loop reference lives next to this file
from test_group_loss_reference import reference_group_loss

pytestmark = pytest.mark.filterwarnings("ignore::pml_plugin_group_loss.GroupLossBatchWarning")


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(12, 5, generator=g, dtype=torch.float64)
    labels = torch.arange(3).repeat_interleave(4)
    return emb, labels


@pytest.mark.parametrize(
    "name, zero_diagonal, ce_weight", [("group_loss", False, 1.0), ("group_loss_paper", True, 0.0)]
)
def test_registry_presets_match_the_reference(name, zero_diagonal, ce_weight):
    loss = pml_plugins.create_loss(name, num_classes=3, embedding_size=5).double()
    assert (loss.zero_diagonal, loss.ce_weight) == (zero_diagonal, ce_weight)
    emb, labels = _batch()
    expected = reference_group_loss(
        emb,
        labels,
        loss.classifier.weight.detach(),
        loss.classifier.bias.detach(),
        loss.temperature,
        loss.num_anchors,
        loss.num_iterations,
        ce_weight,
        zero_diagonal,
    )
    assert float(loss(emb, labels).detach()) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_the_presets_differ_on_the_same_weights():
    emb, labels = _batch(1)
    torch.manual_seed(0)
    released = GroupLoss(3, 5).double()
    paper = GroupLossPaper(3, 5).double()
    paper.load_state_dict(released.state_dict())
    assert float(paper(emb, labels).detach()) != pytest.approx(float(released(emb, labels).detach()))
    # and the paper preset is GroupLoss with the two paper settings, nothing else
    explicit = GroupLoss(3, 5, zero_diagonal=True, ce_weight=0.0).double()
    explicit.load_state_dict(released.state_dict())
    assert float(paper(emb, labels).detach()) == float(explicit(emb, labels).detach())


def test_paper_preset_declares_pretraining_and_both_say_where_they_come_from(capsys):
    paper = pml_plugins.get_entry("loss", "group_loss_paper")
    released = pml_plugins.get_entry("loss", "group_loss")
    assert paper.spec.pretrain_epochs == 10 and paper.spec.demo_pretrain_epochs == 0
    assert released.spec.pretrain_epochs is None
    assert cli_main(["info", "group_loss_paper"]) == 0
    out = capsys.readouterr().out
    assert "origin" in out and "paper" in out and "zero_diagonal=True" in out
    assert cli_main(["info", "group_loss"]) == 0
    out = capsys.readouterr().out
    assert "released code" in out and "github.com/dvl-tum/group_loss" in out
