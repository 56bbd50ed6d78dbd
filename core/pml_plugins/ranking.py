"""PML's full-ranking ``mean_average_precision`` and ``mean_reciprocal_rank`` in bounded memory.

PML's ``AccuracyCalculator(k=None)`` ranks every reference for every query (an ``N x N``
kNN: 29 GB of distances and indices at Stanford Online Products scale) and then reads the
ranking only at the relevant references. A relevant reference's rank is one plus the number of
references that come before it, so the ranking is never needed as a whole: for a block of
queries we score every reference, keep only the references that come before the query's *last*
relevant one (usually a handful), sort those, and read each relevant reference's rank and its
order among the relevant ones. Memory is bounded by the block (``block_elements`` scores, and
the kept references, at most as many). With integer labels compared for equality, each query's
relevant references are looked up among the references sorted by label, without a
``block x N`` label comparison. ``queries`` restricts the pass to some queries (the calculator
ranks only those whose relevant references were not all among the searched neighbours).

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

__all__ = ["RANKABLE_METRICS", "Relevance", "full_ranking_precisions", "DEFAULT_BLOCK_ELEMENTS"]

#: Metrics of :class:`pml_plugins.knn.KNN` whose full ranking this module reproduces.
RANKABLE_METRICS = ("euclidean", "cosine", "inner_product")
#: Scores per query block (32 MiB of float32): with the filtered candidates and their sort keys
#: a block stays well under 1 GiB even when every reference precedes the last relevant one.
DEFAULT_BLOCK_ELEMENTS = 2**23


def _sortable(scores: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys in [0, 2**32) with the same order (IEEE bits, negatives flipped)."""
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0: equal floats, equal keys
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long() + 2**31


class Relevance:
    """Which references are relevant to which queries, for a block of queries.

    ``Relevance.by_ids(query_ids, reference_ids)``: relevant means the same integer label id
    (the calculator's equality case; no ``(block x N)`` comparison is made: each query's
    relevant references come from the references sorted by id). ``Relevance.by_mask(fn)``:
    ``fn(queries)`` returns the ``(len(queries), N)`` bool mask of the queries with those
    indices (``label_comparison_fn``).
    """

    def __init__(
        self,
        query_ids: torch.Tensor | None = None,
        reference_ids: torch.Tensor | None = None,
        mask_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if (query_ids is None) == (mask_fn is None):
            raise ValueError("give either query_ids and reference_ids, or mask_fn")
        self.query_ids, self.reference_ids, self.mask_fn = query_ids, reference_ids, mask_fn
        if query_ids is not None:
            if reference_ids is None:
                raise ValueError("query_ids needs reference_ids")
            size = (
                int(
                    max(
                        int(query_ids.max()) if len(query_ids) else 0,
                        int(reference_ids.max()) if len(reference_ids) else 0,
                    )
                )
                + 1
            )
            self._sorted_refs = torch.sort(reference_ids, stable=True).indices
            self._counts = torch.bincount(reference_ids, minlength=size)
            self._starts = torch.cumsum(self._counts, 0) - self._counts

    @classmethod
    def by_ids(cls, query_ids: torch.Tensor, reference_ids: torch.Tensor) -> Relevance:
        return cls(query_ids=query_ids, reference_ids=reference_ids)

    @classmethod
    def by_mask(cls, mask_fn: Callable[[torch.Tensor], torch.Tensor]) -> Relevance:
        return cls(mask_fn=mask_fn)

    def block(self, queries: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Callable]:
        """``(rows, cols, member)``: the relevant pairs of the queries with indices ``queries``
        (rows index ``queries``), and ``member(rows, cols)``, whether given pairs are relevant."""
        if self.mask_fn is not None:
            mask = self.mask_fn(queries).to(device=device, dtype=torch.bool)
            rows, cols = mask.nonzero(as_tuple=True)
            return rows, cols, lambda r, c: mask[r, c]
        q = self.query_ids[queries.to(self.query_ids.device)]
        counts = self._counts[q]
        rows = torch.repeat_interleave(torch.arange(len(q), device=q.device), counts)
        offsets = torch.arange(len(rows), device=q.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        cols = self._sorted_refs[self._starts[q][rows] + offsets]
        ref_ids = self.reference_ids
        return rows, cols, lambda r, c: ref_ids[c] == q[r]


@torch.no_grad()
def full_ranking_precisions(
    query: torch.Tensor,
    reference: torch.Tensor,
    relevance: Relevance,
    metric: str,
    ref_includes_query: bool,
    *,
    queries: torch.Tensor | None = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query: the sum of precision at each relevant rank, and the rank of the first relevant.

    Args:
        query: ``(Q, D)`` float32.
        reference: ``(N, D)`` float32, on the query's device.
        relevance: which references are relevant to which queries (:class:`Relevance`).
        metric: ``"euclidean"``, ``"cosine"`` or ``"inner_product"`` (see the module docstring).
        ref_includes_query: query ``i`` is reference ``i``; it is neither ranked nor relevant.
        queries: indices of the queries to rank (default: all); the others get 0 and 0.
        block_elements: scores held at once (the block is ``block_elements // N`` queries).
        progress: tqdm bar (None: on a terminal, for several blocks).

    Returns:
        ``(precision_sum, first_rank)``: ``(Q,)`` float64 ``sum_t t / rank_t`` over the relevant
        references in ranked order (PML's MAP numerator with k = all), and ``(Q,)`` int64 rank
        (1-based) of the first relevant reference, 0 where none is relevant.
    """
    if metric not in RANKABLE_METRICS:
        raise ValueError(f"metric must be one of {RANKABLE_METRICS}, got {metric!r}")
    if not isinstance(relevance, Relevance):
        raise TypeError(f"relevance must be a Relevance, got {type(relevance).__name__}")
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
    todo = torch.arange(num_query, device=device) if queries is None else queries.to(device=device, dtype=torch.long)
    with progress_bar(len(todo), -(-len(todo) // step), progress, "full ranking (MAP, MRR)") as bar:
        for start in range(0, len(todo), step):
            ids = todo[start : start + step]
            q = query[ids]
            if euclidean:  # lower is better; FAISS's |q|^2 + |r|^2 - 2 q.r
                score = torch.addmm(ref_sq[None, :] + (q * q).sum(1, keepdim=True), q, reference.T, alpha=-2)
            else:  # negated similarity: lower is better
                score = torch.neg(q @ reference.T)
            rows, cols, member = relevance.block(ids, device)
            if ref_includes_query:
                keep = cols != ids[rows]  # the query itself is not in PML's ranking
                rows, cols = rows[keep], cols[keep]
                local = torch.nonzero(ids < n).flatten()
                score[local, ids[local]] = float("inf")  # never before a relevant reference
            block_sum = torch.zeros(len(ids), dtype=torch.float64, device=device)
            block_first = torch.zeros(len(ids), dtype=torch.long, device=device)
            _accumulate(score, rows, cols, member, not euclidean, block_sum, block_first)
            precision_sum[ids], first_rank[ids] = block_sum, block_first
            bar.update(len(ids))
    return precision_sum, first_rank


def _accumulate(
    score: torch.Tensor,
    rel_rows: torch.Tensor,
    rel_cols: torch.Tensor,
    member: Callable,
    descending_cols: bool,
    precision_sum: torch.Tensor,
    first_rank: torch.Tensor,
) -> None:
    """One block: ranks of the relevant references, by (score, column) ascending (column
    descending with ``descending_cols``)."""
    if len(rel_rows) == 0:
        return
    b, n = score.shape
    rel_score = score[rel_rows, rel_cols]
    worst = torch.full((b,), float("-inf"), device=score.device).scatter_reduce(0, rel_rows, rel_score, "amax")
    tie = -rel_cols if descending_cols else rel_cols  # tie order: larger key comes later
    at_worst = rel_score == worst[rel_rows]
    worst_tie = torch.full((b,), -n - 1, dtype=torch.long, device=score.device).scatter_reduce(
        0, rel_rows[at_worst], tie[at_worst], "amax"
    )
    # every reference ranked at or before each row's last relevant one: one pass over the block,
    # then the (rare) references tied with it but ordered after it are dropped from the short list
    rows, cols = (score <= worst[:, None]).nonzero(as_tuple=True)
    s = score[rows, cols]
    keep = (s < worst[rows]) | ((-cols if descending_cols else cols) <= worst_tie[rows])
    rows, cols, s = rows[keep], cols[keep], s[keep]
    if descending_cols:  # nonzero lists columns ascending; reversed, the stable sort keeps them descending
        rows, cols, s = rows.flip(0), cols.flip(0), s.flip(0)
    order = torch.sort((rows << 32) | _sortable(s), stable=True).indices
    rows, cols = rows[order], cols[order]
    is_rel = member(rows, cols)
    counts = torch.bincount(rows, minlength=b)
    row_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(rows), device=rows.device) - row_start[rows] + 1
    found = torch.cumsum(is_rel.long(), 0)
    found_before_row = (found - is_rel.long())[row_start.clamp(max=len(rows) - 1)]
    t = found - found_before_row[rows]  # this relevant reference's order among the row's relevant ones
    zero = torch.zeros((), dtype=torch.float64, device=rows.device)
    precision_sum.index_add_(0, rows, torch.where(is_rel, t.double() / rank.double(), zero))
    first = is_rel & (t == 1)
    first_rank[rows[first]] = rank[first]
