"""The kNN layer's options: names, limits, and :class:`KNNOptions`, validated once.

Every entry point (:class:`~pml_plugins.knn.KNNIndex`, :func:`~pml_plugins.knn.knn_search`,
:class:`~pml_plugins.knn.KNN`) builds one :class:`KNNOptions`; its ``__post_init__`` is the
only place where ``metric``, ``index``, ``backend``, ``index_params``, ``shard``, ...
are checked. This module is a leaf: it imports nothing else of the package.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
import torch

__all__ = [
    "KNNOptions",
    "METRICS",
    "INDEXES",
    "BACKENDS",
    "INDEX_PARAMS",
    "PLACEMENTS",
    "GPU_INDEXES",
    "GPU_MAX_K",
    "SYMMETRIC_MIN_ROWS",
    "SYMMETRIC_MIN_DIM",
    "check_index_params",
    "check_int",
    "check_k",
    "as_tensor",
    "search_rows",
]

#: ``cosine``: similarity of L2-normalised vectors (descending); ``inner_product``: raw dot
#: product (descending); ``euclidean``: L2 distance, not squared (ascending).
METRICS = ("cosine", "inner_product", "euclidean")
#: ``flat`` is exact; ``ivf``, ``hnsw`` and ``pq`` are FAISS's approximate indexes (FAISS only).
INDEXES = ("flat", "ivf", "hnsw", "pq")
BACKENDS = ("auto", "faiss", "torch")
#: The ``index_params`` each index accepts (all integers; ``train_size`` may be None = all rows):
#: ``nlist`` cells (default ``4 sqrt(N)``, at most N / 39), ``nprobe`` cells searched (16),
#: ``train_size`` rows of the random k-means training sample (``min(N, 64 nlist)``), ``niter``
#: k-means iterations (10), ``seed`` of sample and k-means (0); HNSW: ``M`` links per node (32),
#: ``ef_search`` (``max(64, 2k)``, at least k), ``ef_construction`` (FAISS's 40); PQ: ``m``
#: sub-quantizers of 4 bits (``dim / 2``; must divide ``dim``), ``k_factor`` candidates re-ranked
#: exactly per neighbour (16), ``train_size`` rows of the PQ training sample (``min(N, 65536)``),
#: ``seed`` of that sample (0).
INDEX_PARAMS: dict[str, tuple[str, ...]] = {
    "flat": (),
    "ivf": ("nlist", "nprobe", "train_size", "niter", "seed"),
    "hnsw": ("M", "ef_search", "ef_construction"),
    "pq": ("m", "k_factor", "train_size", "seed"),
}
#: FAISS has GPU versions of these indexes only (``hnsw`` and ``pq`` fast scan run on the CPU).
GPU_INDEXES = ("flat", "ivf")
#: Where a search runs: ``torch`` (exact torch search, on the run device), ``cpu`` (FAISS CPU
#: index), ``gpu`` (FAISS index on the inputs' GPU), ``gpu_sharded`` (FAISS index split over all GPUs).
PLACEMENTS = ("torch", "cpu", "gpu", "gpu_sharded")
#: ``KNN(symmetric=None)`` searches a set against itself pair by pair once from this many rows
#: and dimensions on; below them FAISS's flat search was as fast on 2 cores (the GEMM saved is
#: then small next to the top-k selection): 32,768 x 512 1.07x, 40,000 x 256 1.07x,
#: 40,000 x 384 1.38x, 60,502 x 512 1.4-1.5x, 60,000 x 128 1.11x, 8,192 x 512 0.48x.
SYMMETRIC_MIN_ROWS = 32768
SYMMETRIC_MIN_DIM = 256
#: FAISS GPU indexes return at most this many neighbours (and probe at most this many IVF cells).
GPU_MAX_K = 2048


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> int | None:
    """``value`` as an int >= ``minimum`` (None passes when ``allow_none``); errors name ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{name} must be an int{' or None' if allow_none else ''}, got {type(value).__name__} {value!r}"
        )
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_k(k: Any, n: int) -> int:
    """``k`` as an int in ``[1, n]`` (``n`` references)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, len(reference)] = [1, {n}], got {k}")
    return int(k)


def check_index_params(index: str, index_params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate the ``index_params`` of ``index`` (names and values) before any work is done.

    Args:
        index: one of :data:`INDEXES`.
        index_params: a mapping of the names in :data:`INDEX_PARAMS` ``[index]`` to ints.

    Returns:
        A plain dict copy of the parameters.

    Raises:
        ValueError: unknown index, a name the index does not take (the message names it and
            lists the known ones), or a value out of range.
        TypeError: ``index_params`` not a mapping, or a value not an int.
    """
    if index not in INDEXES:
        raise ValueError(f"index must be one of {INDEXES}, got {index!r}")
    if index_params is None:
        return {}
    if not isinstance(index_params, Mapping):
        raise TypeError(f"index_params must be a mapping (e.g. {{'nlist': 1024}}), got {type(index_params).__name__}")
    params = dict(index_params)
    known = INDEX_PARAMS[index]
    unknown = [name for name in params if name not in known]
    if unknown:
        raise ValueError(
            f"unknown index_params for index={index!r}: {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(known) if known else 'none, the flat index takes no parameters'})"
        )
    for name, value in params.items():
        minimum = 0 if name == "seed" else 1
        params[name] = check_int(f"index_params[{name!r}]", value, minimum, allow_none=name == "train_size")
    return params


def _check_optional_bool(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be None or a bool, got {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class KNNOptions:
    """How a kNN search runs; checked once, when built (a bad value raises here, before any work).

    Attributes:
        metric: one of :data:`METRICS`.
        index: one of :data:`INDEXES`.
        backend: one of :data:`BACKENDS`.
        device: where the search runs (None: the inputs' device).
        chunk_size: queries per search block (None: automatic), >= 1.
        index_params: the approximate index's parameters (:data:`INDEX_PARAMS`), validated.
        shard: None / True / False: split a GPU index over all GPUs (see ``faiss_placement``).
        progress: tqdm bars (None: on a terminal, for long work).
        symmetric: ``KNN``'s leave-one-out self-search choice (None: automatic).
    """

    metric: str = "cosine"
    index: str = "flat"
    backend: str = "auto"
    device: str | torch.device | None = None
    chunk_size: int | None = None
    index_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    shard: bool | None = None
    progress: bool | None = None
    symmetric: bool | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.index not in INDEXES:
            raise ValueError(f"index must be one of {INDEXES}, got {self.index!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.chunk_size is not None:
            check_int("chunk_size", self.chunk_size, 1)
        _check_optional_bool("shard", self.shard)
        _check_optional_bool("symmetric", self.symmetric)
        # frozen: the validated copy replaces what was passed (object.__setattr__ is the dataclass idiom)
        object.__setattr__(self, "index_params", check_index_params(self.index, self.index_params))
        if self.device is not None:
            object.__setattr__(self, "device", torch.device(self.device))
        if self.shard and self.backend == "torch":
            raise ValueError("shard=True shards a FAISS index; backend='torch' cannot shard")

    def replace(self, **changes: Any) -> KNNOptions:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """``x`` as a detached tensor of real numbers (numpy arrays and sequences are converted)."""
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


def search_rows(x: torch.Tensor, metric: str, device: str | torch.device) -> torch.Tensor:
    """Rows as searched: float32 on ``device``, without gradient, L2-normalised for cosine."""
    x = x.detach().to(device, torch.float32)
    return torch.nn.functional.normalize(x, dim=1) if metric == "cosine" else x
