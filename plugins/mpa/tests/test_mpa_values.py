"""Hand-computed values of the MPA family (Saeki et al., eq. 1, 3, 6, 7, 12, 13, 15-17)."""

from __future__ import annotations

import math

import pytest
import torch

import pml_plugins
from pml_plugin_mpa import MultiProxyAnchorAPLoss, MultiProxyAnchorDWLoss, MultiProxyAnchorLoss

CLASSES = (MultiProxyAnchorLoss, MultiProxyAnchorDWLoss, MultiProxyAnchorAPLoss)
# the issue's setting: K = 2; class 0 {(0.6, 0.8), (0.6, -0.8)}, class 1 {(-0.6, 0.8), (-0.6, -0.8)}
PROXIES = torch.tensor([[0.6, 0.8], [0.6, -0.8], [-0.6, 0.8], [-0.6, -0.8]])  # row c * K + k
EMB = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
LABELS = torch.tensor([0, 1, 0])


def make(cls, **kw):
    loss = cls(num_classes=2, embedding_size=2, proxies_per_class=2, **kw)
    with torch.no_grad():
        loss.proxies.copy_(PROXIES)
    return loss


def test_issue_similarity_and_regulariser():
    loss = make(MultiProxyAnchorLoss, alpha=1.0)
    # x0.w = (0.6, 0.6) / (-0.6, -0.6): equal cosines, so S is the cosine; x2.w = (0.8, -0.8),
    # softmax(8, -8) ~ (1 - 1.1e-7, 1.1e-7) so S(x2, 0) = 0.8 - 2e-7
    expected = torch.tensor([[0.6, -0.6], [-0.6, 0.6], [0.8, 0.8]])
    assert torch.allclose(loss.get_logits(EMB), expected, atol=1e-6, rtol=0)
    # per class one pair with w_0.w_1 = 0.36 - 0.64 = -0.28: sqrt(2.56 + 1e-5) = 1.6000031;
    # two classes / (C K (K - 1) = 4) = 0.8000016
    assert loss.regularizer().item() == pytest.approx(0.8, abs=1e-5)
    assert loss.regularizer().item() == pytest.approx(2 * math.sqrt(2.56 + 1e-5) / 4, rel=1e-6)


@pytest.mark.parametrize(
    "cls, expected",
    [
        (MultiProxyAnchorLoss, 1.70713),  # the issue's check values
        (MultiProxyAnchorDWLoss, 1.34022),
        (MultiProxyAnchorAPLoss, 1.14801),
    ],
)
def test_issue_totals(cls, expected):
    loss = make(cls, alpha=1.0, delta=0.1, gamma=0.1, tau=0.2)
    assert loss(EMB, LABELS).item() == pytest.approx(expected, abs=1e-5)


# Own hand computation, alpha = 2, delta = 0 (S as above, tau * reg = 0.2 * 0.8000016):
# MPA pos: class 0: log(1 + e^-1.2 + e^-1.6) = log(1.503091) = 0.407523; class 1: log(1 + e^-1.2)
#   = 0.263282; mean over |C+| = 2 -> 0.335403.
# MPA neg: class 0 (x1, S = -0.6): log(1 + e^-1.2) = 0.263282; class 1 (x0 S = -0.6, x2 S = 0.8):
#   log(1 + e^-1.2 + e^1.6) = log(6.254226) = 1.833257; / C = 2 -> 1.048270. Total 1.543673.
# MPA-DW: x0, x1: 2 log(1 + e^-1.2) = 0.526565 each; x2: log(1 + e^-1.6) + log(1 + e^1.6)
#   = 0.183901 + 1.783901 = 1.967802; mean 1.006977 + 0.160000 = 1.166977.
# MPA-AP: x0, x1: log(1 + 2 e^-1.2) = 0.471495 each; x2: log(1 + e^-1.6 + e^1.6) = 1.817253;
#   mean 0.920081 + 0.160000 = 1.080082.
@pytest.mark.parametrize(
    "cls, expected",
    [
        (MultiProxyAnchorLoss, 1.543673),
        (MultiProxyAnchorDWLoss, 1.166977),
        (MultiProxyAnchorAPLoss, 1.080082),
    ],
)
def test_own_hand_values(cls, expected):
    loss = make(cls, alpha=2.0, delta=0.0)
    assert loss(EMB, LABELS).item() == pytest.approx(expected, abs=2e-5)


def test_mpa_normalisation_counts_present_and_all_classes():
    # 3 classes, only class 0 present: pos / |C+| = 1, neg / C = 3 (not / |classes with negatives|)
    loss = MultiProxyAnchorLoss(num_classes=3, embedding_size=2, proxies_per_class=1, alpha=1.0, delta=0.0, tau=0.0)
    with torch.no_grad():
        loss.proxies.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    emb, labels = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    # pos: log(1 + e^-1); neg: classes 1 (S = 0) and 2 (S = -1): log(1 + 1) + log(1 + e^-1), / 3
    expected = math.log1p(math.exp(-1)) + (math.log(2) + math.log1p(math.exp(-1))) / 3
    assert loss(emb, labels).item() == pytest.approx(expected, rel=1e-6)


def test_proxy_row_layout_is_class_major():
    # row c * K + k is proxy k of class c: putting x on row 1 * 3 + 2 makes class 1 the most similar
    loss = MultiProxyAnchorAPLoss(num_classes=4, embedding_size=8, proxies_per_class=3)
    x = torch.nn.functional.normalize(loss.proxies[5].detach(), dim=0)[None]
    assert loss.get_logits(x).argmax(1).item() == 1
    assert loss.proxies.shape == (12, 8)


def test_regulariser_zero_for_one_proxy_and_tau_weight():
    one = MultiProxyAnchorLoss(num_classes=5, embedding_size=4, proxies_per_class=1, tau=0.5)
    assert one.regularizer().item() == 0.0
    emb, labels = torch.randn(6, 4), torch.randint(5, (6,))
    for cls in CLASSES:
        a, b = cls(3, 4, proxies_per_class=3, tau=0.0), cls(3, 4, proxies_per_class=3, tau=0.7)
        b.load_state_dict(a.state_dict())
        labels = torch.tensor([0, 1, 2, 0, 1, 2])
        assert (b(emb, labels) - a(emb, labels)).item() == pytest.approx(0.7 * b.regularizer().item(), rel=1e-5)


def test_defaults_and_validation():
    loss = MultiProxyAnchorLoss(num_classes=3, embedding_size=4)
    assert (loss.proxies_per_class, loss.alpha, loss.delta, loss.gamma, loss.tau) == (10, 32.0, 0.1, 0.1, 0.2)
    for bad in ({"proxies_per_class": 0}, {"gamma": 0.0}, {"tau": -1.0}, {"alpha": float("nan")}):
        with pytest.raises(ValueError):
            MultiProxyAnchorDWLoss(num_classes=3, embedding_size=4, **bad)
    from pytorch_metric_learning.distances import LpDistance

    with pytest.raises(ValueError, match="CosineSimilarity"):
        MultiProxyAnchorAPLoss(num_classes=3, embedding_size=4, distance=LpDistance())


@pytest.mark.parametrize(
    "name, cls",
    [
        ("multi_proxy_anchor", MultiProxyAnchorLoss),
        ("multi_proxy_anchor_dw", MultiProxyAnchorDWLoss),
        ("multi_proxy_anchor_ap", MultiProxyAnchorAPLoss),
    ],
)
def test_registered(name, cls):
    assert pml_plugins.get_loss(name) is cls
    meta = pml_plugins.get_entry("loss", name).spec
    assert meta.loss_optimizer is True and meta.loss_lr == 1e-2 and meta.retrieval_distance == "cosine"
    assert meta.summary and meta.paper and meta.tags
    assert isinstance(pml_plugins.create_loss(name, num_classes=3, embedding_size=4), cls)
