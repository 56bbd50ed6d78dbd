"""Neighbours, per-query AP@R and per-class statistics of the test embeddings, for the report.

The same protocol as the evaluation: the test split is queried against itself with each query
left out of its own neighbours, cosine (L2-normalised) or Euclidean. Bounded for large test
sets: at most :data:`MAX_QUERIES` queries (a seeded sample) are searched, every sample is a
reference, and at most :data:`MAX_DEPTH` neighbours are kept per query (a class larger than
that gets AP@R over its first MAX_DEPTH neighbours, a lower bound).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: most queries the report searches (a seeded sample beyond that)
MAX_QUERIES = 5_000
#: most neighbours kept per query
MAX_DEPTH = 256


@dataclass
class QueryResults:
    """Per-query results for ``queries`` (row numbers of the test split), nearest first."""

    queries: np.ndarray  # (Q,)
    neighbours: np.ndarray  # (Q, depth) row numbers
    scores: np.ndarray  # (Q, depth) cosine similarity, or Euclidean distance
    hits: np.ndarray  # (Q, depth) bool: the neighbour has the query's label
    ap_at_r: np.ndarray  # (Q,) average precision at R; NaN for a query alone in its class
    r: np.ndarray  # (Q,) R: the other samples of the query's class


def search(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    distance: str = "cosine",
    k: int = 8,
    max_queries: int = MAX_QUERIES,
    seed: int = 0,
    block: int = 1024,
) -> QueryResults:
    """Top neighbours of (a seeded sample of) every row, itself excluded, with AP@R per query."""
    emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if emb.ndim != 2 or len(emb) != n or n < 2:
        raise ValueError(f"embeddings must be (N, D) with N >= 2 labels, got {tuple(emb.shape)} and {labels.shape}")
    if distance not in ("cosine", "euclidean"):
        raise ValueError(f"distance must be 'cosine' or 'euclidean', got {distance!r}")
    if distance == "cosine":
        emb = torch.nn.functional.normalize(emb, dim=1)
    queries = (
        np.arange(n)
        if n <= max_queries
        else np.sort(np.random.default_rng(seed).choice(n, size=max_queries, replace=False))
    )
    r = np.bincount(labels)[labels[queries]] - 1
    depth = int(min(n - 1, MAX_DEPTH, max(k, int(r.max()))))
    sq = (emb * emb).sum(1)
    nbrs, scores = [], []
    for start in range(0, len(queries), block):
        q = torch.as_tensor(queries[start : start + block])
        sim = emb[q] @ emb.T
        if distance == "euclidean":  # rank by -||a - b||^2
            sim = -(sq[q, None] + sq[None, :] - 2 * sim).clamp_min(0)
        sim[torch.arange(len(q)), q] = -float("inf")  # leave the query out
        s, i = torch.topk(sim, depth, dim=1)
        nbrs.append(i)
        scores.append(torch.sqrt(-s) if distance == "euclidean" else s)
    neighbours = torch.cat(nbrs).numpy()
    hits = labels[neighbours] == labels[queries][:, None]
    # AP@R: the precision at each hit among the first R neighbours, summed, over R
    within = np.arange(depth)[None, :] < np.minimum(r, depth)[:, None]
    precision = np.cumsum(hits, axis=1) / np.arange(1, depth + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(r > 0, (precision * (hits & within)).sum(axis=1) / r, np.nan)
    return QueryResults(
        queries=queries, neighbours=neighbours, scores=torch.cat(scores).numpy(), hits=hits, ap_at_r=ap, r=r
    )


def per_class(results: QueryResults, labels: np.ndarray, top: int = 3) -> list[dict]:
    """Recall@1, MAP@R and the most-confused classes of each class, worst MAP@R first.

    The confusion of class c: the labels of the wrong neighbours among the first R neighbours
    of c's queries, as shares of all those wrong neighbours.
    """
    labels = np.asarray(labels)
    qlab = labels[results.queries]
    rows = []
    for c in np.unique(qlab):
        mask = qlab == c
        ap = results.ap_at_r[mask]
        depth = max(int(results.r[mask][0]), 1)
        near = labels[results.neighbours[mask][:, :depth]]
        wrong = near[near != c]
        values, counts = np.unique(wrong, return_counts=True)
        order = np.argsort(-counts, kind="stable")[:top]
        rows.append(
            {
                "label": int(c),
                "queries": int(mask.sum()),
                "recall_at_1": float(results.hits[mask, 0].mean()),
                "map_at_r": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
                "confused_with": [(int(values[i]), float(counts[i] / len(wrong))) for i in order],
            }
        )
    rows.sort(key=lambda row: (np.nan_to_num(row["map_at_r"], nan=2.0), row["recall_at_1"]))
    return rows
