"""Hand-computed values of the Group Loss (issue check values plus our own, derived in comments)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from pytorch_metric_learning.reducers import SumReducer

from pml_plugin_group_loss import (
    GroupLoss,
    GroupLossBatchWarning,
    anchor_mask,
    group_nll,
    initial_assignment,
    pearson_similarity,
    replicator_dynamics,
)

# f1 = (1,2,3), f2 = (1,3,2) label 0; f3 = (3,2,1) label 1. Centred: (-1,0,1), (-1,1,0), (1,0,-1);
# squared norms 2, so corr(1,2) = 1/2, corr(1,3) = -1 -> 0, corr(2,3) = -1/2 -> 0 (ReLU).
EMB = torch.tensor([[1.0, 2.0, 3.0], [1.0, 3.0, 2.0], [3.0, 2.0, 1.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 0, 1])
PRIOR = torch.tensor([[0.5, 0.5], [0.4, 0.6], [0.5, 0.5]], dtype=torch.float64)  # rows 1, 3 become anchors
# the 3-sample example has a single-sample class on purpose
pytestmark = pytest.mark.filterwarnings("ignore::pml_plugin_group_loss.GroupLossBatchWarning")
W_KEEP = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _loss(**kw) -> GroupLoss:
    kw.setdefault("num_anchors", 1)
    kw.setdefault("ce_weight", 0.0)
    return GroupLoss(num_classes=2, embedding_size=3, **kw)


def test_similarity_matrix():
    assert torch.allclose(pearson_similarity(EMB), W_KEEP)
    assert torch.allclose(pearson_similarity(EMB, zero_diagonal=True), W_KEEP - torch.eye(3, dtype=torch.float64))
    # invariant to scaling and translation of each embedding (the paper's reason for eq. 1)
    moved = EMB * torch.tensor([[2.0], [0.5], [7.0]], dtype=torch.float64) + torch.tensor(
        [[3.0], [-1.0], [10.0]], dtype=torch.float64
    )
    assert torch.allclose(pearson_similarity(moved), W_KEEP)


def test_issue_check_values_t1_t2():
    # T = 1: Pi row 2 = .5 (1,0) + (.4,.6) = (.9,.6); x*pi = (.36,.36) -> (.5,.5). Anchors stay one-hot.
    x0 = initial_assignment(PRIOR, LABELS, anchor_mask(LABELS, 1))
    x1 = replicator_dynamics(x0, W_KEEP, 1)
    assert torch.allclose(x1, torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=torch.float64))
    assert group_nll(x1, LABELS).mean().item() == pytest.approx(math.log(2) / 3, abs=1e-9)  # 0.231049
    # T = 2: Pi row 2 = .5 (1,0) + (.5,.5) = (1,.5); x*pi = (.5,.25) -> (2/3,1/3); NLL = ln(3/2)/3
    assert group_nll(replicator_dynamics(x0, W_KEEP, 2), LABELS).mean().item() == pytest.approx(0.135155, abs=1e-6)
    for T, expected in ((1, 0.231049), (2, 0.135155)):
        assert _loss(num_iterations=T)(EMB, LABELS, prior=PRIOR).item() == pytest.approx(expected, abs=1e-6)
        # the same through precomputed logits: softmax(log p / 1) = p
        assert _loss(num_iterations=T, temperature=1.0)(EMB, LABELS, logits=PRIOR.log()).item() == pytest.approx(
            expected, abs=1e-6
        )
        # float32 embeddings and prior give the same
        assert _loss(num_iterations=T)(EMB.float(), LABELS, prior=PRIOR.float()).item() == pytest.approx(
            expected, abs=1e-6
        )


def test_temperature_divides_logits():
    # logits row 2 = (0, 2 ln 1.5) with T = 2 -> softmax(0, ln 1.5) = (1/2.5, 1.5/2.5) = (.4, .6)
    logits = torch.tensor([[0.0, 0.0], [0.0, 2 * math.log(1.5)], [0.0, 0.0]], dtype=torch.float64)
    assert _loss(temperature=2.0)(EMB, LABELS, logits=logits).item() == pytest.approx(math.log(2) / 3, abs=1e-9)
    assert _loss(temperature=1.0)(EMB, LABELS, logits=logits).item() != pytest.approx(math.log(2) / 3, abs=1e-3)


def test_no_anchors_value():
    # num_anchors = 0, prior as above, T = 1:
    # row 1: Pi = (.5,.5) + .5 (.4,.6) = (.7,.8); x*pi = (.35,.40) -> .35/.75 = .466667 -> -ln = 0.762140
    # row 2: Pi = .5 (.5,.5) + (.4,.6) = (.65,.85); x*pi = (.26,.51) -> .26/.77 = .337662 -> 1.085708
    # row 3: Pi = (.5,.5); x*pi = (.25,.25) -> (.5,.5) -> ln 2 = 0.693147;  mean = 2.540995 / 3 = 0.846999
    assert _loss(num_anchors=0)(EMB, LABELS, prior=PRIOR).item() == pytest.approx(0.846999, abs=1e-6)


def test_cross_entropy_term():
    # CE on logits = log p: -ln .5 - ln .4 - ln .5 = ln 10 over 3 samples; total = ln2/3 + 0.5 ln10/3 = 0.614813
    out = _loss(temperature=1.0, ce_weight=0.5)(EMB, LABELS, logits=PRIOR.log())
    assert out.item() == pytest.approx(math.log(2) / 3 + 0.5 * math.log(10) / 3, abs=1e-9)
    # the prior path has no logits, so no CE term even with the default ce_weight = 1
    assert _loss(ce_weight=1.0)(EMB, LABELS, prior=PRIOR).item() == pytest.approx(math.log(2) / 3, abs=1e-9)
    # SumReducer sums per-sample terms: 3 x the means
    loss = _loss(temperature=1.0, ce_weight=0.5, reducer=SumReducer())
    assert loss(EMB, LABELS, logits=PRIOR.log()).item() == pytest.approx(math.log(2) + 0.5 * math.log(10), abs=1e-9)


def test_zero_diagonal_no_support_is_finite():
    # w_ii = 0: row 3 has no positive correlation -> no support -> row left unchanged (its anchor row).
    # row 2: Pi = .5 (1,0) = (.5,0); x*pi = (.2,0) -> (1,0), so the loss is 0 (up to log(1 + 1e-12)).
    emb = EMB.clone().requires_grad_(True)
    for T in (1, 2, 5):
        W = pearson_similarity(emb, zero_diagonal=True)
        x0 = initial_assignment(PRIOR, LABELS, anchor_mask(LABELS, 1))
        xT = replicator_dynamics(x0, W, T)
        assert torch.isfinite(xT).all()
        assert torch.equal(xT[2], x0[2])
        out = _loss(num_iterations=T, zero_diagonal=True)(emb, LABELS, prior=PRIOR)
        out.backward()
        assert torch.isfinite(out) and abs(out.item()) < 1e-9
        assert torch.isfinite(emb.grad).all()
    # a batch where nothing is correlated (all rows support-free) and no anchors: X(T) = X(0)
    orth = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)  # corr = -1/3 -> 0
    p = torch.tensor([[0.3, 0.7], [0.9, 0.1]], dtype=torch.float64)
    assert torch.equal(replicator_dynamics(p, pearson_similarity(orth, zero_diagonal=True), 3), p)


def test_anchor_mask_first_in_batch_order():
    labels = torch.tensor([3, 1, 3, 3, 1, 0, 3])
    assert anchor_mask(labels, 2).tolist() == [True, True, True, False, True, True, False]
    assert anchor_mask(labels, 1).tolist() == [True, True, False, False, False, True, False]
    assert not anchor_mask(labels, 0).any()


def test_replicator_dynamics_increases_consistency():
    # eq. (7)-(8): F(X) = sum_ij w_ij <x_i, x_j> does not decrease along the dynamics (Baum-Eagon)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n, c = 12, 5
        W = pearson_similarity(torch.randn(n, 6, generator=g, dtype=torch.float64), zero_diagonal=True)
        x = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)
        values = []
        for _ in range(6):
            values.append(float(((W @ x) * x).sum()))
            x = replicator_dynamics(x, W, 1)
            assert torch.allclose(x.sum(1), torch.ones(n, dtype=torch.float64))
        assert all(b >= a - 1e-12 for a, b in zip(values, values[1:])), values


def test_gradients_reach_classifier_and_embeddings():
    torch.manual_seed(0)
    loss = GroupLoss(num_classes=4, embedding_size=6)
    emb = torch.randn(8, 6, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    loss(emb, labels).backward()
    assert emb.grad.abs().sum() > 0 and loss.classifier.weight.grad.abs().sum() > 0
    assert loss.classifier.bias is not None and loss.classifier.bias.grad.abs().sum() > 0
    # with ce_weight = 0 the classifier still learns through the prior
    loss = GroupLoss(num_classes=4, embedding_size=6, ce_weight=0.0)
    loss(emb, labels).backward()
    assert loss.classifier.weight.grad.abs().sum() > 0


def test_half_precision_matches_float32():
    torch.manual_seed(1)
    loss = GroupLoss(num_classes=5, embedding_size=8)
    emb = torch.randn(12, 8)
    labels = torch.arange(4).repeat_interleave(3)
    ref = loss(emb, labels).item()
    for dtype, tol in ((torch.float16, 2e-2), (torch.bfloat16, 1e-1), (torch.float64, 1e-5)):
        out = loss(emb.to(dtype), labels)
        assert out.dtype == dtype and out.item() == pytest.approx(ref, rel=tol)


def test_single_class_and_single_sample_warn_and_stay_finite():
    loss = GroupLoss(num_classes=5, embedding_size=4)
    emb = torch.randn(4, 4, requires_grad=True)
    with pytest.warns(GroupLossBatchWarning, match="single class"):
        out = loss(emb, torch.tensor([2, 2, 2, 2]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(emb.grad).all()
    with pytest.warns(GroupLossBatchWarning, match="single sample"):
        out = loss(emb, torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(out)
    with pytest.warns(GroupLossBatchWarning, match="every sample of the batch is an anchor"):
        loss(emb, torch.tensor([0, 0, 1, 1]))
    with warnings.catch_warnings():  # a proper m-per-class batch (m = 3 > num_anchors = 2) is silent
        warnings.simplefilter("error")
        loss(torch.randn(6, 4), torch.tensor([0, 0, 0, 1, 1, 1]))


def test_prior_anchor_rows_are_overwritten_and_bad_priors_rejected():
    # anchor rows may hold anything non-negative: they become one-hot
    p = PRIOR.clone()
    p[0], p[2] = torch.tensor([0.0, 0.0]), torch.tensor([0.9, 0.1])
    loss = _loss()
    assert loss(EMB, LABELS, prior=p).item() == pytest.approx(math.log(2) / 3, abs=1e-9)
    assert loss.compute_from_prior(EMB, LABELS, PRIOR).item() == pytest.approx(math.log(2) / 3, abs=1e-9)
    with pytest.raises(ValueError, match="non-negative"):
        loss(EMB, LABELS, prior=-PRIOR)
    with pytest.raises(ValueError, match="shape"):
        loss(EMB, LABELS, prior=PRIOR[:, :1])
    with pytest.raises(ValueError, match="at most one"):
        loss(EMB, LABELS, prior=PRIOR, logits=PRIOR.log())
    with pytest.raises(ValueError, match="NaN"):
        loss(EMB, LABELS, logits=torch.full((3, 2), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError):
        GroupLoss(2, 3, temperature=0.0)
    with pytest.raises(TypeError):
        GroupLoss(2, 3, num_anchors=1.5)
