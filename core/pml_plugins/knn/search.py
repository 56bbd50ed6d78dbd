"""The one-call search: :func:`knn_search`."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .index import KNNIndex
from .options import KNNOptions, as_tensor, check_k

__all__ = ["knn_search", "check_inputs"]


def check_inputs(query: Any, reference: Any, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``query`` and ``reference`` as 2-D tensors of one dimension, ``1 <= k <= len(reference)``."""
    query = as_tensor(query, "query")
    reference = as_tensor(reference, "reference")
    if query.ndim != 2 or reference.ndim != 2:
        raise ValueError(
            f"query and reference must be 2-D (n, dim), got shapes {tuple(query.shape)} and {tuple(reference.shape)}"
        )
    if query.shape[1] != reference.shape[1]:
        raise ValueError(
            f"query and reference must have the same dimension, got {query.shape[1]} and {reference.shape[1]}"
        )
    check_k(k, len(reference))
    return query, reference


@torch.no_grad()
def knn_search(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    *,
    metric: str = "cosine",
    index: str = "flat",
    backend: str = "auto",
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    index_params: Mapping[str, Any] | None = None,
    shard: bool | None = None,
    progress: bool | None = None,
    options: KNNOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest references of every query.

    Args:
        query: ``(Q, D)`` tensor or array.
        reference: ``(N, D)`` tensor or array.
        k: neighbours per query, ``1 <= k <= N``.
        metric: ``"cosine"`` (default; similarities of L2-normalised vectors, sorted
            descending), ``"inner_product"`` (descending) or ``"euclidean"`` (L2 distances,
            not squared, sorted ascending).
        index: ``"flat"`` (exact, default), or FAISS's approximate ``"ivf"`` / ``"hnsw"`` /
            ``"pq"`` (4-bit PQ fast scan of every reference, candidates re-ranked exactly).
        backend: ``"auto"`` (FAISS when installed, except for CUDA inputs without FAISS GPU
            support, which stay on the GPU with torch), ``"faiss"`` or ``"torch"``.
        device: where the search runs (default: the query's device). CUDA with a GPU-enabled
            FAISS runs FAISS on the GPU(s).
        chunk_size: queries per block (default: torch path, as many as keep a block of scores
            under 2**25 elements; FAISS path, at most 2**20 results per call).
        index_params: options of the approximate indexes (``INDEX_PARAMS``): ``nlist``
            (default ``4 * sqrt(N)``), ``nprobe`` (16), ``train_size`` (``min(N, 64 nlist)``
            random rows for k-means), ``niter`` (10), ``seed`` (0) for ``ivf``; ``M`` (32),
            ``ef_search`` (max(64, 2k)) and ``ef_construction`` (40) for ``hnsw``; ``m``
            (``dim / 2``), ``k_factor`` (16), ``train_size`` (``min(N, 65536)``), ``seed`` (0)
            for ``pq``.
        shard: with several GPUs, split the index over them (None: yes; see ``faiss_placement``).
        progress: tqdm bar (None: for searches of several blocks, on a terminal only).
        options: a :class:`~pml_plugins.knn.KNNOptions` instead of the keyword arguments above.

    Returns:
        ``(scores, indices)``: ``(Q, k)`` float32 and int64 tensors on the query's device,
        without gradient. Ties: FAISS's flat indexes put the smaller reference index first
        among equal L2 distances and the larger first among equal inner products; the torch
        search (``torch.topk``) orders ties arbitrarily. Approximate indexes pad rows with
        fewer than ``k`` candidates with index -1.
    """
    if options is None:
        options = KNNOptions(
            metric=metric,
            index=index,
            backend=backend,
            device=device,
            chunk_size=chunk_size,
            index_params=index_params or {},
            shard=shard,
            progress=progress,
        )
    query, reference = check_inputs(query, reference, k)
    if options.device is None:
        options = options.replace(device=query.device)
    built = KNNIndex(reference, options=options, k_hint=k)
    return built.search(query, k, chunk_size=options.chunk_size, progress=options.progress)
