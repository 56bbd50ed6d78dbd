"""PML's full-ranking ``mean_average_precision`` and ``mean_reciprocal_rank`` in bounded memory.

PML's ``AccuracyCalculator(k=None)`` ranks every reference for every query (an ``N x N``
kNN: 29 GB of distances and indices at Stanford Online Products scale) and then reads the
ranking only at the relevant references. A relevant reference's rank is one plus the number of
references that come before it, so the ranking is never needed as a whole: for a block of
queries we score every reference, keep only the references that come before the query's *last*
relevant one (usually a handful), sort those, and read each relevant reference's rank and its
order among the relevant ones. Memory is bounded by the block (``block_elements`` scores).

Order of references, exactly as PML's default kNN (FAISS's flat indexes, which ``FaissKNN``
and :class:`pml_plugins.knn.KNN` use) returns them -- checked on data with many exact ties:

* L2 (``IndexFlatL2``; our ``metric="euclidean"``): ascending squared distance, equal
  distances by ascending reference index;
* inner product (``IndexFlatIP``; ``"cosine"`` on L2-normalised rows, ``"inner_product"``):
  descending similarity, equal similarities by *descending* reference index;
* with ``ref_includes_query`` the query's own row is left out (PML drops its column).

Scores are float32, the squared distance as FAISS forms it (``|q|^2 + |r|^2 - 2 q.r``), so
exact ties (duplicates, small integer coordinates) are ordered exactly as by FAISS; references
whose scores differ by a few float32 ulps may be ordered differently, as FAISS's own order
differs between query batch sizes. (``torch.topk``, behind PML's ``CustomKNN``, orders ties
arbitrarily: the calculator runs such ``knn_func`` themselves, as PML does.)
"""
from __future__ import annotations

from typing import Callable

import torch

from .knn.progress import progress_bar

__all__ = ["RANKABLE_METRICS", "full_ranking_precisions", "DEFAULT_BLOCK_ELEMENTS"]

#: Metrics of :class:`pml_plugins.knn.KNN` whose full ranking this module reproduces.
RANKABLE_METRICS = ("euclidean", "cosine", "inner_product")
#: Scores per query block (32 MiB of float32): with the filtered candidates and their sort keys
#: a block stays well under 1 GiB even when every reference precedes the last relevant one.
DEFAULT_BLOCK_ELEMENTS = 2**23


def _sortable(scores: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys in [0, 2**32) with the same order (IEEE bits, negatives flipped)."""
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0: equal floats, equal keys
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long() + 2**31


@torch.no_grad()
def full_ranking_precisions(
    query: torch.Tensor,
    reference: torch.Tensor,
    relevant: Callable[[int, int], torch.Tensor],
    metric: str,
    ref_includes_query: bool,
    *,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query: the sum of precision at each relevant rank, and the rank of the first relevant.

    Args:
        query: ``(Q, D)`` float32.
        reference: ``(N, D)`` float32, on the query's device.
        relevant: ``relevant(start, stop)`` -> ``(stop - start, N)`` bool: whether each reference
            is relevant to queries ``start:stop`` (``label_comparison_fn`` of the labels).
        metric: ``"euclidean"``, ``"cosine"`` or ``"inner_product"`` (see the module docstring).
        ref_includes_query: query ``i`` is reference ``i``; it is neither ranked nor relevant.
        block_elements: scores held at once (the block is ``block_elements // N`` queries).
        progress: tqdm bar (None: on a terminal, for several blocks).

    Returns:
        ``(precision_sum, first_rank)``: ``(Q,)`` float64 ``sum_t t / rank_t`` over the relevant
        references in ranked order (PML's MAP numerator with k = all), and ``(Q,)`` int64 rank
        (1-based) of the first relevant reference, 0 where none is relevant.
    """
    if metric not in RANKABLE_METRICS:
        raise ValueError(f"metric must be one of {RANKABLE_METRICS}, got {metric!r}")
    num_query, n = len(query), len(reference)
    device = query.device
    if metric == "cosine":
        query = torch.nn.functional.normalize(query, dim=1)
        reference = torch.nn.functional.normalize(reference, dim=1)
    euclidean = metric == "euclidean"
    ref_sq = (reference * reference).sum(1) if euclidean else None
    precision_sum = torch.zeros(num_query, dtype=torch.float64, device=device)
    first_rank = torch.zeros(num_query, dtype=torch.long, device=device)
    step = max(1, block_elements // max(n, 1))
    blocks = -(-num_query // step)
    cols = torch.arange(n, device=device)
    with progress_bar(num_query, blocks, progress, "full ranking (MAP, MRR)") as bar:
        for start in range(0, num_query, step):
            stop = min(num_query, start + step)
            q = query[start:stop]
            if euclidean:  # lower is better; FAISS's |q|^2 + |r|^2 - 2 q.r
                score = torch.addmm(ref_sq[None, :] + (q * q).sum(1, keepdim=True), q, reference.T, alpha=-2)
            else:  # negated similarity: lower is better
                score = torch.neg(q @ reference.T)
            rel = relevant(start, stop).to(device=device, dtype=torch.bool)
            if ref_includes_query:
                rows = torch.arange(stop - start, device=device)
                own = rows + start
                keep = own < n
                rel[rows[keep], own[keep]] = False
                score[rows[keep], own[keep]] = float("inf")  # never before a relevant reference
            if not euclidean:  # FAISS's IP heaps put the larger index first among equal scores
                score, rel = score.flip(1), rel.flip(1)
            _accumulate(score, rel, cols, precision_sum[start:stop], first_rank[start:stop])
            bar.update(stop - start)
    return precision_sum, first_rank


def _accumulate(score: torch.Tensor, rel: torch.Tensor, cols: torch.Tensor, precision_sum: torch.Tensor,
                first_rank: torch.Tensor) -> None:
    """One block: ranks of the relevant references, in the order (score, column) ascending."""
    b = len(score)
    worst = torch.where(rel, score, torch.full_like(score, float("-inf"))).amax(1, keepdim=True)
    # among relevant references at the worst score, the last column comes last
    at_worst = rel & (score == worst)
    worst_col = (len(cols) - 1) - torch.argmax(at_worst.flip(1).to(torch.uint8), dim=1, keepdim=True)
    # every reference ranked at or before the last relevant one (none for rows without one)
    before = (score < worst) | ((score == worst) & (cols[None, :] <= worst_col))
    rows, col = before.nonzero(as_tuple=True)
    if len(rows) == 0:
        return
    # nonzero is row-major with ascending columns; a stable sort on (row, score) keeps them so
    order = torch.sort((rows << 32) | _sortable(score[rows, col]), stable=True).indices
    rows = rows[order]
    is_rel = rel[rows, col[order]]
    counts = torch.bincount(rows, minlength=b)
    row_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(rows), device=rows.device) - row_start[rows] + 1
    found = torch.cumsum(is_rel.long(), 0)
    found_before_row = (found - is_rel.long())[row_start.clamp(max=len(rows) - 1)]
    t = found - found_before_row[rows]  # this relevant reference's order among the row's relevant ones
    contribution = torch.where(is_rel, t.double() / rank.double(), torch.zeros((), dtype=torch.float64,
                                                                                device=rows.device))
    precision_sum.index_add_(0, rows, contribution)
    first = is_rel & (t == 1)
    first_rank[rows[first]] = rank[first]
