"""PML's metrics through pml_plugins.AccuracyCalculator: identical to PML's own calculator, and PML's bugs fixed."""

from __future__ import annotations

import logging
import math
import sys

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.utils import accuracy_calculator as pml_ac
from pytorch_metric_learning.utils import inference as pml_inference
from pytorch_metric_learning.utils.inference import CustomKNN

from pml_plugins import AccuracyCalculator
from pml_plugins.knn import KNN

CPU = torch.device("cpu")
KNN_METRICS = (
    "precision_at_1",
    "r_precision",
    "mean_average_precision_at_r",
    "mean_average_precision",
    "mean_reciprocal_rank",
)


def ours(**kw):
    kw.setdefault("device", CPU)
    kw.setdefault("plugin_metrics", False)
    kw.setdefault("k", "max_bin_count")  # as pml() below; the default k=None: tests/test_metrics_default_k.py
    return AccuracyCalculator(**kw)


def pml(**kw):
    kw.setdefault("device", CPU)
    kw.setdefault("k", "max_bin_count")
    return pml_ac.AccuracyCalculator(**kw)


def data(seed=0, n=400, num_classes=30, dim=8, lone=3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[:lone] = 1000 + torch.arange(lone)  # lone queries: their class has no other member
    centers = torch.randn(num_classes + 1000 + lone, dim, generator=g)
    x = centers[labels] * 0.7 + torch.randn(n, dim, generator=g)
    return x, labels


def assert_same(a, b, keys, tol=1e-12):
    """Equal up to summation order of per-class averages (PML's MRR is float32: 1e-6 there)."""
    for key in keys:
        va, vb = a[key], b[key]
        tol = 1e-6 if key == "mean_reciprocal_rank" else tol
        if isinstance(vb, list):
            assert len(va) == len(vb), key
            np.testing.assert_allclose(va, vb, rtol=0, atol=tol, err_msg=key)
        elif math.isnan(vb):
            assert math.isnan(va), key
        else:
            assert va == pytest.approx(vb, abs=tol), key


@pytest.mark.parametrize("option", [{}, {"avg_of_avgs": True}, {"return_per_class": True}])
@pytest.mark.parametrize("split", ["leave_one_out", "separate", "ref_includes_query"])
def test_identical_to_pml(option, split):
    x, labels = data()
    if split == "leave_one_out":
        args = (x, labels)
    elif split == "separate":
        args = (x[:150], labels[:150], x[150:], labels[150:], False)
    else:  # reference = query followed by more items
        args = (x[:150], labels[:150], x, labels, True)
    a = ours(exclude=("NMI", "AMI"), **option).get_accuracy(*args)
    b = pml(exclude=("NMI", "AMI"), **option).get_accuracy(*args)
    assert_same(a, b, KNN_METRICS)
    if not option:  # plain means are bit-for-bit PML's (same per-query values, same reduction)
        for key in KNN_METRICS:
            assert a[key] == b[key], key


def test_plain_values_bitwise_and_clustering_identical():
    x, labels = data(seed=1, n=300, num_classes=12, lone=0)
    a = ours().get_accuracy(x, labels)
    b = pml().get_accuracy(x, labels)
    for key in b:
        assert a[key] == b[key], key  # NMI/AMI: the same FAISS k-means
    assert set(b) < set(a) and {"ndcg_at_10", "recall_at_1"} < set(a)


@pytest.mark.parametrize(
    "include", [("precision_at_1",), ("r_precision", "mean_average_precision"), ("mean_average_precision_at_r",)]
)
def test_include_exclude(include):
    x, labels = data(seed=2)
    a = ours(include=include).get_accuracy(x, labels)
    assert set(a) == set(include)
    assert_same(a, pml(include=include).get_accuracy(x, labels), include)
    a = ours(exclude=("NMI", "AMI", *include)).get_accuracy(x, labels)
    assert not set(include) & set(a) and "ndcg_at_2" in a
    # and per call, as in PML
    a = ours().get_accuracy(x, labels, include=include)
    assert set(a) == set(include)


@pytest.mark.parametrize("k", [5, 80, "max_bin_count"])
def test_explicit_k_and_warning(k, caplog):
    x, labels = data(seed=3, n=300, num_classes=10)  # ~30 per class: k=5 is below the max bin count
    with caplog.at_level(logging.WARNING, logger="PML"):
        a = ours(k=k, exclude=("NMI", "AMI"), ndcg_ks=(), recall_ks=()).get_accuracy(x, labels)
    ours_warned = "max bin count" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="PML"):
        b = pml(k=k, exclude=("NMI", "AMI")).get_accuracy(x, labels)
    assert ours_warned == ("max bin count" in caplog.text) == (k == 5)
    assert_same(a, b, KNN_METRICS)


def test_k_all_is_pmls_full_ranking():
    x, labels = data(seed=4, n=150, num_classes=10)
    a = ours(k="all", exclude=("NMI", "AMI")).get_accuracy(x, labels)
    b = pml_ac.AccuracyCalculator(k=None, device=CPU, exclude=("NMI", "AMI")).get_accuracy(x, labels)
    assert_same(a, b, KNN_METRICS)


def test_lone_queries_only_and_partly():
    x, labels = data(seed=5, n=100, lone=4)
    q, ql = x[:4], labels[:4]  # all four queries are lone w.r.t. the rest
    # PML's k="max_bin_count" is 0 here and FAISS refuses k=0; we report NaN as PML's code intends
    with pytest.raises(RuntimeError):
        pml(exclude=("NMI", "AMI")).get_accuracy(q, ql, x[4:], labels[4:])
    a = ours(exclude=("NMI", "AMI")).get_accuracy(q, ql, x[4:], labels[4:])
    assert all(math.isnan(v) for v in a.values())
    a = ours(exclude=("NMI", "AMI"), return_per_class=True).get_accuracy(q, ql, x[4:], labels[4:])
    assert all(len(v) == 4 and all(math.isnan(u) for u in v) for v in a.values())
    a = ours(exclude=("NMI", "AMI"), k=5).get_accuracy(q, ql, x[4:], labels[4:])
    b = pml(exclude=("NMI", "AMI"), k=5).get_accuracy(q, ql, x[4:], labels[4:])
    assert_same(a, b, KNN_METRICS)
    a = ours(exclude=("NMI", "AMI")).get_accuracy(x[:50], labels[:50], x[50:], labels[50:])
    b = pml(exclude=("NMI", "AMI")).get_accuracy(x[:50], labels[:50], x[50:], labels[50:])
    assert_same(a, b, KNN_METRICS)


@pytest.mark.parametrize(
    "knn_func",
    [lambda: CustomKNN(CosineSimilarity()), lambda: CustomKNN(LpDistance(), batch_size=64), lambda: KNN("cosine")],
)
def test_custom_knn_func(knn_func):
    x, labels = data(seed=6)
    a = ours(knn_func=knn_func(), exclude=("NMI", "AMI")).get_accuracy(x, labels)
    b = pml(knn_func=knn_func(), exclude=("NMI", "AMI")).get_accuracy(x, labels)
    assert_same(a, b, KNN_METRICS)


def test_custom_label_comparison_fn():
    x, labels = data(seed=7, lone=0)

    def same_pair(a, b):
        return (a // 2) == (b // 2)  # classes 2c and 2c+1 count as one

    a = ours(label_comparison_fn=same_pair, exclude=("NMI", "AMI")).get_accuracy(x, labels)
    b = pml(label_comparison_fn=same_pair, exclude=("NMI", "AMI")).get_accuracy(x, labels)
    assert_same(a, b, KNN_METRICS)
    # nDCG/Recall follow the comparison: same as equality on the merged labels
    c = ours(exclude=("NMI", "AMI")).get_accuracy(x, labels // 2)
    for key in ("ndcg_at_10", "recall_at_4"):
        assert a[key] == pytest.approx(c[key], abs=1e-12)


def test_two_column_labels_with_comparison_fn():
    x, labels = data(seed=8, lone=0)
    two = torch.stack([labels, labels % 3], dim=1)

    def first_column(a, b):
        return a[..., 0] == b[..., 0]

    a = ours(label_comparison_fn=first_column, exclude=("NMI", "AMI")).get_accuracy(x, two)
    b = pml(label_comparison_fn=first_column, exclude=("NMI", "AMI")).get_accuracy(x, two)
    assert_same(a, b, KNN_METRICS)


# -- PML 2.9's bugs, fixed ---------------------------------------------------------------------
def test_large_integer_labels_keep_their_identity():
    x, labels = data(seed=9, lone=0, num_classes=20)
    big = labels.long() * 2 + 2**24 + 1  # odd ids above 2**24 round to even ones in float32
    assert torch.unique(big.float()).numel() < torch.unique(big).numel()  # the collision PML hits
    small = ours(exclude=("NMI", "AMI")).get_accuracy(x, labels)
    large = ours(exclude=("NMI", "AMI")).get_accuracy(x, big)
    for key in small:
        assert small[key] == large[key], key
    pml_large = pml(exclude=("NMI", "AMI")).get_accuracy(x, big)
    assert pml_large["precision_at_1"] != small["precision_at_1"]  # PML merged classes


def test_mean_reciprocal_rank_alone():
    x, labels = data(seed=10)
    a = ours(include=("mean_reciprocal_rank",)).get_accuracy(x, labels)
    full = pml().get_accuracy(x, labels, include=("mean_reciprocal_rank", "precision_at_1"))
    assert a["mean_reciprocal_rank"] == full["mean_reciprocal_rank"]
    with pytest.raises(TypeError, match="knn_labels"):  # PML: requires_knn() omits it: no kNN is run
        pml(include=("mean_reciprocal_rank",)).get_accuracy(x, labels)


def test_without_faiss_falls_back_to_torch(monkeypatch):
    x, labels = data(seed=11, n=200, num_classes=8, lone=0)
    with_faiss = ours().get_accuracy(x, labels)
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    monkeypatch.delattr(pml_inference, "faiss", raising=False)  # as if PML had been imported without FAISS
    with pytest.raises(NameError):
        pml_ac.AccuracyCalculator(device=CPU)  # PML: FaissKNN() -> NameError
    calc = ours()
    assert calc.knn_func.__class__ is KNN and calc.kmeans_func.__class__.__name__ == "SklearnKMeans"
    without = calc.get_accuracy(x, labels)
    for key in with_faiss:
        if key in ("NMI", "AMI"):
            assert 0 <= without[key] <= 1  # scikit-learn's k-means: a different (valid) clustering
        else:
            assert without[key] == pytest.approx(with_faiss[key], abs=1e-12), key


def test_default_k_never_full_ranking():
    x, labels = data(seed=12, n=500, num_classes=25, lone=0)
    asked = []

    class Recording(KNN):
        def __call__(self, query, k, reference=None, ref_includes_query=False):
            asked.append(k)
            return super().__call__(query, k, reference, ref_includes_query)

    max_bin_count = int(torch.bincount(labels).max())
    ours(knn_func=Recording(), ndcg_ks=(), recall_ks=(), k=None).get_accuracy(x, labels)
    ours(knn_func=Recording(), k=None).get_accuracy(x, labels)
    ours(
        knn_func=Recording(), include=("precision_at_1", "ndcg_at_8"), ndcg_ks=(8,), recall_ks=(), k=None
    ).get_accuracy(x, labels)
    assert asked == [max_bin_count - 1, 100, 8]
    assert max(asked) < len(x) - 1


def test_labels_keep_dtype_and_subclass_metrics_work():
    # a PML-style subclass adding its own calculate_ method still works, and sees integer labels
    class WithDtype(AccuracyCalculator):
        def requires_knn(self):
            return [*super().requires_knn(), "label_dtype"]

        def calculate_label_dtype(self, knn_labels, query_labels, **kwargs):
            return f"{query_labels.dtype} {knn_labels.dtype}"

    x, labels = data(seed=13, n=60, lone=0)
    calc = WithDtype(device=CPU, plugin_metrics=False, include=("precision_at_1", "label_dtype"))
    res = calc.get_accuracy(x, labels)
    assert res["label_dtype"] == "torch.int64 torch.int64"
    assert calc.get_accuracy(x.numpy(), labels.numpy()) == res


def test_validation():
    x, labels = data(seed=14, n=60, lone=0)
    calc = ours(include=("precision_at_1",))
    with pytest.raises(ValueError, match="same length"):
        calc.get_accuracy(x, labels[:-1])
    with pytest.raises(ValueError, match="2-D"):
        calc.get_accuracy(x[0], labels[:1])
    with pytest.raises(ValueError, match="ref_includes_query"):
        calc.get_accuracy(x[:10], labels[:10], x[5:], labels[5:], True)
    with pytest.raises(ValueError, match="Primary metrics"):
        calc.get_accuracy(x, labels, include=("no_such_metric",))
    with pytest.raises(ValueError, match="mutually exclusive"):
        ours(avg_of_avgs=True, return_per_class=True)
    with pytest.raises(ValueError, match="k must be"):
        ours(k=0)
