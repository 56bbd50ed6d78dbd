"""The kNN layer: knn_search (FAISS or chunked torch) and the PML-compatible KNN knn_func."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.inference import CustomKNN, FaissKNN

from pml_plugins import knn as knn_module
from pml_plugins import knn_search
from pml_plugins.knn import KNN

faiss_missing = not knn_module.faiss_available()


def brute_force(q, r, k, metric):
    """The obvious definition, in float64."""
    q, r = q.double(), r.double()
    if metric == "cosine":
        s = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(r, dim=1).T
        return torch.topk(s, k, dim=1)
    if metric == "inner_product":
        return torch.topk(q @ r.T, k, dim=1)
    d = torch.cdist(q, r)
    return torch.topk(d, k, dim=1, largest=False)


@pytest.fixture
def points():
    g = torch.Generator().manual_seed(0)
    return torch.randn(70, 12, generator=g), torch.randn(300, 12, generator=g)


@pytest.mark.parametrize("metric", ["cosine", "inner_product", "euclidean"])
@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("faiss", marks=pytest.mark.skipif(faiss_missing, reason="no FAISS"))]
)
def test_exact_search_matches_brute_force(points, metric, backend):
    q, r = points
    scores, indices = knn_search(q, r, 10, metric=metric, backend=backend, chunk_size=16)
    expected_scores, expected_indices = brute_force(q, r, 10, metric)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64 and scores.shape == (70, 10)
    torch.testing.assert_close(scores.double(), expected_scores, atol=1e-4, rtol=1e-4)
    assert torch.equal(indices, expected_indices)  # random data: no ties
    order = scores[:, 1:] - scores[:, :-1]
    assert bool((order >= -1e-6).all()) if metric == "euclidean" else bool((order <= 1e-6).all())


@pytest.mark.skipif(faiss_missing, reason="no FAISS")
@pytest.mark.parametrize("metric", ["cosine", "inner_product", "euclidean"])
def test_faiss_and_torch_agree(points, metric):
    q, r = points
    fs, fi = knn_search(q, r, 25, metric=metric, backend="faiss")
    ts, ti = knn_search(q, r, 25, metric=metric, backend="torch")
    assert torch.equal(fi, ti)
    torch.testing.assert_close(fs, ts, atol=1e-4, rtol=1e-4)


def test_torch_fallback_when_faiss_import_fails(points, monkeypatch):
    q, r = points
    expected = knn_search(q, r, 5, backend="torch")
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    assert not knn_module.faiss_available()
    scores, indices = knn_search(q, r, 5)  # backend="auto"
    assert torch.equal(indices, expected[1])
    with pytest.raises(ImportError, match="faiss"):
        knn_search(q, r, 5, backend="faiss")
    with pytest.raises(ImportError, match="FAISS"):
        knn_search(q, r, 5, index="hnsw")
    d, i = KNN()(q, 5, r)  # the knn_func too
    assert i.shape == (70, 5)


def test_chunking_bounds_memory_and_keeps_results(points, monkeypatch):
    q, r = points
    full = knn_search(q, r, 7, backend="torch", chunk_size=1000)
    blocks = []
    real_topk = torch.topk

    def spy(x, *args, **kwargs):
        blocks.append(tuple(x.shape))
        return real_topk(x, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", spy)
    monkeypatch.setattr(knn_module.torch_search, "DEFAULT_BLOCK_ELEMENTS", 300 * 8)  # 8 queries per block
    chunked = knn_search(q, r, 7, backend="torch")
    assert max(b[0] for b in blocks) == 8 and len(blocks) == 9
    assert torch.equal(full[1], chunked[1])


def test_input_types_and_validation(points):
    q, r = points
    s1, i1 = knn_search(q.numpy(), r.numpy().astype(np.float64), 3, backend="torch")
    s2, i2 = knn_search(q.half(), r, 3, backend="torch")
    assert i1.shape == (70, 3) and s2.dtype == torch.float32
    with pytest.raises(ValueError, match="k must be"):
        knn_search(q, r, 301)
    with pytest.raises(ValueError, match="k must be"):
        knn_search(q, r, 0)
    with pytest.raises(ValueError, match="metric"):
        knn_search(q, r, 3, metric="manhattan")
    with pytest.raises(ValueError, match="same dimension"):
        knn_search(q, r[:, :5], 3)
    with pytest.raises(ValueError, match="2-D"):
        knn_search(q[0], r, 3)
    with pytest.raises(ValueError, match="index"):
        knn_search(q, r, 3, index="lsh")
    with pytest.raises(TypeError, match="k must be an int"):
        knn_search(q, r, 2.0)
    q.requires_grad_(True)
    scores, _ = knn_search(q, r, 3)
    assert not scores.requires_grad


@pytest.mark.skipif(faiss_missing, reason="no FAISS")
@pytest.mark.parametrize("index, params", [("ivf", {"nlist": 8, "nprobe": 8}), ("hnsw", {"M": 16})])
def test_approximate_indexes(index, params):
    g = torch.Generator().manual_seed(1)
    r = torch.randn(2000, 16, generator=g)
    q = r[:100] + 0.01 * torch.randn(100, 16, generator=g)
    _, exact = knn_search(q, r, 10, metric="euclidean")
    _, approx = knn_search(q, r, 10, metric="euclidean", index=index, index_params=params)
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(exact, approx)])
    assert overlap > 0.9
    with pytest.raises(ValueError, match="unknown index_params"):
        knn_search(q, r, 10, index=index, index_params={"bogus": 1})


@pytest.mark.parametrize("ref_includes_query", [False, True])
def test_knn_func_matches_pml(points, ref_includes_query):
    q, r = points
    if ref_includes_query:
        r = torch.cat([q, r])
    d_ours, i_ours = KNN("cosine", backend="torch")(q, 6, r, ref_includes_query)
    d_pml, i_pml = CustomKNN(CosineSimilarity())(q, 6, r, ref_includes_query)
    assert torch.equal(i_ours, i_pml)
    torch.testing.assert_close(d_ours, d_pml, atol=1e-5, rtol=1e-5)
    if not faiss_missing:
        d_ours, i_ours = KNN()(q, 6, r, ref_includes_query)
        d_pml, i_pml = FaissKNN()(q, 6, r, ref_includes_query)
        assert torch.equal(i_ours, i_pml)
        torch.testing.assert_close(d_ours**2, d_pml, atol=1e-4, rtol=1e-4)  # FAISS reports squared L2


def test_drop_self_with_duplicates():
    # query 0 has an exact duplicate at index 1: whichever comes first, the self index is dropped
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [9.0, 0.0]])
    _, idx = KNN(backend="torch")(x, 2, x, ref_includes_query=True)
    assert idx.shape == (4, 2)
    assert all(i not in row.tolist() for i, row in enumerate(idx))


def test_stored_reference():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(20, 4, generator=g), torch.randn(30, 4, generator=g)
    f = KNN("euclidean", backend="torch")
    with pytest.raises(ValueError, match="train"):
        f(a, 3)
    f.train(a)
    f.add(b)
    _, idx = f(a[:5], 1)
    assert idx[:, 0].tolist() == [0, 1, 2, 3, 4]
    f.reset()
    assert f.reference is None
