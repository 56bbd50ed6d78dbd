"""Values of eq. 1-3 computed by hand, the special cases against PML, d's validation and storage."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.losses import CosFaceLoss, NormalizedSoftmaxLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner
from pytorch_metric_learning.reducers import SumReducer

import pml_plugins
from pml_plugin_adaptive_margin import AdaptiveMarginSoftmaxLoss, check_class_distances, load_class_distances

PROXIES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
D = torch.tensor([[0.0, 0.5, 1.0], [0.5, 0.0, 0.25], [1.0, 0.25, 0.0]])
X = torch.tensor([[0.6, 0.8]])


def lse(*values: float) -> float:
    return math.log(sum(math.exp(v) for v in values))


def make(d=D, margin=0.4, scale=1.0, proxies=PROXIES, **kw) -> AdaptiveMarginSoftmaxLoss:
    loss = AdaptiveMarginSoftmaxLoss(
        num_classes=proxies.shape[0],
        embedding_size=proxies.shape[1],
        class_distances=d,
        margin=margin,
        scale=scale,
        **kw,
    )
    with torch.no_grad():
        loss.proxies.copy_(proxies)
    return loss


def test_issue_check_value():
    # cos = (0.6, 0.8, -0.6); label 0: target 1 * (0.6 - 0.4) = 0.2;
    # z=1: 0.8 + 0.2 * 0.5 = 0.9; z=2: -0.6 + 1.6 * 1.0 = 1.0
    expected = lse(0.2, 0.9, 1.0) - 0.2
    assert expected == pytest.approx(1.65619, abs=1e-5)
    assert make()(X, torch.tensor([0])).item() == pytest.approx(expected, abs=1e-6)


def test_hand_values():
    # label 1: target 0.8 - 0.4 = 0.4; z=0: 0.6 + 0.4 * d10 (0.5) = 0.8; z=2: -0.6 + 1.6 * d12 (0.25) = -0.2
    # ln(1.49182 + 2.22554 + 0.81873) - 0.4 = ln(4.53609) - 0.4 = 1.11207
    label1 = lse(0.4, 0.8, -0.2) - 0.4
    assert label1 == pytest.approx(1.11207, abs=1e-5)
    assert make()(X, torch.tensor([1])).item() == pytest.approx(label1, abs=1e-6)
    # s = 2, label 0: logits 0.4, 1.8, 2.0 -> ln(1.49182 + 6.04965 + 7.38906) - 0.4 = 2.30341
    assert make(scale=2.0)(X, torch.tensor([0])).item() == pytest.approx(2.30341, abs=1e-5)
    # label 2: cos_2 = -0.6: target -1.0; z=0: 0.6 + 0.4 * 1.0 = 1.0; z=1: 0.8 + 0.2 * 0.25 = 0.85
    # ln(0.36788 + 2.71828 + 2.33965) + 1.0 = ln(5.42581) + 1 = 2.69117
    assert make()(X, torch.tensor([2])).item() == pytest.approx(2.69117, abs=1e-5)
    # batch mean of labels 0 and 1: (1.65619 + 1.11207) / 2 = 1.38413
    assert make()(X.repeat(2, 1), torch.tensor([0, 1])).item() == pytest.approx(1.38413, abs=1e-5)
    # d = None (LMCL, eq. 2), label 0: logits 0.2, 0.8, -0.6 -> ln(1.22140 + 2.22554 + 0.54881) - 0.2 = 1.18523
    assert make(d=None)(X, torch.tensor([0])).item() == pytest.approx(1.18523, abs=1e-5)


def test_scale_free_in_embedding_and_proxy_norms():
    # both are normalised in the forward pass: (3, 4) is (0.6, 0.8); proxies scaled by 2, 5, 3
    loss = make(proxies=PROXIES * torch.tensor([[2.0], [5.0], [3.0]]))
    assert loss(X * 5, torch.tensor([0])).item() == pytest.approx(lse(0.2, 0.9, 1.0) - 0.2, abs=1e-6)


def test_get_logits_has_no_margins():
    logits = make(scale=20.0).get_logits(X)
    assert torch.allclose(logits, 20 * torch.tensor([[0.6, 0.8, -0.6]]), atol=1e-5)


def test_d_equal_one_gives_zero_gradient():
    # d_02 = 1: the negative logit of class 2 is s (cos + (1 - cos)) = s, a constant
    loss = make(scale=20.0)
    x = X.clone().requires_grad_(True)
    loss(x, torch.tensor([0])).backward()
    assert torch.equal(loss.proxies.grad[2], torch.zeros(2))
    assert loss.proxies.grad[1].abs().sum() > 0  # d_01 = 0.5 < 1: class 1 still pushes


def _copies(num_classes=10, embedding_size=8, margin=0.4, scale=20.0, seed=0):
    torch.manual_seed(seed)
    ours = AdaptiveMarginSoftmaxLoss(num_classes, embedding_size, margin=margin, scale=scale)
    zeros = AdaptiveMarginSoftmaxLoss(
        num_classes, embedding_size, class_distances=torch.zeros(num_classes, num_classes), margin=margin, scale=scale
    )
    cosface = CosFaceLoss(num_classes=num_classes, embedding_size=embedding_size, margin=margin, scale=scale)
    normsoftmax = NormalizedSoftmaxLoss(num_classes=num_classes, embedding_size=embedding_size, temperature=1 / scale)
    with torch.no_grad():
        zeros.proxies.copy_(ours.proxies)
        cosface.W.copy_(ours.proxies.t())  # PML stores (embedding_size, num_classes)
        normsoftmax.W.copy_(ours.proxies.t())
    return ours, zeros, cosface, normsoftmax


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_d_zero_equals_pml_cosface(dtype, tol, seed):
    ours, zeros, cosface, _ = _copies(seed=seed)
    emb = torch.randn(32, 8, dtype=dtype, generator=torch.Generator().manual_seed(seed)) * 3
    labels = torch.randint(10, (32,), generator=torch.Generator().manual_seed(seed + 100))
    expected = cosface(emb, labels)
    # same function up to rounding: PML's (D, C) W and our (C, D) proxies take different matmul paths
    for loss in (ours, zeros):
        e = emb.clone().requires_grad_(True)
        value = loss(e, labels)
        torch.testing.assert_close(value, expected, rtol=tol, atol=tol)
        value.backward()
        e2 = emb.clone().requires_grad_(True)
        cosface.W.grad = None
        cosface(e2, labels).backward()
        torch.testing.assert_close(e.grad, e2.grad, rtol=100 * tol, atol=100 * tol)
        # our proxies stay float32 (PML's cast_types turns W into the batch dtype)
        torch.testing.assert_close(loss.proxies.grad.double(), cosface.W.grad.t().double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
def test_d_zero_m_zero_equals_pml_normalized_softmax(dtype, tol):
    for scale in (20.0, 1.0, 32.0):
        ours, zeros, _, normsoftmax = _copies(margin=0.0, scale=scale)
        emb = torch.randn(16, 8, dtype=dtype)
        labels = torch.randint(10, (16,))
        expected = normsoftmax(emb, labels)
        torch.testing.assert_close(ours(emb, labels), expected, rtol=tol, atol=tol)
        torch.testing.assert_close(zeros(emb, labels), expected, rtol=tol, atol=tol)


def test_d_zero_equals_cosface_with_miner_and_reducer():
    ours, _, cosface, _ = _copies()
    emb, labels = torch.randn(24, 8), torch.arange(6).repeat(4)
    tup = MultiSimilarityMiner()(emb, labels)  # miner weights as in CosFaceLoss
    ours.reducer, cosface.reducer = SumReducer(), SumReducer()
    torch.testing.assert_close(ours(emb, labels, tup), cosface(emb, labels, tup), rtol=1e-6, atol=1e-5)


# -- d: validation, storage, files -----------------------------------------------------------
def test_class_distances_validation_messages():
    with pytest.raises(ValueError, match="square"):
        make(d=torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\(3, 3\) for num_classes=3"):
        make(d=torch.zeros(4, 4))
    bad = D.clone()
    bad[0, 1], bad[2, 1] = 1.5, float("nan")
    with pytest.raises(ValueError, match=r"d\[0, 1\] = 1.5.*d\[2, 1\] = nan"):
        make(d=bad)
    with pytest.raises(ValueError, match=r"d\[1, 0\] = -0.1"):
        make(d=[[0, 0.2, 0.3], [-0.1, 0, 0.2], [0.3, 0.2, 0]])
    with pytest.raises(ValueError, match="not both"):
        AdaptiveMarginSoftmaxLoss(3, 2, class_distances=D, class_texts=["a", "b", "c"])
    with pytest.raises(ValueError, match="scale"):
        AdaptiveMarginSoftmaxLoss(3, 2, scale=0.0)
    with pytest.raises(ValueError, match="margin"):
        AdaptiveMarginSoftmaxLoss(3, 2, margin=float("nan"))


def test_diagonal_is_ignored_and_stored_as_zero():
    d = D.clone()
    d.fill_diagonal_(float("nan"))  # not validated, not used
    loss = make(d=d)
    assert torch.equal(loss.class_distances.diagonal(), torch.zeros(3))
    x = X.clone().requires_grad_(True)
    value = loss(x, torch.tensor([0]))
    value.backward()
    assert value.item() == pytest.approx(lse(0.2, 0.9, 1.0) - 0.2, abs=1e-6) and torch.isfinite(x.grad).all()


def test_buffer_in_state_dict_and_moves_with_to():
    loss = make()
    assert "class_distances" in dict(loss.named_buffers())
    buffer = io.BytesIO()
    torch.save(loss.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert torch.equal(state["class_distances"], D)
    fresh = AdaptiveMarginSoftmaxLoss(3, 2, margin=0.4, scale=1.0)  # built without d: takes it from the checkpoint
    fresh.load_state_dict(state)
    assert torch.equal(fresh.class_distances, D)
    assert fresh(X, torch.tensor([0])).item() == pytest.approx(lse(0.2, 0.9, 1.0) - 0.2, abs=1e-6)
    assert loss.double().class_distances.dtype == torch.float64  # a buffer: follows .to()/.double()
    assert make(d=None).class_distances is None and "class_distances" not in make(d=None).state_dict()


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".txt", ".csv"])
def test_class_distances_from_file(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    if suffix == ".npy":
        np.save(path, D.numpy())
    elif suffix == ".pt":
        torch.save(D, path)
    else:
        np.savetxt(path, D.numpy(), delimiter="," if suffix == ".csv" else " ")
    assert torch.equal(load_class_distances(str(path)), D)
    loss = pml_plugins.create_loss(
        "adaptive_margin_softmax", num_classes=3, embedding_size=2, class_distances=str(path), scale=1.0
    )
    with torch.no_grad():
        loss.proxies.copy_(PROXIES)
    assert loss(X, torch.tensor([0])).item() == pytest.approx(1.65619, abs=1e-5)
    with pytest.raises(ValueError, match="no such file"):
        load_class_distances(str(tmp_path / "missing.npy"))


def test_check_class_distances_accepts_numpy_and_lists():
    assert torch.equal(check_class_distances(D.numpy(), 3), D)
    assert torch.equal(check_class_distances(D.tolist(), 3), D)
    with pytest.raises(TypeError):
        check_class_distances([["a", "b"], ["c", "d"]], 2)


def test_class_texts_constructor_path_with_a_given_encoder(tmp_path):
    class Encoder:  # stands in for a sentence-transformers model (the [text] extra is tested separately)
        def encode(self, texts, **_):
            table = {"red car": [1.0, 0.0], "blue car": [0.8, 0.6], "soup": [-1.0, 0.0]}
            return np.array([table[t] for t in texts])

    path = tmp_path / "classes.txt"
    path.write_text("red car\n\nblue car\nsoup\n", encoding="utf-8")  # blank lines are skipped
    loss = pml_plugins.create_loss(
        "adaptive_margin_softmax", num_classes=3, embedding_size=2, class_texts=str(path), text_model=Encoder()
    )
    # cosine / 2: (1 - 0.8) / 2 = 0.1; (1 + 1) / 2 = 1; (1 + 0.8) / 2 = 0.9
    torch.testing.assert_close(loss.class_distances, torch.tensor([[0, 0.1, 1], [0.1, 0, 0.9], [1, 0.9, 0]]))
    with pytest.raises(ValueError, match="one description per class"):
        AdaptiveMarginSoftmaxLoss(4, 2, class_texts=str(path), text_model=Encoder())


def test_metadata():
    meta = pml_plugins.get_entry("loss", "adaptive_margin_softmax").spec
    assert meta.loss_optimizer is True and meta.loss_lr == 0.01 and meta.retrieval_distance == "cosine"
    assert meta.summary and "Fehervari" in meta.paper and meta.tags
    loss = pml_plugins.create_loss("adaptive_margin_softmax", num_classes=5, embedding_size=4)
    assert (loss.margin, loss.scale, tuple(loss.proxies.shape)) == (0.4, 20.0, (5, 4))
