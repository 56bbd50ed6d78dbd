"""The fused implementation against an obviously-correct loop-based reference (values and
gradients), PML's ProxyAnchorLoss (K = 1, tau = 0), and gradcheck of the fused autograd Function."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning.losses import ProxyAnchorLoss
from pytorch_metric_learning.reducers import SumReducer
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_plugin_mpa import MultiProxyAnchorAPLoss, MultiProxyAnchorDWLoss, MultiProxyAnchorLoss, ProxyClassSimilarity


# ---------------------------------------------------------------- loop-based reference (float64)
def ref_similarity(x, w, num_classes, k, gamma):
    """S[i][c] by eq. 1, one sample, class and proxy at a time."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i] / x[i].norm()
        row = []
        for c in range(num_classes):
            cos = [xi @ (w[c * k + j] / w[c * k + j].norm()) for j in range(k)]
            weights = [torch.exp(v / gamma) for v in cos]
            total = sum(weights)
            row.append(sum(wt / total * v for wt, v in zip(weights, cos)))
        out.append(row)
    return out


def ref_regularizer(w, num_classes, k):
    """Eq. 3 with the issue's 1e-5 and C K (K - 1) normalisation."""
    if k == 1:
        return torch.zeros((), dtype=w.dtype)
    total = 0.0
    for c in range(num_classes):
        for t in range(k):
            for s in range(t + 1, k):
                wt, ws = w[c * k + t] / w[c * k + t].norm(), w[c * k + s] / w[c * k + s].norm()
                total = total + torch.sqrt(2 - 2 * (ws @ wt) + 1e-5)
    return total / (num_classes * k * (k - 1))


def ref_mpa(x, y, w, C, K, alpha, delta, gamma, tau):
    S, y = ref_similarity(x, w, C, K, gamma), y.tolist()
    present = sorted(set(y))
    pos = sum(
        torch.log(1 + sum(torch.exp(-alpha * (S[i][c] - delta)) for i in range(len(y)) if y[i] == c)) for c in present
    ) / len(present)  # eq. 6, over C+
    neg = 0.0
    for c in range(C):  # eq. 6, over all classes, / C
        terms = [torch.exp(alpha * (S[i][c] + delta)) for i in range(len(y)) if y[i] != c]
        neg = neg + (torch.log(1 + sum(terms)) if terms else 0.0)
    return pos + neg / C + tau * ref_regularizer(w, C, K)


def ref_mpa_dw(x, y, w, C, K, alpha, delta, gamma, tau):
    S, y = ref_similarity(x, w, C, K, gamma), y.tolist()
    total = 0.0
    for i in range(len(y)):  # eq. 12
        pos = torch.log(1 + torch.exp(-alpha * (S[i][y[i]] - delta)))
        neg = torch.log(
            1
            + sum((torch.exp(alpha * (S[i][c] + delta)) for c in range(C) if c != y[i]), torch.zeros((), dtype=x.dtype))
        )
        total = total + pos + neg
    return total / len(y) + tau * ref_regularizer(w, C, K)


def ref_mpa_ap(x, y, w, C, K, alpha, delta, gamma, tau):
    S, y = ref_similarity(x, w, C, K, gamma), y.tolist()
    total = 0.0
    for i in range(len(y)):  # eq. 15-16
        margin = [delta - S[i][c] if c == y[i] else S[i][c] + delta for c in range(C)]
        total = total + torch.log(1 + sum(torch.exp(alpha * m) for m in margin))
    return total / len(y) + tau * ref_regularizer(w, C, K)


REFERENCES = {MultiProxyAnchorLoss: ref_mpa, MultiProxyAnchorDWLoss: ref_mpa_dw, MultiProxyAnchorAPLoss: ref_mpa_ap}


@pytest.mark.parametrize("cls", list(REFERENCES))
@pytest.mark.parametrize(
    "C, K, gamma, tau, alpha, seed",
    [
        (4, 3, 0.1, 0.2, 32.0, 0),
        (5, 2, 0.5, 0.7, 8.0, 1),
        (3, 1, 0.1, 0.2, 16.0, 2),
        (4, 4, 0.01, 0.2, 4.0, 3),  # small gamma: the max-shifted softmax path
    ],
)
def test_matches_loop_reference(cls, C, K, gamma, tau, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(7, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    y = torch.randint(C - 1, (7,), generator=g)  # the last class is absent from the batch
    loss = cls(C, 5, proxies_per_class=K, alpha=alpha, delta=0.1, gamma=gamma, tau=tau)
    with torch.no_grad():
        loss.proxies.copy_(torch.randn(C * K, 5, generator=g) * 2)
    got = loss(x, y)
    w = loss.proxies.detach().double().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    expected = REFERENCES[cls](x_ref, y, w, C, K, alpha, 0.1, gamma, tau)
    assert got.item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-9)
    got.backward()
    expected.backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-7, atol=1e-9)
    assert torch.allclose(loss.proxies.grad.double(), w.grad, rtol=1e-5, atol=1e-7)  # proxies are float32


@pytest.mark.parametrize("cls", list(REFERENCES))
def test_float32_matches_reference_and_half_is_close(cls):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(9, 6, generator=g), torch.randint(4, (9,), generator=g)
    loss = cls(4, 6, proxies_per_class=3)
    expected = REFERENCES[cls](x.double(), y, loss.proxies.detach().double(), 4, 3, 32.0, 0.1, 0.1, 0.2).item()
    assert loss(x, y).item() == pytest.approx(expected, rel=1e-5)
    for dtype in (torch.float16, torch.bfloat16):
        assert loss(x.to(dtype), y).item() == pytest.approx(expected, rel=3e-2)


def test_mpa_with_one_proxy_equals_pml_proxy_anchor():
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # three draws from the one generator
        C, d = 10, 16
        x = torch.randn(32, d, generator=g).requires_grad_()
        y = torch.randint(C, (32,), generator=g)
        ours = MultiProxyAnchorLoss(C, d, proxies_per_class=1, alpha=32.0, delta=0.1, tau=0.0)
        pml = ProxyAnchorLoss(C, d, margin=0.1, alpha=32)
        with torch.no_grad():
            pml.proxies.copy_(ours.proxies)
        a, b = ours(x, y), pml(x, y)
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6)
        ga_x, ga_w = torch.autograd.grad(a, (x, ours.proxies))
        gb_x, gb_w = torch.autograd.grad(b, (x, pml.proxies))
        assert torch.allclose(ga_x, gb_x, rtol=1e-4, atol=1e-6)
        assert torch.allclose(ga_w, gb_w, rtol=1e-4, atol=1e-6)
        # and with a miner's indices_tuple, which both weight the same way
        pairs = lmu.get_random_triplet_indices(y, t_per_anchor=1)
        assert ours(x, y, pairs).item() == pytest.approx(pml(x, y, pairs).item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    "C, K, gamma, with_gram",
    [(3, 2, 0.1, True), (3, 2, 0.1, False), (2, 3, 0.3, True), (6, 1, 0.1, False), (2, 3, 0.001, True)],
)
def test_fused_function_gradcheck(C, K, gamma, with_gram):
    g = torch.Generator().manual_seed(C * K)
    x = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    w = (torch.randn(C * K, 4, generator=g, dtype=torch.float64) * 2).requires_grad_()
    fn = lambda x, w: ProxyClassSimilarity.apply(x, w, C, K, gamma, with_gram)
    assert torch.autograd.gradcheck(fn, (x, w))


def test_reducers_and_loss_dict():
    x, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    for cls in REFERENCES:
        loss = cls(3, 4, proxies_per_class=2)
        default = loss(x, y).item()
        loss.set_reducer(SumReducer())  # as reducer=SumReducer() in the constructor
        summed = loss(x, y).item()
        if cls is MultiProxyAnchorLoss:  # DivisorReducer -> Sum: pos * |C+| + neg * C, |C+| = C = 3
            assert not math.isclose(default, summed)
        else:  # MeanReducer -> Sum: the per-sample terms times the batch size (reg unchanged)
            reg = loss.tau * loss.regularizer().item()
            assert summed - reg == pytest.approx(6 * (default - reg), rel=1e-5)
