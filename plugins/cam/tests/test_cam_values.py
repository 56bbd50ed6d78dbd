"""CAM values: the issue's check values, hand-computed cases, and a loop-based reference."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.miners import MultiSimilarityMiner
from pytorch_metric_learning.reducers import DoNothingReducer, SumReducer

import pml_plugins
from pml_plugin_cam import ClassAnchorMarginLoss
from pml_plugin_cam.functional import repeller_loss, repeller_sum


def make_loss(anchors, **kwargs) -> ClassAnchorMarginLoss:
    anchors = torch.as_tensor(anchors, dtype=torch.float32)
    loss = ClassAnchorMarginLoss(anchors.shape[0], anchors.shape[1], **kwargs)
    with torch.no_grad():
        loss.anchors.copy_(anchors)
    return loss


def sub_losses(loss, emb, labels) -> dict:
    """The three sub-losses reduced as PML's default MeanReducer does."""
    reducer, loss.reducer = loss.reducer, DoNothingReducer()
    try:
        out = loss(emb, labels)
    finally:
        loss.reducer = reducer
    return {
        "attractor_loss": float(out["attractor_loss"]["losses"].mean()),
        "repeller_loss": float(out["repeller_loss"]["losses"]),
        "min_norm_loss": float(out["min_norm_loss"]["losses"]),
    }


def reference_cam(emb, labels, anchors, margin=2.0, min_norm=1.0, w_r=1.0, w_n=1.0):
    """Eq. 1-4 with plain Python loops over samples and *ordered* class pairs (float64)."""
    emb, anchors = emb.double(), anchors.double()
    l_a = sum(0.5 * float(((emb[i] - anchors[int(labels[i])]) ** 2).sum()) for i in range(len(labels))) / len(labels)
    t = anchors.shape[0]
    l_r = 0.0
    for y in range(t):
        for y2 in range(t):
            if y != y2:
                d = math.sqrt(float(((anchors[y] - anchors[y2]) ** 2).sum()))
                l_r += max(0.0, 2 * margin - d) ** 2
    l_r *= 0.5
    l_n = 0.5 * sum(max(0.0, min_norm - math.sqrt(float((anchors[y] ** 2).sum()))) ** 2 for y in range(t))
    return l_a, l_r, l_n, l_a + w_r * l_r + w_n * l_n


# ---- the issue's check values -------------------------------------------------------------


def test_issue_check_values():
    loss = make_loss([[1.0, 0.0], [-1.0, 0.0]])
    emb = torch.tensor([[1.0, 1.0], [-2.0, 0.0]])
    labels = torch.tensor([0, 1])
    subs = sub_losses(loss, emb, labels)
    assert subs["attractor_loss"] == pytest.approx(0.5)
    assert subs["repeller_loss"] == pytest.approx(4.0)
    assert subs["min_norm_loss"] == pytest.approx(0.0)
    assert float(loss(emb, labels)) == pytest.approx(4.5)


# ---- hand-computed cases ------------------------------------------------------------------


def test_coincident_anchors_and_anchor_at_origin_by_hand():
    # c0 = c1 = (1, 0), c2 = (0, 0); e0 = (1, 1) label 0, e1 = (-2, 0) label 1.
    # L_A = mean(1/2 * 1, 1/2 * 9) = 2.5
    # L_R = pairs {0,1}: d=0 -> 4^2 = 16; {0,2}, {1,2}: d=1 -> 3^2 = 9 each -> 34
    # L_N = c2 at the origin -> 1/2 * 1^2 = 0.5; total 37
    loss = make_loss([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    emb = torch.tensor([[1.0, 1.0], [-2.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    subs = sub_losses(loss, emb, labels)
    assert subs == pytest.approx({"attractor_loss": 2.5, "repeller_loss": 34.0, "min_norm_loss": 0.5})
    out = loss(emb, labels)
    assert float(out) == pytest.approx(37.0)
    out.backward()
    # dL/dc0 = -(e0 - c0)/2 + [-2 * 3 * (c0 - c2)/1] = (0, -0.5) + (-6, 0)
    # dL/dc1 = -(e1 - c1)/2 + (-6, 0) = (1.5, 0) + (-6, 0); the coincident pair gives 0, not NaN
    # dL/dc2 = (6, 0) + (6, 0); L_N has a zero gradient exactly at the origin
    expected = torch.tensor([[-6.0, -0.5], [-4.5, 0.0], [12.0, 0.0]])
    assert torch.allclose(loss.anchors.grad, expected)
    assert torch.allclose(emb.grad, torch.tensor([[0.0, 0.5], [-1.5, 0.0]]))  # (e_i - c_{y_i}) / B


def test_other_margin_and_min_norm_by_hand():
    # m = 1, p = 3, anchors (1, 0), (-1, 0): d = 2 = 2m -> L_R = 0; L_N = 2 * 1/2 * (3 - 1)^2 = 4
    # e = (1, 0) label 0 -> L_A = 0
    loss = make_loss([[1.0, 0.0], [-1.0, 0.0]], margin=1.0, min_norm=3.0)
    subs = sub_losses(loss, torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert subs == pytest.approx({"attractor_loss": 0.0, "repeller_loss": 0.0, "min_norm_loss": 4.0})


def test_three_anchors_partial_margin_by_hand():
    # m = 2: anchors (0, 3), (4, 0), (0, 0): d01 = 5 > 4 -> 0; d02 = 3 -> 1; d12 = 4 -> 0
    # L_R = 1 (each unordered pair once); L_N = 1/2 (c2 at the origin); with weights 2 and 3: 2 + 1.5
    loss = make_loss([[0.0, 3.0], [4.0, 0.0], [0.0, 0.0]], repeller_weight=2.0, min_norm_weight=3.0)
    emb = torch.tensor([[0.0, 3.0], [4.0, 2.0]])  # L_A = mean(0, 1/2 * 4) = 1
    subs = sub_losses(loss, emb, torch.tensor([0, 1]))
    assert subs == pytest.approx({"attractor_loss": 1.0, "repeller_loss": 2.0, "min_norm_loss": 1.5})
    assert float(loss(emb, torch.tensor([0, 1]))) == pytest.approx(4.5)


def test_single_class_has_no_repeller():
    loss = make_loss([[0.6, 0.8]])  # norm 1 = p
    subs = sub_losses(loss, torch.tensor([[0.6, 0.8], [0.6, 1.8]]), torch.tensor([0, 0]))
    assert subs == pytest.approx({"attractor_loss": 0.25, "repeller_loss": 0.0, "min_norm_loss": 0.0})


# ---- against the loop-based reference -----------------------------------------------------


@pytest.mark.parametrize(
    "t,n,scale,block", [(7, 5, 0.3, 1 << 22), (23, 3, 1.0, 40), (40, 16, 0.05, 100), (12, 2, 2.0, 13)]
)
def test_matches_reference(t, n, scale, block):
    g = torch.Generator().manual_seed(t * n)
    anchors = torch.randn(t, n, generator=g) * scale
    anchors[1] = anchors[0]  # a coincident pair
    anchors[2] = anchors[0] + 1e-3  # a near pair (Gram-matrix cancellation)
    anchors[3] = 0.0  # an anchor at the origin
    emb = torch.randn(17, n, generator=g)
    labels = torch.randint(t, (17,), generator=g)
    loss = make_loss(anchors, margin=0.7, min_norm=0.9, repeller_weight=0.5, min_norm_weight=2.0, block_elements=block)
    ref = reference_cam(emb, labels, anchors, 0.7, 0.9, 0.5, 2.0)
    subs = sub_losses(loss, emb, labels)
    assert subs["attractor_loss"] == pytest.approx(ref[0], rel=1e-5)
    assert subs["repeller_loss"] == pytest.approx(0.5 * ref[1], rel=1e-5, abs=1e-5)
    assert subs["min_norm_loss"] == pytest.approx(2.0 * ref[2], rel=1e-5, abs=1e-6)
    assert float(loss(emb, labels)) == pytest.approx(ref[3], rel=1e-5)


def autograd_reference(anchors: torch.Tensor, margin: float) -> torch.Tensor:
    """Eq. 2 with autograd over an explicit t x t x n difference tensor (small t only)."""
    diff = anchors[:, None, :] - anchors[None, :, :]
    sq = (diff**2).sum(-1)
    off = ~torch.eye(anchors.shape[0], dtype=torch.bool)
    d = torch.where(off, torch.where(off, sq, 1.0).sqrt(), 0.0)
    return 0.5 * ((2 * margin - d).clamp_min(0) ** 2 * off).sum()


@pytest.mark.parametrize("block", [1 << 22, 7, 1])
def test_repeller_gradient_matches_autograd(block):
    g = torch.Generator().manual_seed(3)
    anchors = (torch.randn(30, 6, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    expected = torch.autograd.grad(autograd_reference(anchors, 2.0), anchors)[0]
    value = repeller_loss(anchors, 2.0, block_elements=block)
    got = torch.autograd.grad(value, anchors)[0]
    assert float(value) == pytest.approx(float(autograd_reference(anchors, 2.0)), rel=1e-10)
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-10)


def test_repeller_blocks_and_no_grad_path_agree():
    anchors = torch.randn(300, 8, generator=torch.Generator().manual_seed(1)) * 0.3
    full, grad_full = repeller_sum(anchors, 2.0, need_grad=True)
    small, grad_small = repeller_sum(anchors, 2.0, need_grad=True, block_elements=1000)  # 4 rows per block
    no_grad, none = repeller_sum(anchors, 2.0, need_grad=False)
    assert none is None
    assert torch.allclose(full, small, rtol=1e-6) and torch.allclose(full, no_grad)
    assert torch.allclose(grad_full, grad_small, rtol=1e-5, atol=1e-5)


def test_near_pair_precision_float32():
    # far from the origin and 1e-3 apart: the plain Gram formula would lose ~1e-3 in the distance
    anchors = torch.tensor([[100.0, 50.0, -20.0], [100.0, 50.001, -20.0], [0.0, 0.0, 0.0]])
    value = repeller_loss(anchors, 2.0)
    d = 1e-3  # (float32 rounding of 50.001 keeps it within 1e-6)
    assert float(value) == pytest.approx((4 - d) ** 2, rel=1e-6)


# ---- gradients stay finite in the degenerate places --------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_degenerate_anchors_have_finite_gradients(dtype):
    loss = make_loss(torch.zeros(4, 3))  # all anchors coincide, all at the origin
    emb = torch.zeros(4, 3, dtype=dtype, requires_grad=True)
    out = loss(emb, torch.tensor([0, 1, 2, 3]))
    # L_R = 6 pairs * 4^2, L_N = 4 * 1/2
    assert float(out) == pytest.approx(6 * 16 + 2.0)
    out.backward()
    assert torch.isfinite(loss.anchors.grad).all() and torch.isfinite(emb.grad).all()
    assert emb.grad.dtype == dtype


def test_double_counting_is_the_issue_convention():
    # two anchors at distance 1 (m = 2): ordered pairs (0,1), (1,0) -> 1/2 * 2 * 3^2 = 9, not 18 or 4.5
    assert float(repeller_loss(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), 2.0)) == pytest.approx(9.0)


# ---- PML plumbing ---------------------------------------------------------------------------


def test_reducers_apply_to_attractor_only():
    loss = make_loss([[1.0, 0.0], [-1.0, 0.0]])
    emb = torch.tensor([[1.0, 1.0], [-2.0, 0.0]])
    loss.set_reducer(SumReducer())
    assert float(loss(emb, torch.tensor([0, 1]))) == pytest.approx(1.0 + 4.0 + 0.0)  # L_A summed


def test_miner_weights_scale_the_attractor():
    torch.manual_seed(0)
    loss = ClassAnchorMarginLoss(3, 4)
    emb = torch.randn(12, 4)
    labels = torch.arange(3).repeat_interleave(4)
    pairs = MultiSimilarityMiner(epsilon=0.1)(emb, labels)
    plain, mined = sub_losses(loss, emb, labels), None
    loss.reducer = DoNothingReducer()
    mined = loss(emb, labels, pairs)
    weights = torch.zeros(12)
    idx, counts = torch.unique(torch.cat(pairs), return_counts=True)
    weights[idx] = counts.float() / counts.max()
    per_sample = 0.5 * ((emb - loss.anchors.detach()[labels]) ** 2).sum(1)
    assert torch.allclose(mined["attractor_loss"]["losses"], per_sample * weights, atol=1e-6)
    assert float(mined["repeller_loss"]["losses"]) == pytest.approx(plain["repeller_loss"])


def test_ref_emb_is_rejected():
    loss = ClassAnchorMarginLoss(3, 4)
    with pytest.raises(ValueError, match="ref_emb"):
        loss(torch.randn(4, 4), torch.tensor([0, 1, 2, 0]), ref_emb=torch.randn(2, 4), ref_labels=torch.tensor([0, 1]))


def test_get_logits_are_negative_distances():
    loss = make_loss([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])
    emb = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 0.0]], requires_grad=True)
    logits = loss.get_logits(emb)
    expected = -torch.tensor([[0.0, 2.0, math.sqrt(10)], [3.0, 1.0, math.sqrt(13)], [1.0, 1.0, 3.0]])
    assert torch.allclose(logits, expected)
    assert logits.argmax(1)[:2].tolist() == [0, 1]  # nearest anchor = class
    logits.sum().backward()  # e0 sits on c0: finite (zero) gradient of that distance
    assert torch.isfinite(emb.grad).all() and torch.isfinite(loss.anchors.grad).all()
    half = loss.get_logits(emb.detach().half())
    assert half.dtype == torch.float16 and torch.allclose(half.float(), expected, atol=1e-2)


def test_parameters_stay_float32_and_float64_is_computed_in_float64():
    loss = make_loss([[1.0, 0.0], [-1.0, 0.0]])
    emb = torch.tensor([[1.0, 1.0], [-2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    out = loss(emb, torch.tensor([0, 1]))
    out.backward()
    assert out.dtype == torch.float64 and loss.anchors.dtype == torch.float32
    assert loss.anchors.grad.dtype == torch.float32


def test_autocast_bfloat16_is_finite():
    model = torch.nn.Linear(6, 4)
    loss = ClassAnchorMarginLoss(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(model(torch.randn(10, 6)), torch.randint(5, (10,)))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(loss.anchors.grad).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"margin": 0.0}, "margin"),
        ({"margin": -1.0}, "margin"),
        ({"min_norm": -0.5}, "min_norm"),
        ({"repeller_weight": -1.0}, "repeller_weight"),
        ({"min_norm_weight": float("nan")}, "min_norm_weight"),
        ({"distance": CosineSimilarity()}, "LpDistance"),
        ({"distance": LpDistance()}, "LpDistance"),
        ({"block_elements": 0}, "block_elements"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassAnchorMarginLoss(3, 4, **kwargs)


@pytest.mark.parametrize("num_classes,embedding_size", [(0, 4), (3, 0), (2.5, 4)])
def test_bad_sizes(num_classes, embedding_size):
    with pytest.raises(ValueError):
        ClassAnchorMarginLoss(num_classes, embedding_size)


def test_anchor_shape_and_default_init():
    loss = ClassAnchorMarginLoss(50, 64)
    assert loss.anchors.shape == (50, 64) and isinstance(loss.anchors, torch.nn.Parameter)
    assert loss.sub_loss_names() == ["attractor_loss", "repeller_loss", "min_norm_loss"]
    norms = loss.anchors.detach().norm(dim=1)
    assert 0.7 < float(norms.mean()) < 1.3  # N(0, 1/n): norms near p = 1
    custom = ClassAnchorMarginLoss(3, 4, weight_init_func=lambda w: torch.nn.init.constant_(w, 2.0))
    assert torch.equal(custom.anchors.detach(), torch.full((3, 4), 2.0))


def test_registration_and_metadata():
    entry = pml_plugins.get_entry("loss", "class_anchor_margin")
    assert entry.obj is ClassAnchorMarginLoss
    assert pml_plugins.get_loss("cam") is ClassAnchorMarginLoss
    meta = entry.spec
    assert meta.loss_optimizer is True and meta.retrieval_distance == "euclidean"
    assert meta.loss_lr == pytest.approx(1e-4) and meta.summary and meta.paper and meta.tags
    loss = pml_plugins.create_loss("cam", num_classes=4, embedding_size=3)
    assert (loss.margin, loss.min_norm) == (2.0, 1.0)
