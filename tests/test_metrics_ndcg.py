"""nDCG@k and Recall@k of pml_plugins.AccuracyCalculator against the paper, a loop reference and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import ndcg_score

from pml_plugins import AccuracyCalculator
from pml_plugins.knn import KNN

CPU = torch.device("cpu")
# Table 3 of the Multi-Proxy Anchor paper: rankings of 10 results for a query with 4 relevant
# items, and (Recall@10, MAP@R, nDCG@10) x 100.
TABLE_3 = [
    ([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], 100, 25.0, 39.0),
    ([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], 100, 25.0, 50.3),
    ([1, 0, 1, 0, 0, 0, 0, 0, 0, 0], 100, 41.7, 58.6),
    ([1, 0, 1, 0, 0, 0, 1, 0, 0, 1], 100, 41.7, 82.9),
    ([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], 100, 100.0, 100.0),
]


def calculator(**kw):
    kw.setdefault("device", CPU)
    kw.setdefault("plugin_metrics", False)
    kw.setdefault("exclude", ("NMI", "AMI"))
    return AccuracyCalculator(**kw)


def ranking_to_embeddings(ranking, num_relevant):
    """One query at 0 on a line; the i-th result at distance i; missing relevant items far away."""
    positions = [float(i + 1) for i in range(len(ranking))]
    labels = [0 if r else 100 + i for i, r in enumerate(ranking)]
    extra = num_relevant - sum(ranking)
    positions += [1000.0 + j for j in range(extra)]
    labels += [0] * extra
    reference = torch.tensor(positions)[:, None]
    return torch.zeros(1, 1), torch.tensor([0]), reference, torch.tensor(labels)


@pytest.mark.parametrize("ranking, recall10, map_r, ndcg10", TABLE_3)
def test_table_3(ranking, recall10, map_r, ndcg10):
    q, ql, r, rl = ranking_to_embeddings(ranking, num_relevant=4)
    res = calculator(ndcg_ks=(10,), recall_ks=(10,)).get_accuracy(q, ql, r, rl)
    assert round(100 * res["ndcg_at_10"], 1) == ndcg10
    assert round(100 * res["recall_at_10"], 1) == recall10
    assert round(100 * res["mean_average_precision_at_r"], 1) == map_r


def test_table_3_by_hand():
    # row 1: DCG = 1; ideal = 1 + 1/log2(3) + 1/log2(4) + 1/log2(5) = 2.5616 -> 0.3904
    q, ql, r, rl = ranking_to_embeddings(TABLE_3[0][0], 4)
    res = calculator(ndcg_ks=(10,)).get_accuracy(q, ql, r, rl)
    assert res["ndcg_at_10"] == pytest.approx(1 / (1 + 1 / math.log2(3) + 0.5 + 1 / math.log2(5)), abs=1e-12)
    # row 4 at k=2: DCG = 1, ideal = 1 + 1/log2(3) -> 0.6131
    q, ql, r, rl = ranking_to_embeddings(TABLE_3[3][0], 4)
    res = calculator(ndcg_ks=(2,), recall_ks=(2,)).get_accuracy(q, ql, r, rl)
    assert res["ndcg_at_2"] == pytest.approx(1 / (1 + 1 / math.log2(3)), abs=1e-12)


def reference_ndcg(query, query_labels, reference, reference_labels, k, ref_includes_query, gain=None):
    """Obviously-correct loop: rank by euclidean distance, sum gains / log2(rank + 1), divide by the ideal."""
    query, reference = query.double().numpy(), reference.double().numpy()
    query_labels, reference_labels = query_labels.tolist(), reference_labels.tolist()
    per_query = []
    for i in range(len(query)):
        d = ((reference - query[i]) ** 2).sum(1)
        candidates = [j for j in range(len(reference)) if not (ref_includes_query and j == i)]
        ranked = sorted(candidates, key=lambda j: d[j])

        def g(j):
            if gain is None:
                return float(reference_labels[j] == query_labels[i])
            return float(gain(query_labels[i], reference_labels[j]))

        dcg = sum(g(j) / math.log2(rank + 2) for rank, j in enumerate(ranked[:k]))
        best = sorted((g(j) for j in candidates), reverse=True)[:k]
        ideal = sum(x / math.log2(rank + 2) for rank, x in enumerate(best))
        per_query.append(dcg / ideal if ideal > 0 else None)
    return per_query


def hierarchical_gain(q, r):
    """2 for the same class, 1 for the same super-class (class // 3)."""
    same = q == r
    return (
        same * 2.0 + ((q // 3) == (r // 3)) * (~same) * 1.0
        if isinstance(q, torch.Tensor)
        else (2.0 if q == r else (1.0 if q // 3 == r // 3 else 0.0))
    )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("gain", [None, hierarchical_gain])
def test_against_loop_reference(seed, gain):
    g = torch.Generator().manual_seed(seed)
    n = 120
    labels = torch.randint(0, 15, (n,), generator=g)
    labels[:2] = torch.tensor([50, 51])  # lone queries (no other item of their class)
    x = (
        torch.randn(n, 6, generator=g, dtype=torch.float64)
        + torch.randn(60, 6, generator=g, dtype=torch.float64)[labels % 60]
    )
    ks = (1, 3, 10, 50)
    for reference_split in (False, True):
        if reference_split:
            q, ql, r, rl, inc = x[:40], labels[:40], x[40:], labels[40:], False
        else:
            q, ql, r, rl, inc = x, labels, x, labels, True
        res = calculator(
            ndcg_ks=ks, recall_ks=(), gain_fn=gain, include=tuple(f"ndcg_at_{k}" for k in ks)
        ).get_accuracy(q.float(), ql, r.float(), rl, ref_includes_query=inc)
        for k in ks:
            expected = [v for v in reference_ndcg(q, ql, r, rl, k, inc, gain) if v is not None]
            assert res[f"ndcg_at_{k}"] == pytest.approx(float(np.mean(expected)), abs=1e-9), (k, reference_split)


@pytest.mark.parametrize("gain", [None, hierarchical_gain])
def test_against_sklearn_ndcg_score(gain):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(30, 5, generator=g)
    r = torch.randn(200, 5, generator=g)
    ql = torch.randint(0, 12, (30,), generator=g)
    rl = torch.randint(0, 12, (200,), generator=g)
    res = calculator(ndcg_ks=(1, 5, 20, 200), recall_ks=(), gain_fn=gain, knn_func=KNN("cosine")).get_accuracy(
        q, ql, r, rl
    )
    if gain is None:
        y_true = (ql[:, None] == rl[None]).double().numpy()
    else:
        y_true = hierarchical_gain(ql[:, None], rl[None]).numpy()
    y_score = (torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(r, dim=1).T).numpy()
    keep = y_true.sum(1) > 0  # sklearn scores queries without relevant items as 0; PML and we skip them
    for k in (1, 5, 20, 200):
        assert res[f"ndcg_at_{k}"] == pytest.approx(ndcg_score(y_true[keep], y_score[keep], k=k), abs=1e-6)


def test_ties():
    # the query is at 0; four references tie at distance 1, then one at distance 2
    q = torch.zeros(1, 2)
    ql = torch.tensor([0])
    circle = torch.tensor([[1.0, 0], [0, 1.0], [-1.0, 0], [0, -1.0]])
    r = torch.cat([circle, torch.tensor([[2.0, 0]])])
    # all tied items equally relevant: every order gives sklearn's tie-averaged value
    rl = torch.tensor([0, 0, 1, 1, 0])
    rl_same = torch.tensor([0, 0, 0, 0, 1])
    res = calculator(ndcg_ks=(2, 5), recall_ks=()).get_accuracy(q, ql, r, rl_same)
    y_score = -np.linalg.norm(r.numpy(), axis=1)[None]
    for k in (2, 5):
        assert res[f"ndcg_at_{k}"] == pytest.approx(
            ndcg_score((rl_same == 0).double().numpy()[None], y_score, k=k), abs=1e-12
        )
    # mixed relevance inside the tie: the value is that of the kNN's order, between worst and best
    res = calculator(ndcg_ks=(2,), recall_ks=()).get_accuracy(q, ql, r, rl)
    ideal = 1 + 1 / math.log2(3)  # R = 3 relevant, min(2, 3) in front
    possible = [0.0, 1 / ideal, (1 / math.log2(3)) / ideal, 1.0]  # none, first, second, both relevant
    assert any(res["ndcg_at_2"] == pytest.approx(v, abs=1e-12) for v in possible)


def test_single_relevant_and_no_relevant_queries():
    # query 0: its only relevant reference is 3rd -> nDCG@k = 1/log2(4) = 0.5 for k >= 3, 0 below
    # query 1: no relevant reference at all -> skipped (PML's lone queries)
    q = torch.tensor([[0.0], [0.05]])
    ql = torch.tensor([0, 7])
    r = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    rl = torch.tensor([1, 2, 0, 3])
    res = calculator(ndcg_ks=(2, 3, 4), recall_ks=(2, 3)).get_accuracy(q, ql, r, rl)
    assert res["ndcg_at_2"] == 0.0
    assert res["ndcg_at_3"] == pytest.approx(0.5)
    assert res["ndcg_at_4"] == pytest.approx(0.5)
    assert res["recall_at_2"] == 0.0 and res["recall_at_3"] == 1.0
    # only lone queries: NaN, as PML reports its metrics then
    res = calculator(ndcg_ks=(2,), recall_ks=(1,), return_per_class=True).get_accuracy(q[1:], ql[1:], r, rl)
    assert math.isnan(res["ndcg_at_2"][0]) and math.isnan(res["recall_at_1"][0])


def test_k_larger_than_references():
    # 3 references but nDCG@100: the search is capped, the ideal uses min(k, R)
    q, ql = torch.zeros(1, 1), torch.tensor([0])
    r, rl = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1, 0, 0])
    res = calculator(ndcg_ks=(100,), recall_ks=(100,)).get_accuracy(q, ql, r, rl)
    ideal = 1 + 1 / math.log2(3)
    assert res["ndcg_at_100"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / ideal)
    assert res["recall_at_100"] == 1.0


def test_avg_of_avgs_and_per_class_for_ndcg():
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([0] * 30 + [1] * 5 + [2] * 10)
    x = torch.randn(45, 4, generator=g)
    calc = calculator(ndcg_ks=(4,), recall_ks=(2,), return_per_class=True, include=("ndcg_at_4", "recall_at_2"))
    per_class = calc.get_accuracy(x, labels)
    expected = reference_ndcg(x, labels, x, labels, 4, True)
    for c in range(3):
        vals = [v for v, lab in zip(expected, labels.tolist()) if lab == c]
        assert per_class["ndcg_at_4"][c] == pytest.approx(np.mean(vals), abs=1e-9)
    avg = calculator(ndcg_ks=(4,), recall_ks=(2,), avg_of_avgs=True).get_accuracy(x, labels)
    assert avg["ndcg_at_4"] == pytest.approx(np.mean(per_class["ndcg_at_4"]), abs=1e-12)
    assert avg["recall_at_2"] == pytest.approx(np.mean(per_class["recall_at_2"]), abs=1e-12)


def test_bad_ks():
    with pytest.raises(ValueError, match="ndcg_ks"):
        AccuracyCalculator(ndcg_ks=(0,), plugin_metrics=False)
    with pytest.raises(ValueError, match="recall_ks"):
        AccuracyCalculator(recall_ks=("a",), plugin_metrics=False)
    with pytest.raises(TypeError, match="gain_fn"):
        AccuracyCalculator(gain_fn=3, plugin_metrics=False)
    with pytest.raises(ValueError):
        AccuracyCalculator(include=("ndcg_at_3",), plugin_metrics=False)  # not among ndcg_ks
