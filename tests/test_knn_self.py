"""The symmetric leave-one-out self-search (`pml_plugins.knn_self`) and when `KNN` uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pml_plugins import knn as knn_module
from pml_plugins.knn import KNN, SYMMETRIC_MIN_DIM, SYMMETRIC_MIN_ROWS
from pml_plugins.metrics import AccuracyCalculator

faiss = pytest.importorskip("faiss")
from pml_plugins.knn_self import symmetric_self_search  # noqa: E402  (needs FAISS's heaps)


def brute_force(x: torch.Tensor, k: int, metric: str):
    """Independent reference: the whole score matrix in float64, sorted."""
    x64 = x.double()
    if metric == "cosine":
        x64 = torch.nn.functional.normalize(x64, dim=1)
    if metric == "euclidean":
        scores = torch.cdist(x64, x64)
        return scores.topk(k, dim=1, largest=False)
    return (x64 @ x64.T).topk(k, dim=1)


def data(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g).add(0.5)  # rows of varied norm


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "inner_product"])
@pytest.mark.parametrize(
    "block_size", [128, 1000, 4096]
)  # ragged blocks (1000 = 7 x 128 + 104), one exact block, one big block
def test_equals_brute_force(metric, block_size):
    x = data(1000, 24)
    xs = torch.nn.functional.normalize(x, dim=1) if metric == "cosine" else x
    scores, idx = symmetric_self_search(np.ascontiguousarray(xs.numpy()), 15, metric, faiss, block_size=block_size)
    want_scores, want_idx = brute_force(x, 15, metric)
    assert scores.shape == idx.shape == (1000, 15) and scores.dtype == torch.float32 and idx.dtype == torch.int64
    got = scores.double()
    if metric == "euclidean":  # float32 rounding is relative to |a|^2 + |b|^2: compare squared distances
        got, want_scores = got.square(), want_scores.square()
    assert torch.allclose(got, want_scores, rtol=1e-5, atol=1e-4)
    # the same neighbours wherever the float64 ranking has no float32-level near-tie
    gaps = (want_scores[:, 1:] - want_scores[:, :-1]).abs()
    clear = (gaps > 1e-5 * want_scores.abs().clamp_min(1)[:, 1:]).all(1)
    assert clear.float().mean() > 0.9
    assert torch.equal(idx[clear], want_idx[clear])
    if metric != "inner_product":  # a row is its own nearest neighbour (distance 0 / cosine 1)
        assert torch.equal(idx[:, 0], torch.arange(1000))


def test_k_equal_to_n_returns_every_row_sorted():
    x = data(300, 8)
    scores, idx = symmetric_self_search(np.ascontiguousarray(x.numpy()), 300, "euclidean", faiss, block_size=64)
    assert all(sorted(row.tolist()) == list(range(300)) for row in idx)
    assert bool((scores[:, 1:] >= scores[:, :-1]).all())
    # the row itself: |a|^2 + |a|^2 - 2 a.a rounds to about 1e-7 |a|^2 (clamped at 0), before the square root
    assert float(scores[:, 0].square().max()) <= 1e-5 * float(x.square().sum(1).max())


def test_duplicate_rows_are_both_found_at_distance_zero():
    x = data(200, 6)
    x[150] = x[10]
    scores, idx = symmetric_self_search(np.ascontiguousarray(x.numpy()), 3, "euclidean", faiss, block_size=64)
    assert set(idx[10, :2].tolist()) == {10, 150} and set(idx[150, :2].tolist()) == {10, 150}
    assert float(scores[[10, 150], :2].square().max()) <= 1e-5 * float(x.square().sum(1).max())


def test_knn_symmetric_equals_faiss_search_through_mirrored_blocks():
    # more rows than one default block (8192), so both orientations of the off-diagonal block are used
    x = data(9000, 8, seed=1)
    sym_s, sym_i = KNN("euclidean", symmetric=True)(x, 5, x, True)
    flat_s, flat_i = KNN("euclidean", symmetric=False)(x, 5, x, True)
    assert torch.allclose(sym_s, flat_s, atol=1e-5)
    clear = ((flat_s[:, 1:] - flat_s[:, :-1]).abs() > 1e-5).all(1)
    assert clear.float().mean() > 0.95 and torch.equal(sym_i[clear], flat_i[clear])
    assert not bool((sym_i == torch.arange(9000)[:, None]).any())  # self matches dropped


def test_when_knn_uses_it():
    x = torch.randn(40, 8)
    auto, on, off = KNN(), KNN(symmetric=True), KNN(symmetric=False)
    assert on._use_symmetric(x, x, 5) and on._use_symmetric(x, x.clone(), 5)  # equal rows, not the same tensor
    assert not off._use_symmetric(x, x, 5)
    assert not auto._use_symmetric(x, x, 5)  # small: FAISS's flat search is as fast
    big = torch.empty(SYMMETRIC_MIN_ROWS, SYMMETRIC_MIN_DIM)
    assert auto._use_symmetric(big, big, 5)
    assert not auto._use_symmetric(big[:, :-1], big[:, :-1], 5)
    assert not on._use_symmetric(x, torch.randn(40, 8), 5)  # other references
    assert not on._use_symmetric(x, torch.cat([x, x[:3]]), 5)  # references beyond the queries
    assert not KNN(index="ivf", symmetric=True)._use_symmetric(x, x, 5)
    assert not KNN(backend="torch", symmetric=True)._use_symmetric(x, x, 5)
    assert not KNN(device="cuda", symmetric=True)._use_symmetric(x, x, 5)
    assert not on._use_symmetric(x.numpy(), x.numpy(), 5)
    with pytest.raises(TypeError, match="symmetric must be None or a bool"):
        KNN(symmetric="yes")
    assert "symmetric=True" in repr(on) and "symmetric" not in repr(auto)


def test_progress_bar(capsys):
    x = np.ascontiguousarray(data(300, 4).numpy())
    symmetric_self_search(x, 3, "euclidean", faiss, block_size=100, progress=True)
    assert "kNN self-search" in capsys.readouterr().err
    symmetric_self_search(x, 3, "euclidean", faiss, block_size=100)
    assert capsys.readouterr().err == ""  # not a terminal


def test_accuracy_calculator_metrics_unchanged():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.data.astype(np.float32))
    labels = torch.from_numpy(digits.target)
    kwargs = dict(exclude=("NMI", "AMI"), device="cpu", plugin_metrics=False)
    sym = AccuracyCalculator(knn_func=KNN(symmetric=True), **kwargs).get_accuracy(x, labels)
    flat = AccuracyCalculator(knn_func=KNN(symmetric=False), **kwargs).get_accuracy(x, labels)
    assert sym == pytest.approx(flat, abs=1e-9)
    assert knn_module.faiss_available()
