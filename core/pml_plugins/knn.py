"""The project's one k-nearest-neighbour layer.

:func:`knn_search` is the single entry point: FAISS (exact flat index by default) when it is
installed, an exact chunked torch search otherwise. :class:`KNN` wraps it as a
``knn_func`` for PML's ``AccuracyCalculator`` / ``InferenceModel`` (same call signature as
PML's ``FaissKNN``), so the whole toolkit searches neighbours one way.

Memory of the torch path is bounded by searching ``chunk_size`` queries at a time (a
``chunk_size x len(reference)`` score block), never a full N x N matrix.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

__all__ = ["knn_search", "KNN", "faiss_available", "METRICS", "INDEXES", "BACKENDS"]

#: ``cosine``: similarity of L2-normalised vectors (descending); ``inner_product``: raw dot
#: product (descending); ``euclidean``: L2 distance, not squared (ascending).
METRICS = ("cosine", "inner_product", "euclidean")
#: ``flat`` is exact; ``ivf`` and ``hnsw`` are FAISS's approximate indexes (FAISS only).
INDEXES = ("flat", "ivf", "hnsw")
BACKENDS = ("auto", "faiss", "torch")

# Score-block budget of the torch path, in elements (128 MiB of float32).
_DEFAULT_BLOCK_ELEMENTS = 2**25


def _import_faiss() -> Any:
    """FAISS, or None when it is not installed (or fails to import)."""
    try:
        import faiss  # noqa: PLC0415
    except Exception:  # ImportError, or a broken binary wheel: both mean "use torch"
        return None
    return faiss


def faiss_available() -> bool:
    """Whether FAISS can be imported in this environment."""
    return _import_faiss() is not None


def _check_inputs(query: Any, reference: Any, k: int, metric: str, index: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    query = _as_tensor(query, "query")
    reference = _as_tensor(reference, "reference")
    if query.ndim != 2 or reference.ndim != 2:
        raise ValueError(f"query and reference must be 2-D (n, dim), got shapes {tuple(query.shape)} and {tuple(reference.shape)}")
    if query.shape[1] != reference.shape[1]:
        raise ValueError(f"query and reference must have the same dimension, got {query.shape[1]} and {reference.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= len(reference):
        raise ValueError(f"k must be in [1, len(reference)] = [1, {len(reference)}], got {k}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if index not in INDEXES:
        raise ValueError(f"index must be one of {INDEXES}, got {index!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return query, reference


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(x)
        except Exception as exc:
            raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}") from exc
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    return t.detach()


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest references of every query.

    Args:
        query: ``(Q, D)`` tensor or array.
        reference: ``(N, D)`` tensor or array.
        k: neighbours per query, ``1 <= k <= N``.
        metric: ``"cosine"`` (default; similarities of L2-normalised vectors, sorted
            descending), ``"inner_product"`` (descending) or ``"euclidean"`` (L2 distances,
            not squared, sorted ascending).
        index: ``"flat"`` (exact, default), or FAISS's approximate ``"ivf"`` / ``"hnsw"``.
        backend: ``"auto"`` (FAISS when installed, except for CUDA inputs without FAISS GPU
            support, which stay on the GPU with torch), ``"faiss"`` or ``"torch"``.
        device: where the torch search runs (default: the query's device).
        chunk_size: queries per block of the torch search (default: as many as keep a block
            of scores under 2**25 elements).
        index_params: options of the approximate indexes: ``nlist`` (default ``4 * sqrt(N)``)
            and ``nprobe`` (default 16) for ``ivf``; ``M`` (32) and ``ef_search`` (max(64, 2k))
            for ``hnsw``.

    Returns:
        ``(scores, indices)``: ``(Q, k)`` float32 and int64 tensors on the query's device,
        without gradient. Ties are broken by the backend (FAISS and torch may order tied
        references differently).
    """
    query, reference = _check_inputs(query, reference, k, metric, index, backend)
    out_device = query.device
    faiss = None if backend == "torch" else _import_faiss()
    if backend == "faiss" and faiss is None:
        raise ImportError("backend='faiss' needs FAISS: pip install faiss-cpu (or faiss-gpu-cu12)")
    if index != "flat" and faiss is None:
        raise ImportError(f"index={index!r} needs FAISS (pip install faiss-cpu); the torch backend is exact ('flat') only")
    run_device = torch.device(device) if device is not None else query.device
    use_faiss = faiss is not None and (
        backend == "faiss" or index != "flat" or run_device.type == "cpu" or _faiss_has_gpu(faiss)
    )
    q = query.to(run_device, torch.float32)
    r = reference.to(run_device, torch.float32)
    if metric == "cosine":
        q = torch.nn.functional.normalize(q, dim=1)
        r = torch.nn.functional.normalize(r, dim=1)
    if use_faiss:
        scores, indices = _faiss_search(faiss, q, r, k, metric, index, dict(index_params or {}))
    else:
        scores, indices = _torch_search(q, r, k, metric, chunk_size)
    return scores.to(out_device), indices.to(out_device)


def _faiss_has_gpu(faiss: Any) -> bool:
    try:
        return faiss.get_num_gpus() > 0
    except Exception:
        return False


def _torch_search(q: torch.Tensor, r: torch.Tensor, k: int, metric: str, chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(r)
    if chunk_size is None:
        chunk_size = max(1, _DEFAULT_BLOCK_ELEMENTS // max(n, 1))
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scores = torch.empty(len(q), k, dtype=torch.float32, device=q.device)
    indices = torch.empty(len(q), k, dtype=torch.int64, device=q.device)
    euclidean = metric == "euclidean"
    minus_r_sq = -(r * r).sum(1)[None, :] if euclidean else None
    for start in range(0, len(q), chunk_size):  # loop over query blocks: bounds memory
        block = q[start:start + chunk_size]
        if euclidean:
            # ||q - r||^2 = |q|^2 - (2 q.r - |r|^2): rank on the bracket, built inside the GEMM
            # (one pass over the block), and form distances only for the k kept
            score = torch.addmm(minus_r_sq, block, r.T, alpha=2)
            values, idx = torch.topk(score, k, dim=1, largest=True)
            values = ((block * block).sum(1, keepdim=True) - values).clamp_min_(0).sqrt_()
        else:
            values, idx = torch.topk(block @ r.T, k, dim=1, largest=True)
        scores[start:start + len(block)] = values
        indices[start:start + len(block)] = idx
    return scores, indices


def _faiss_search(faiss: Any, q: torch.Tensor, r: torch.Tensor, k: int, metric: str, index: str,
                  params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np  # noqa: PLC0415

    d = q.shape[1]
    q_np = np.ascontiguousarray(q.cpu().numpy(), dtype=np.float32)
    r_np = np.ascontiguousarray(r.cpu().numpy(), dtype=np.float32)
    faiss_metric = faiss.METRIC_L2 if metric == "euclidean" else faiss.METRIC_INNER_PRODUCT
    if index == "flat":
        idx = faiss.IndexFlatL2(d) if metric == "euclidean" else faiss.IndexFlatIP(d)
    elif index == "ivf":
        nlist = int(params.pop("nlist", max(1, min(len(r_np) // 39, int(4 * math.sqrt(len(r_np)))))))
        nprobe = int(params.pop("nprobe", 16))
        quantizer = faiss.IndexFlatL2(d) if metric == "euclidean" else faiss.IndexFlatIP(d)
        idx = faiss.IndexIVFFlat(quantizer, d, nlist, faiss_metric)
        idx.train(r_np)
        idx.nprobe = min(nprobe, nlist)
    else:  # hnsw
        m = int(params.pop("M", 32))
        idx = faiss.IndexHNSWFlat(d, m, faiss_metric)
        idx.hnsw.efSearch = int(params.pop("ef_search", max(64, 2 * k)))
        if "ef_construction" in params:
            idx.hnsw.efConstruction = int(params.pop("ef_construction"))
    if params:
        raise ValueError(f"unknown index_params for index={index!r}: {sorted(params)}")
    if q.is_cuda and _faiss_has_gpu(faiss) and index == "flat":
        idx = faiss.index_cpu_to_all_gpus(idx)
    idx.add(r_np)
    distances, indices = idx.search(q_np, k)
    scores = torch.from_numpy(np.asarray(distances, dtype=np.float32))
    indices = torch.from_numpy(np.asarray(indices, dtype=np.int64))
    if metric == "euclidean":
        scores = scores.clamp_min_(0).sqrt_()  # FAISS's L2 index reports squared distances
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


class KNN:
    """A PML ``knn_func`` built on :func:`knn_search`: a drop-in for PML's ``FaissKNN``.

    ``KNN()(query, k, reference, ref_includes_query)`` returns ``(distances, indices)`` of the
    ``k`` nearest references like PML's ``FaissKNN`` / ``CustomKNN``; with
    ``ref_includes_query`` it searches ``k + 1`` and removes each query's own match exactly as
    PML does. Unlike ``FaissKNN`` it works without FAISS (exact torch search) and supports
    cosine similarity.

    Args:
        metric: ``"euclidean"`` (default, the ranking of PML's default ``FaissKNN``;
            distances are returned unsquared), ``"cosine"`` or ``"inner_product"``.
        index, backend, device, chunk_size, index_params: as in :func:`knn_search`.

    ``train(embeddings)`` / ``add(embeddings)`` / ``reset()`` keep a stored reference set for
    calls with ``reference=None`` (as PML's ``InferenceModel`` uses them).
    """

    def __init__(
        self,
        metric: str = "euclidean",
        *,
        index: str = "flat",
        backend: str = "auto",
        device: str | torch.device | None = None,
        chunk_size: int | None = None,
        index_params: Mapping[str, Any] | None = None,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if index not in INDEXES:
            raise ValueError(f"index must be one of {INDEXES}, got {index!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.metric = metric
        self.index = index
        self.backend = backend
        self.device = device
        self.chunk_size = chunk_size
        self.index_params = dict(index_params or {})
        self.reference: torch.Tensor | None = None

    @property
    def is_inverted(self) -> bool:
        """Like PML distances: True when larger scores mean closer (similarities)."""
        return self.metric != "euclidean"

    def __call__(
        self,
        query: torch.Tensor,
        k: int,
        reference: torch.Tensor | None = None,
        ref_includes_query: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if reference is None:
            if self.reference is None:
                raise ValueError("no reference given and none stored: pass reference=... or call train()/add() first")
            reference = self.reference
        if ref_includes_query:
            k = k + 1
        scores, indices = knn_search(
            query, reference, k, metric=self.metric, index=self.index, backend=self.backend,
            device=self.device, chunk_size=self.chunk_size, index_params=self.index_params,
        )
        if ref_includes_query:
            scores, indices = drop_self_matches(scores, indices)
        return scores, indices

    def train(self, embeddings: torch.Tensor) -> None:
        """Replace the stored reference set."""
        self.reference = _as_tensor(embeddings, "embeddings").float()

    def add(self, embeddings: torch.Tensor) -> None:
        """Append to the stored reference set."""
        emb = _as_tensor(embeddings, "embeddings").float()
        self.reference = emb if self.reference is None else torch.cat([self.reference, emb.to(self.reference.device)])

    def reset(self) -> None:
        self.reference = None

    def __repr__(self) -> str:
        return f"KNN(metric={self.metric!r}, index={self.index!r}, backend={self.backend!r})"
