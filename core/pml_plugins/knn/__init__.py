"""The project's one k-nearest-neighbour layer.

:func:`knn_search` is the single entry point: FAISS (exact flat index by default) when it is
installed, an exact chunked torch search otherwise. :class:`KNNIndex` is the same search with
the index built once and searched many times (DMCAC's training database, PML's
``InferenceModel``). :class:`KNN` wraps it as a ``knn_func`` for PML's ``AccuracyCalculator`` /
``InferenceModel`` (a drop-in for PML's ``FaissKNN``: same call, same constructor arguments
``reset_before`` / ``reset_after`` / ``index_init_fn`` / ``gpus``, and ``.index``), so the
whole toolkit searches neighbours one way. :class:`KNNOptions` holds the options of all three,
validated once.

Scale:

* exact (``index="flat"``) or approximate (``"ivf"``, ``"hnsw"``, ``"pq"``) FAISS indexes with
  user-set parameters (:data:`INDEX_PARAMS`); IVF is trained on a random subsample of at most
  ``train_size`` rows (default ``min(N, 64 * nlist)``), so building on millions of rows is fast;
  ``pq`` scans 4-bit product-quantization codes of every reference (FAISS's SIMD "fast scan")
  and re-ranks the best ``k_factor * k`` exactly, which keeps recall high on data whose
  neighbours ignore cluster boundaries (where IVF needs to probe most cells);
* on the GPU when the inputs are CUDA tensors (or ``device="cuda"``) and FAISS has GPU
  support, sharded over all visible GPUs (``faiss.index_cpu_to_all_gpus`` with
  ``GpuMultipleClonerOptions.shard = True``) when there is more than one; see
  :func:`faiss_placement`;
* memory bounded in both paths by searching the queries in blocks: the torch path scores
  ``chunk_size x len(reference)`` at a time (never an N x N matrix), the FAISS path searches
  ``chunk_size`` queries per call (FAISS tiles its own distance computations), with a tqdm bar
  for searches of several blocks (hidden when not on a terminal).

Modules: ``options`` (names, limits, :class:`KNNOptions`), ``faiss_index`` (FAISS discovery
and placement), ``index`` (:class:`KNNIndex`), ``torch_search``, ``self_search`` (the
symmetric leave-one-out search), ``search`` (:func:`knn_search`), ``knn_func`` (:class:`KNN`),
``progress`` (tqdm bars).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

from .faiss_index import default_nlist, faiss_available, faiss_num_gpus, faiss_placement, import_faiss
from .index import KNNIndex
from .knn_func import KNN
from .options import (
    BACKENDS,
    GPU_INDEXES,
    GPU_MAX_K,
    INDEX_PARAMS,
    INDEXES,
    METRICS,
    PLACEMENTS,
    SYMMETRIC_MIN_DIM,
    SYMMETRIC_MIN_ROWS,
    KNNOptions,
    check_index_params,
)
from .search import knn_search
from .torch_search import drop_self_matches

__all__ = [
    "knn_search",
    "KNN",
    "KNNIndex",
    "KNNOptions",
    "faiss_available",
    "faiss_num_gpus",
    "faiss_placement",
    "import_faiss",
    "default_nlist",
    "drop_self_matches",
    "check_index_params",
    "parse_index_params",
    "METRICS",
    "INDEXES",
    "BACKENDS",
    "INDEX_PARAMS",
    "PLACEMENTS",
    "GPU_MAX_K",
    "GPU_INDEXES",
    "SYMMETRIC_MIN_ROWS",
    "SYMMETRIC_MIN_DIM",
]


def parse_index_params(items: Iterable[str]) -> dict[str, Any]:
    """Deprecated: moved to ``pml_plugins.cli.knn_params.parse_index_params`` (the CLI's parser)."""
    warnings.warn(
        "pml_plugins.knn.parse_index_params moved to pml_plugins.cli.knn_params.parse_index_params",
        DeprecationWarning,
        stacklevel=2,
    )
    from ..cli.knn_params import parse_index_params as parse

    return parse(items)
