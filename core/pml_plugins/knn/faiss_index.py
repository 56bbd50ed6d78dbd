"""FAISS discovery and placement: whether FAISS is there, how many GPUs it sees, where an index runs."""

from __future__ import annotations

import math
from typing import Any

from .options import GPU_INDEXES, GPU_MAX_K, INDEXES, check_int

__all__ = ["import_faiss", "faiss_available", "faiss_num_gpus", "faiss_placement", "default_nlist"]


def import_faiss() -> Any:
    """The ``faiss`` module, or None when it is not installed (or fails to import)."""
    try:
        import faiss
    except Exception:  # ImportError, or a broken binary wheel: both mean "use torch"
        return None
    return faiss


def faiss_available() -> bool:
    """Whether FAISS can be imported in this environment."""
    return import_faiss() is not None


def faiss_num_gpus(faiss: Any = None) -> int:
    """GPUs FAISS can use: ``faiss.get_num_gpus()``, 0 for a CPU-only FAISS or none installed.

    Args:
        faiss: an imported FAISS module to ask (default: import it).
    """
    faiss = import_faiss() if faiss is None else faiss
    if faiss is None:
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # faiss-cpu builds without the symbol, or a broken CUDA runtime
        return 0


def default_nlist(n: int) -> int:
    """IVF cells for ``n`` references: ``4 sqrt(n)``, but at least 39 rows per cell (FAISS's minimum)."""
    return max(1, min(n // 39, int(4 * math.sqrt(n))))


def faiss_placement(
    index: str, device_type: str, num_gpus: int, shard: bool | None = None, k: int | None = None
) -> str:
    """Where FAISS runs: ``"cpu"``, ``"gpu"`` (the inputs' GPU) or ``"gpu_sharded"`` (all GPUs).

    The decision, without touching FAISS (``num_gpus`` is ``faiss.get_num_gpus()``):

    * CPU inputs and device, or a FAISS without GPUs (``num_gpus == 0``): ``"cpu"``;
    * ``index="hnsw"`` or ``"pq"``: ``"cpu"`` (FAISS has no GPU HNSW or PQ fast scan);
    * ``k > GPU_MAX_K`` (FAISS GPU's largest k): ``"cpu"``;
    * one GPU, or ``shard=False``: ``"gpu"``;
    * several GPUs and ``shard`` None (default) or True: ``"gpu_sharded"``: the references are
      split over the GPUs (each holds 1/n of them), every query searched on each, results merged.

    Args:
        index: one of :data:`~pml_plugins.knn.INDEXES`.
        device_type: ``"cuda"`` when the inputs (or the requested ``device``) are on a GPU.
        num_gpus: GPUs visible to FAISS.
        shard: None (shard when there are several GPUs), True (insist), False (one GPU).
        k: neighbours to be searched, when known.

    Raises:
        ValueError: ``shard=True`` where sharding cannot happen (CPU device, no FAISS GPU, HNSW, PQ).
    """
    if index not in INDEXES:
        raise ValueError(f"index must be one of {INDEXES}, got {index!r}")
    if shard is not None and not isinstance(shard, bool):
        raise TypeError(f"shard must be None or a bool, got {type(shard).__name__}")
    num_gpus = check_int("num_gpus", num_gpus, 0)
    if shard:
        if device_type != "cuda":
            raise ValueError("shard=True shards a FAISS index over GPUs: pass device='cuda' (or CUDA tensors)")
        if num_gpus == 0:
            raise ValueError(
                "shard=True needs FAISS with GPU support and a visible GPU (faiss.get_num_gpus() == 0); "
                "pip install 'pml-plugins[gpu]'"
            )
        if index not in GPU_INDEXES:
            raise ValueError(f"shard=True: FAISS has no GPU version of index={index!r}; use index='flat' or 'ivf'")
    if device_type != "cuda" or num_gpus == 0 or index not in GPU_INDEXES:
        return "cpu"
    if k is not None and k > GPU_MAX_K:
        return "cpu"
    if num_gpus == 1 or shard is False:
        return "gpu"
    return "gpu_sharded"
