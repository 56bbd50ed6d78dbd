"""GroupLoss against an obviously-correct loop implementation of the paper's equations, plus
autograd gradchecks. Random inputs, float64."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pml_plugin_group_loss import GroupLoss, pearson_similarity, replicator_dynamics

pytestmark = pytest.mark.filterwarnings("ignore::pml_plugin_group_loss.GroupLossBatchWarning")


def reference_group_loss(emb, labels, weight, bias, temperature, num_anchors, num_iterations, ce_weight, zero_diagonal):
    """Section 3 / Algorithm 1 with Python loops over samples and classes, in Python floats."""
    e = emb.tolist()
    y = labels.tolist()
    n, d, c = len(e), len(e[0]), weight.shape[0]
    Wc, b = weight.tolist(), bias.tolist()
    logits = [[sum(Wc[k][f] * e[i][f] for f in range(d)) + b[k] for k in range(c)] for i in range(n)]
    # eq. (9): temperature softmax (max-shifted)
    prior = []
    for i in range(n):
        z = [logits[i][k] / temperature for k in range(c)]
        m = max(z)
        ex = [math.exp(v - m) for v in z]
        prior.append([v / sum(ex) for v in ex])
    # section 3.2: the first num_anchors samples of each class (batch order) are one-hot
    seen = {}
    x = []
    for i in range(n):
        seen[y[i]] = seen.get(y[i], 0) + 1
        x.append([1.0 if k == y[i] else 0.0 for k in range(c)] if seen[y[i]] <= num_anchors else prior[i])
    # eq. (1) with ReLU (appendix G); diagonal 1 or 0
    W = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i == j:
                W[i][j] = 0.0 if zero_diagonal else 1.0
                continue
            mi, mj = sum(e[i]) / d, sum(e[j]) / d
            cov = sum((e[i][f] - mi) * (e[j][f] - mj) for f in range(d))
            vi = sum((e[i][f] - mi) ** 2 for f in range(d))
            vj = sum((e[j][f] - mj) ** 2 for f in range(d))
            W[i][j] = max(0.0, cov / math.sqrt(vi * vj))
    # eq. (3)-(4)
    for _ in range(num_iterations):
        new = []
        for i in range(n):
            pi = [sum(W[i][j] * x[j][k] for j in range(n)) for k in range(c)]
            q = sum(x[i][k] * pi[k] for k in range(c))
            new.append([x[i][k] * pi[k] / q for k in range(c)] if q > 0 else x[i])
        x = new
    nll = sum(-math.log(x[i][y[i]] + 1e-12) for i in range(n)) / n
    ce = 0.0
    for i in range(n):
        m = max(logits[i])
        lse = m + math.log(sum(math.exp(v - m) for v in logits[i]))
        ce += (lse - logits[i][y[i]]) / n
    return nll + ce_weight * ce


def _batch(g, n_classes, m, num_classes, d):
    labels = torch.randperm(num_classes, generator=g)[:n_classes].repeat_interleave(m)
    labels = labels[torch.randperm(len(labels), generator=g)]  # anchors must follow batch order
    return torch.randn(len(labels), d, generator=g, dtype=torch.float64) * 2, labels


@pytest.mark.parametrize(
    "num_anchors,num_iterations,zero_diagonal", list(itertools.product([0, 1, 2], [0, 1, 3], [False, True]))
)
def test_matches_loop_reference(num_anchors, num_iterations, zero_diagonal):
    g = torch.Generator().manual_seed(10 * num_anchors + num_iterations + 100 * zero_diagonal)
    for trial in range(3):
        num_classes, d = 7, 5
        emb, labels = _batch(g, n_classes=3, m=4, num_classes=num_classes, d=d)
        temperature = [1.0, 3.0, 24.0][trial]
        ce_weight = [1.0, 0.0, 0.3][trial]
        torch.manual_seed(trial)
        loss = GroupLoss(
            num_classes,
            d,
            temperature=temperature,
            num_anchors=num_anchors,
            num_iterations=num_iterations,
            ce_weight=ce_weight,
            zero_diagonal=zero_diagonal,
        )
        with torch.no_grad():
            loss.classifier.weight.mul_(3.0)  # sharper priors than the default init
        expected = reference_group_loss(
            emb,
            labels,
            loss.classifier.weight.detach().double(),
            loss.classifier.bias.detach().double(),
            temperature,
            num_anchors,
            num_iterations,
            ce_weight,
            zero_diagonal,
        )
        assert loss(emb, labels).item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
        assert loss(emb.float(), labels).item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_gradcheck_full_loss():
    g = torch.Generator().manual_seed(3)
    emb, labels = _batch(g, n_classes=3, m=3, num_classes=5, d=4)
    for zero_diagonal in (False, True):
        torch.manual_seed(0)
        loss = GroupLoss(5, 4, temperature=2.0, num_anchors=1, num_iterations=2, zero_diagonal=zero_diagonal).double()
        w, b = loss.classifier.weight, loss.classifier.bias

        def f(e, weight, bias):
            return loss(e, labels, logits=torch.nn.functional.linear(e, weight, bias))

        inputs = (
            emb.clone().requires_grad_(True),
            w.detach().clone().requires_grad_(True),
            b.detach().clone().requires_grad_(True),
        )
        assert torch.autograd.gradcheck(f, inputs)


def test_gradcheck_replicator_dynamics():
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    x0 = torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), 1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e, x: replicator_dynamics(x, pearson_similarity(e), 3), (emb, x0))
