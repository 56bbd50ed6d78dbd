"""An independent loop-based reference of eq. 3 on random inputs, gradcheck, and the conformance kit."""

from __future__ import annotations

import math

import pytest
import torch

from pml_plugin_adaptive_margin import AdaptiveMarginSoftmaxLoss
from pml_plugins.testing import parametrize_with_checks

NUM_CLASSES, EMBEDDING_SIZE = 10, 8


def reference_loss(x, labels, proxies, d, margin, scale) -> float:
    """Eq. 3 sample by sample, class by class, in Python floats: the obviously-correct version."""
    total = 0.0
    for i in range(len(labels)):
        xi = [float(v) for v in x[i]]
        nx = math.sqrt(sum(v * v for v in xi))
        y = int(labels[i])
        logits = []
        for z in range(len(proxies)):
            p = [float(v) for v in proxies[z]]
            cos = sum(a * b for a, b in zip(xi, p)) / (nx * math.sqrt(sum(v * v for v in p)))
            if z == y:
                logits.append(scale * (cos - margin))
            else:
                logits.append(scale * (cos + (1 - cos) * float(d[y][z])))
        top = max(logits)
        total += top + math.log(sum(math.exp(v - top) for v in logits)) - logits[y]
    return total / len(labels)


def random_d(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, n, generator=g)
    d = (a + a.t()) / 2
    d[0, 1] = d[1, 0] = 1.0  # the d = 1 corner
    return d.fill_diagonal_(0)


@pytest.mark.parametrize("seed", range(6))
def test_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n, dim, batch = 7, 5, 13
    margin, scale = [(0.4, 20.0), (0.0, 1.0), (0.35, 64.0), (-0.1, 5.0), (0.4, 30.0), (0.2, 0.5)][seed]
    d = random_d(n, seed) if seed != 3 else None
    loss = AdaptiveMarginSoftmaxLoss(n, dim, class_distances=d, margin=margin, scale=scale)
    with torch.no_grad():
        loss.proxies.copy_(torch.randn(n, dim, generator=g))
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64) * (10 ** (seed - 3))
    labels = torch.randint(n, (batch,), generator=g)
    expected = reference_loss(
        x, labels, loss.proxies.detach().double(), d if d is not None else torch.zeros(n, n), margin, scale
    )
    assert loss(x, labels).item() == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_gradcheck():
    torch.manual_seed(0)
    d = random_d(5, 0).double()
    proxies = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])

    loss = AdaptiveMarginSoftmaxLoss(5, 4, class_distances=d, scale=3.0).double()

    def f(x, proxies):  # the loss's own forward, its parameter replaced by the gradcheck input
        return torch.func.functional_call(loss, {"proxies": proxies}, (x, labels))

    assert torch.autograd.gradcheck(f, (x, proxies))


@parametrize_with_checks(
    [
        lambda: AdaptiveMarginSoftmaxLoss(num_classes=NUM_CLASSES, embedding_size=EMBEDDING_SIZE),
        lambda: AdaptiveMarginSoftmaxLoss(
            num_classes=NUM_CLASSES, embedding_size=EMBEDDING_SIZE, class_distances=random_d(NUM_CLASSES, 1)
        ),
    ],
    embedding_size=EMBEDDING_SIZE,
    num_classes=NUM_CLASSES,
)
def test_adaptive_margin_conformance(check):
    check()
