"""AccuracyCalculator as a drop-in for PML 2.9's: the default k=None (full ranking, bounded memory),
PML's calculate_* signatures, subclass metrics, and PML's tester with default arguments."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.testers import GlobalEmbeddingSpaceTester
from pytorch_metric_learning.utils import accuracy_calculator as pml_ac
from pytorch_metric_learning.utils.inference import CustomKNN

from pml_plugins import AccuracyCalculator
from pml_plugins.knn import KNN
from pml_plugins.ranking import Relevance, full_ranking_precisions

pytest.importorskip("faiss")  # PML's own calculator needs FAISS (FaissKNN)

CPU = torch.device("cpu")
PML_KNN_METRICS = (
    "precision_at_1",
    "r_precision",
    "mean_average_precision_at_r",
    "mean_average_precision",
    "mean_reciprocal_rank",
)


def ours(**kw):
    kw.setdefault("device", CPU)
    kw.setdefault("plugin_metrics", False)
    kw.setdefault("exclude", ("NMI", "AMI"))
    return AccuracyCalculator(**kw)


def pml(**kw):
    kw.setdefault("device", CPU)
    kw.setdefault("exclude", ("NMI", "AMI"))
    return pml_ac.AccuracyCalculator(**kw)


def data(seed, n=240, num_classes=20, dim=6, lone=3, ties=False):
    """Clustered float data, or (ties=True) points on a 3 x 3 grid: many exactly equal distances."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[:lone] = 1000 + torch.arange(lone)  # lone queries
    if ties:
        return torch.randint(0, 3, (n, 2), generator=g).float(), labels
    centers = torch.randn(num_classes + 1000 + lone, dim, generator=g)
    return centers[labels] * 0.6 + torch.randn(n, dim, generator=g), labels


def splits(x, labels):
    return {
        "leave_one_out": (x, labels),
        "separate": (x[:90], labels[:90], x[90:], labels[90:], False),
        "ref_includes_query": (x[:90], labels[:90], x, labels, True),
    }


def assert_close(a, b, keys, tol=1e-6):
    for key in keys:
        va, vb = a[key], b[key]
        tol = max(tol, 1e-6) if key == "mean_reciprocal_rank" else tol  # PML's MRR is float32
        if isinstance(vb, list):
            np.testing.assert_allclose(va, vb, rtol=0, atol=tol, err_msg=key)
        elif math.isnan(vb):
            assert math.isnan(va), key
        else:
            assert va == pytest.approx(vb, abs=tol), key


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("split", ["leave_one_out", "separate", "ref_includes_query"])
@pytest.mark.parametrize("option", [{}, {"avg_of_avgs": True}, {"return_per_class": True}])
def test_default_k_equals_pmls_default(ties, split, option):
    x, labels = data(seed=1 + ties, ties=ties)
    args = splits(x, labels)[split]
    a = ours(**option).get_accuracy(*args)
    b = pml(**option).get_accuracy(*args)
    assert_close(a, b, PML_KNN_METRICS, tol=1e-9 if ties else 1e-6)
    # and the full-ranking values are not the max_bin_count ones (the test can tell them apart)
    c = pml(k="max_bin_count", **option).get_accuracy(*args)
    if not option:
        assert abs(a["mean_average_precision"] - c["mean_average_precision"]) > 1e-3


@pytest.mark.parametrize("k", [None, "all", "max_bin_count", 7, 10_000])
def test_explicit_k(k):
    x, labels = data(seed=3)
    args = splits(x, labels)["ref_includes_query"]
    a = ours(k=k).get_accuracy(*args)
    # k larger than the reference set: ours caps it (the full ranking); PML pads with index -1,
    # i.e. with the last reference's label, so PML's comparable value is its k=None
    b = pml(k=None if k in ("all", 10_000) else k).get_accuracy(*args)
    assert_close(a, b, PML_KNN_METRICS)


def test_lone_queries_only():
    x, labels = data(seed=4, lone=5)
    a = ours().get_accuracy(x[:5], labels[:5], x[5:], labels[5:])
    b = pml().get_accuracy(x[:5], labels[:5], x[5:], labels[5:])
    assert all(math.isnan(a[key]) and math.isnan(b[key]) for key in PML_KNN_METRICS)


def test_default_k_searches_few_neighbours_but_custom_knn_gets_the_full_ranking():
    x, labels = data(seed=5, n=300)
    asked = []

    class Recording(KNN):
        def __call__(self, query, k, reference=None, ref_includes_query=False):
            asked.append(k)
            return super().__call__(query, k, reference, ref_includes_query)

    a = ours(knn_func=Recording(), ndcg_ks=(), recall_ks=()).get_accuracy(x, labels)
    assert asked == [int(torch.bincount(labels).max()) - 1]  # R-precision's columns, not 299
    assert_close(a, pml().get_accuracy(x, labels), PML_KNN_METRICS)
    # a knn_func whose ranking we cannot reproduce (torch.topk orders ties its own way) is asked as PML asks it
    custom = CustomKNN(LpDistance(normalize_embeddings=False))
    calls = []
    recorded = lambda q, k, r, inc: calls.append(k) or custom(q, k, r, inc)
    a = ours(knn_func=recorded).get_accuracy(x, labels)
    assert calls == [len(x) - 1]
    assert_close(a, pml(knn_func=custom).get_accuracy(x, labels), PML_KNN_METRICS)


@pytest.mark.parametrize("metric", ["euclidean", "inner_product", "cosine"])
@pytest.mark.parametrize("ref_includes_query", [False, True])
def test_ranking_pass_against_brute_force(metric, ref_includes_query):
    g = torch.Generator().manual_seed(6)
    n, q = 70, 40
    # exact ties on an integer grid; cosine on float data (normalised grid points tie in float64 but
    # not always in float32)
    draw = (
        (lambda m: torch.randn(m, 3, generator=g))
        if metric == "cosine"
        else (lambda m: torch.randint(-2, 3, (m, 3), generator=g).float())
    )
    ref = draw(n)
    ref_labels = torch.randint(0, 4, (n,), generator=g)
    query = ref[:q] if ref_includes_query else draw(q)
    query_labels = ref_labels[:q] if ref_includes_query else torch.randint(0, 4, (q,), generator=g)
    by_mask = Relevance.by_mask(lambda ids: query_labels[ids][:, None] == ref_labels[None])
    got_sum, got_first = full_ranking_precisions(
        query, ref, by_mask, metric, ref_includes_query, block_elements=3 * n
    )  # 3 queries a block
    by_ids = full_ranking_precisions(
        query, ref, Relevance.by_ids(query_labels, ref_labels), metric, ref_includes_query, block_elements=4 * n
    )
    assert torch.equal(by_ids[0], got_sum) and torch.equal(by_ids[1], got_first)
    qq, rr = query.double(), ref.double()
    if metric == "cosine":
        qq, rr = torch.nn.functional.normalize(qq, dim=1), torch.nn.functional.normalize(rr, dim=1)
    for i in range(q):
        if metric == "euclidean":  # ascending distance, then ascending index (FAISS's L2 order)
            order = sorted(range(n), key=lambda j: (float(((qq[i] - rr[j]) ** 2).sum()), j))
        else:  # descending similarity, then descending index (FAISS's inner-product order)
            order = sorted(range(n), key=lambda j: (-float(qq[i] @ rr[j]), -j))
        order = [j for j in order if not (ref_includes_query and j == i)]
        hits = [rank for rank, j in enumerate(order, 1) if ref_labels[j] == query_labels[i]]
        expected_sum = sum(t / rank for t, rank in enumerate(hits, 1))
        assert float(got_sum[i]) == pytest.approx(expected_sum, abs=1e-12), i
        assert int(got_first[i]) == (hits[0] if hits else 0), i


def test_custom_label_comparison_and_two_column_labels():
    x, labels = data(seed=7, lone=0)
    same_pair = lambda a, b: (a // 2) == (b // 2)
    assert_close(
        ours(label_comparison_fn=same_pair).get_accuracy(x, labels),
        pml(label_comparison_fn=same_pair).get_accuracy(x, labels),
        PML_KNN_METRICS,
    )
    two = torch.stack([labels, labels % 3], dim=1)
    first = lambda a, b: a[..., 0] == b[..., 0]
    assert_close(
        ours(label_comparison_fn=first).get_accuracy(x, two),
        pml(label_comparison_fn=first).get_accuracy(x, two),
        PML_KNN_METRICS,
    )


def test_calculate_signatures_are_pmls():
    for name, fn in inspect.getmembers(pml_ac.AccuracyCalculator, inspect.isfunction):
        if name.startswith("calculate_"):
            assert inspect.signature(getattr(AccuracyCalculator, name)) == inspect.signature(fn), name


def test_direct_calls_with_pmls_arguments():
    # what PML's own code (and subclasses written for it) pass: knn_labels and label counts only
    x, labels = data(seed=8, lone=2)
    knn_labels = labels[torch.randint(0, len(labels), (len(labels), 9), generator=torch.Generator().manual_seed(0))]
    label_counts = pml_ac.get_label_match_counts(labels, labels, pml_ac.EQUALITY)
    _, not_lone = pml_ac.get_lone_query_labels(labels, label_counts, True, pml_ac.EQUALITY)
    kwargs = {
        "knn_labels": knn_labels,
        "query_labels": labels,
        "not_lone_query_mask": not_lone,
        "label_counts": label_counts,
        "ref_includes_query": True,
    }
    for option in ({}, {"avg_of_avgs": True}):
        a, b = ours(**option), pml(**option)
        assert_close(
            a._get_accuracy(a.get_function_dict(include=PML_KNN_METRICS), **kwargs),
            b._get_accuracy(b.get_function_dict(include=PML_KNN_METRICS), **kwargs),
            PML_KNN_METRICS,
            tol=1e-12,
        )
        assert a.calculate_mean_average_precision(knn_labels, labels, not_lone, True, label_counts) == pytest.approx(
            b.calculate_mean_average_precision(knn_labels, labels, not_lone, True, label_counts), abs=1e-12
        )


def _with_custom_metrics(base):
    class Custom(base):
        """PML's documented recipe: a new kNN metric, and an override of one of PML's."""

        def requires_knn(self):
            return [*super().requires_knn(), "precision_at_5", "columns"]

        def calculate_precision_at_5(self, knn_labels, query_labels, **kwargs):
            return (knn_labels[:, :5] == query_labels[:, None]).double().mean().item()

        def calculate_columns(self, knn_labels, **kwargs):
            return knn_labels.shape[1]

        def calculate_mean_average_precision(
            self, knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts, **kwargs
        ):
            value = super().calculate_mean_average_precision(
                knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts, **kwargs
            )
            return 2 * value

    return Custom


@pytest.mark.parametrize("k", [None, "max_bin_count", 12])
def test_subclass_with_custom_metrics_works_as_under_pml(k):
    x, labels = data(seed=9)
    for args in splits(x, labels).values():
        a = _with_custom_metrics(AccuracyCalculator)(
            device=CPU, plugin_metrics=False, exclude=("NMI", "AMI"), k=k
        ).get_accuracy(*args)
        b = _with_custom_metrics(pml_ac.AccuracyCalculator)(device=CPU, exclude=("NMI", "AMI"), k=k).get_accuracy(*args)
        assert a["columns"] == b["columns"]  # exactly PML's columns (the whole ranking with k=None)
        assert_close(a, b, (*PML_KNN_METRICS, "precision_at_5"))


def test_pmls_tester_with_default_arguments():
    x, labels = data(seed=10, n=300)
    dataset = torch.utils.data.TensorDataset(x, labels)
    results = []
    for calculator in (ours(), pml()):
        tester = GlobalEmbeddingSpaceTester(
            accuracy_calculator=calculator, dataloader_num_workers=0, batch_size=128, data_device=CPU
        )
        results.append(tester.test({"val": dataset}, 0, torch.nn.Identity())["val"])
    for key, value in results[1].items():
        if key != "epoch":
            assert results[0][key] == pytest.approx(value, abs=1e-6), key


def test_our_metrics_from_pmls_arguments_alone():
    # PML's own tests call _get_accuracy on every metric of the calculator with PML's arguments only
    query_labels = torch.tensor([1, 1, 2, 3, 4, 0])
    knn_labels = torch.tensor(
        [[0, 1, 1, 2, 2], [1, 0, 1, 1, 3], [4, 4, 4, 4, 2], [3, 1, 3, 1, 3], [0, 0, 4, 2, 2], [1, 2, 3, 4, 5]]
    )
    label_counts = ([0, 1, 2, 3, 4], [2, 3, 5, 4, 5])
    calc = ours(ndcg_ks=(4,), recall_ks=(1, 2))
    acc = calc._get_accuracy(
        calc.get_function_dict(),
        query_labels=query_labels,
        knn_labels=knn_labels,
        label_counts=label_counts,
        not_lone_query_mask=torch.ones(6, dtype=torch.bool),
        ref_includes_query=False,
    )
    assert acc["recall_at_1"] == pytest.approx(2 / 6) and acc["recall_at_2"] == pytest.approx(3 / 6)
    discount = 1 / np.log2(np.arange(2, 6))  # nDCG@4 by hand
    counts = dict(zip(*label_counts))
    ndcg = [
        float((knn_labels[i, :4] == q).numpy() @ discount) / discount[: min(4, counts[int(q)])].sum()
        for i, q in enumerate(query_labels)
    ]
    assert acc["ndcg_at_4"] == pytest.approx(np.mean(ndcg), abs=1e-12)
    assert acc["precision_at_1"] == pytest.approx(2 / 6)


class _NoPrefix(KNN):
    """A KNN whose searched columns the calculator may not read as the top of the full ranking."""

    def full_ranking_prefix(self, device):
        return False


@pytest.mark.parametrize("ties", [False, True])
def test_queries_read_off_the_searched_columns_equal_the_blocked_pass(ties):
    x, labels = data(seed=11, ties=ties, n=300, num_classes=30)
    for args in splits(x, labels).values():
        mixed = ours().get_accuracy(*args)  # most queries have every relevant reference in the top 100
        ranked = ours(knn_func=_NoPrefix()).get_accuracy(*args)  # every query through the blocked pass
        for key in ("mean_average_precision", "mean_reciprocal_rank"):
            assert mixed[key] == pytest.approx(ranked[key], abs=1e-12), key
        assert_close(mixed, pml().get_accuracy(*args), PML_KNN_METRICS, tol=1e-9 if ties else 1e-6)
