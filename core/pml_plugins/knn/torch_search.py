"""The exact torch search (no FAISS, or CUDA inputs without FAISS GPU) and PML's self-match rule."""

from __future__ import annotations

import torch

from .progress import progress_bar

__all__ = ["torch_search", "drop_self_matches", "DEFAULT_BLOCK_ELEMENTS"]

#: Score-block budget of the torch path, in elements (128 MiB of float32).
DEFAULT_BLOCK_ELEMENTS = 2**25


def torch_search(
    q: torch.Tensor,
    r: torch.Tensor,
    k: int,
    metric: str,
    chunk_size: int | None,
    minus_r_sq: torch.Tensor | None = None,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best rows of ``r`` for each row of ``q`` (both already as searched), in query blocks.

    Args:
        q, r: float32 rows on one device (L2-normalised for cosine).
        k: neighbours per query.
        metric: ``"euclidean"`` (ascending unsquared distances) or a similarity (descending).
        chunk_size: queries per block (None: blocks of at most :data:`DEFAULT_BLOCK_ELEMENTS` scores).
        minus_r_sq: ``-|r|^2`` as a ``(1, N)`` row, when already computed (euclidean only).
        progress: tqdm bar (None: for several blocks, on a terminal).
    """
    n = len(r)
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_BLOCK_ELEMENTS // max(n, 1))
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scores = torch.empty(len(q), k, dtype=torch.float32, device=q.device)
    indices = torch.empty(len(q), k, dtype=torch.int64, device=q.device)
    euclidean = metric == "euclidean"
    if euclidean and minus_r_sq is None:
        minus_r_sq = -(r * r).sum(1)[None, :]
    with progress_bar(len(q), -(-len(q) // chunk_size), progress, "kNN search (torch)") as bar:
        for start in range(0, len(q), chunk_size):  # loop over query blocks: bounds memory
            block = q[start : start + chunk_size]
            if euclidean:
                # ||q - r||^2 = |q|^2 - (2 q.r - |r|^2): rank on the bracket, built inside the GEMM
                # (one pass over the block), and form distances only for the k kept
                score = torch.addmm(minus_r_sq, block, r.T, alpha=2)
                values, idx = torch.topk(score, k, dim=1, largest=True)
                values = ((block * block).sum(1, keepdim=True) - values).clamp_min_(0).sqrt_()
            else:
                values, idx = torch.topk(block @ r.T, k, dim=1, largest=True)
            scores[start : start + len(block)] = values
            indices[start : start + len(block)] = idx
            bar.update(len(block))
    return scores, indices


def drop_self_matches(scores: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove each query's own index from a search of ``k + 1`` neighbours (query ``i`` is reference ``i``).

    Exactly PML's rule (``inference.return_results``): drop the column holding ``i`` in row
    ``i``, or the last column when ``i`` was not retrieved (e.g. duplicates outranked it).
    """
    self_idx = torch.arange(len(indices), device=indices.device)
    is_self = indices == self_idx[:, None]
    # only the first occurrence counts (an index appears once per row anyway)
    missing = ~is_self.any(dim=1)
    is_self[missing, -1] = True
    keep = ~is_self
    shape = (indices.shape[0], indices.shape[1] - 1)
    return scores[keep].view(shape), indices[keep].view(shape)
