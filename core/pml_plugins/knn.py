"""The project's one k-nearest-neighbour layer.

:func:`knn_search` is the single entry point: FAISS (exact flat index by default) when it is
installed, an exact chunked torch search otherwise. :class:`KNNIndex` is the same search with
the index built once and searched many times (DMCAC's training database, PML's
``InferenceModel``). :class:`KNN` wraps it as a ``knn_func`` for PML's ``AccuracyCalculator`` /
``InferenceModel`` (same call signature as PML's ``FaissKNN``), so the whole toolkit searches
neighbours one way.

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
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import tqdm

__all__ = [
    "knn_search", "KNN", "KNNIndex", "faiss_available", "faiss_num_gpus", "faiss_placement",
    "check_index_params", "parse_index_params", "METRICS", "INDEXES", "BACKENDS", "INDEX_PARAMS",
    "PLACEMENTS", "GPU_MAX_K", "GPU_INDEXES", "SYMMETRIC_MIN_ROWS", "SYMMETRIC_MIN_DIM",
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
_PQ_TRAIN_SIZE = 65536  # 16 centroids per sub-quantizer: a few thousand rows per centroid is plenty
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

# Score-block budget of the torch path, in elements (128 MiB of float32).
_DEFAULT_BLOCK_ELEMENTS = 2**25
# Result-block budget of the FAISS path, in (query, neighbour) entries per search call.
_DEFAULT_FAISS_RESULTS = 2**20
_ADD_BLOCK = 65536  # reference rows per FAISS add() call (progress, bounded GPU staging memory)


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


def faiss_num_gpus() -> int:
    """GPUs FAISS can use: ``faiss.get_num_gpus()``, 0 for a CPU-only FAISS or none installed."""
    return _faiss_num_gpus(_import_faiss())


def _faiss_num_gpus(faiss: Any) -> int:
    if faiss is None:
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # faiss-cpu builds without the symbol, or a broken CUDA runtime
        return 0


def _faiss_has_gpu(faiss: Any) -> bool:
    return _faiss_num_gpus(faiss) > 0


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def default_nlist(n: int) -> int:
    """IVF cells for ``n`` references: ``4 sqrt(n)``, but at least 39 rows per cell (FAISS's minimum)."""
    return max(1, min(n // 39, int(4 * math.sqrt(n))))


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
        raise ValueError(f"unknown index_params for index={index!r}: {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(known) if known else 'none, the flat index takes no parameters'})")
    for name, value in params.items():
        minimum = 0 if name == "seed" else 1
        params[name] = _check_int(f"index_params[{name!r}]", value, minimum, allow_none=name == "train_size")
    return params


def parse_index_params(items: Iterable[str]) -> dict[str, Any]:
    """``["nlist=4096", "nprobe=32"]`` -> ``{"nlist": 4096, "nprobe": 32}`` (the CLI's ``--knn-param``).

    Values are ints; ``none`` is None (``train_size=none``: train on every row).

    Raises:
        ValueError: an item without ``=`` or with a value that is not an int (the item is named).
    """
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            raise ValueError(f"kNN index parameter {item!r} must be NAME=VALUE, e.g. nprobe=32")
        if value.lower() == "none":
            out[name] = None
            continue
        try:
            out[name] = int(value)
        except ValueError:
            raise ValueError(f"kNN index parameter {name!r} must be an integer, got {value!r}") from None
    return out


def faiss_placement(index: str, device_type: str, num_gpus: int, shard: bool | None = None,
                    k: int | None = None) -> str:
    """Where FAISS runs: ``"cpu"``, ``"gpu"`` (the inputs' GPU) or ``"gpu_sharded"`` (all GPUs).

    The decision, without touching FAISS (``num_gpus`` is ``faiss.get_num_gpus()``):

    * CPU inputs and device, or a FAISS without GPUs (``num_gpus == 0``): ``"cpu"``;
    * ``index="hnsw"`` or ``"pq"``: ``"cpu"`` (FAISS has no GPU HNSW or PQ fast scan);
    * ``k > GPU_MAX_K`` (FAISS GPU's largest k): ``"cpu"``;
    * one GPU, or ``shard=False``: ``"gpu"``;
    * several GPUs and ``shard`` None (default) or True: ``"gpu_sharded"``: the references are
      split over the GPUs (each holds 1/n of them), every query searched on each, results merged.

    Args:
        index: one of :data:`INDEXES`.
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
    num_gpus = _check_int("num_gpus", num_gpus, 0)
    if shard:
        if device_type != "cuda":
            raise ValueError("shard=True shards a FAISS index over GPUs: pass device='cuda' (or CUDA tensors)")
        if num_gpus == 0:
            raise ValueError("shard=True needs FAISS with GPU support and a visible GPU (faiss.get_num_gpus() == 0); "
                             "pip install 'pml-plugins[gpu]'")
        if index not in GPU_INDEXES:
            raise ValueError(f"shard=True: FAISS has no GPU version of index={index!r}; use index='flat' or 'ivf'")
    if device_type != "cuda" or num_gpus == 0 or index not in GPU_INDEXES:
        return "cpu"
    if k is not None and k > GPU_MAX_K:
        return "cpu"
    if num_gpus == 1 or shard is False:
        return "gpu"
    return "gpu_sharded"


def _check_inputs(query: Any, reference: Any, k: int, metric: str, index: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    query = _as_tensor(query, "query")
    reference = _as_tensor(reference, "reference")
    if query.ndim != 2 or reference.ndim != 2:
        raise ValueError(f"query and reference must be 2-D (n, dim), got shapes {tuple(query.shape)} and {tuple(reference.shape)}")
    if query.shape[1] != reference.shape[1]:
        raise ValueError(f"query and reference must have the same dimension, got {query.shape[1]} and {reference.shape[1]}")
    _check_k(k, len(reference))
    _check_options(metric, index, backend)
    return query, reference


def _check_k(k: Any, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, len(reference)] = [1, {n}], got {k}")


def _check_options(metric: str, index: str, backend: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if index not in INDEXES:
        raise ValueError(f"index must be one of {INDEXES}, got {index!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is not None:
        _check_int("chunk_size", chunk_size, 1)


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


def _search_rows(x: torch.Tensor, metric: str, device: str | torch.device) -> torch.Tensor:
    """Rows as searched: float32 on ``device``, without gradient, L2-normalised for cosine."""
    x = x.detach().to(device, torch.float32)
    return torch.nn.functional.normalize(x, dim=1) if metric == "cosine" else x


def _bar(total: int, blocks: int, progress: bool | None, desc: str) -> tqdm.tqdm:
    # None: a bar only for searches of several blocks, and only on a terminal (tqdm's disable=None)
    disable = (not progress) if progress is not None else (None if blocks > 1 else True)
    return tqdm.tqdm(total=total, desc=desc, unit="query", disable=disable, leave=False, dynamic_ncols=True)


class KNNIndex:
    """A reference set indexed once, searched many times: the object behind :func:`knn_search`.

    ``KNNIndex(reference, metric=..., index=...)`` builds the index (FAISS flat / IVF / HNSW / PQ,
    on CPU, one GPU or sharded over all GPUs; or the exact torch search);
    ``search(query, k)`` returns ``(scores, indices)`` exactly as :func:`knn_search`, searching
    the queries in blocks.

    Args:
        reference: ``(N, D)`` tensor or array.
        metric, index, backend, index_params: as in :func:`knn_search`.
        device: where the search runs (default: the reference's device). CUDA with a
            GPU-enabled FAISS puts the index on the GPU(s) (see :func:`faiss_placement`).
        shard: None (default: shard over the GPUs when there are several), True, False.
        progress: tqdm bar while adding many rows (None: on a terminal, for big builds).
        k_hint: the largest k that will be searched (an index that would not support it on
            the GPU is kept on the CPU).

    Attributes:
        placement: one of :data:`PLACEMENTS`.
        params: the resolved index parameters (``nlist``, ``nprobe``, ``train_size``, ...).
        faiss_index: the FAISS index (None for the torch search).
        ntotal: number of references.
    """

    def __init__(
        self,
        reference: Any,
        *,
        metric: str = "cosine",
        index: str = "flat",
        backend: str = "auto",
        device: str | torch.device | None = None,
        shard: bool | None = None,
        index_params: Mapping[str, Any] | None = None,
        progress: bool | None = None,
        k_hint: int | None = None,
    ) -> None:
        _check_options(metric, index, backend)
        params = check_index_params(index, index_params)
        if shard is not None and not isinstance(shard, bool):
            raise TypeError(f"shard must be None or a bool, got {type(shard).__name__}")
        reference = _as_tensor(reference, "reference")
        if reference.ndim != 2 or len(reference) == 0:
            raise ValueError(f"reference must be 2-D (n, dim) with n >= 1, got shape {tuple(reference.shape)}")
        faiss = None if backend == "torch" else _import_faiss()
        if backend == "faiss" and faiss is None:
            raise ImportError("backend='faiss' needs FAISS: pip install faiss-cpu (or faiss-gpu-cu12)")
        if index != "flat" and faiss is None:
            raise ImportError(f"index={index!r} needs FAISS (pip install faiss-cpu); the torch backend is exact ('flat') only")
        run_device = torch.device(device) if device is not None else reference.device
        num_gpus = _faiss_num_gpus(faiss)
        if shard:  # explicit sharding that cannot happen is an error, before any work
            if backend == "torch":
                raise ValueError("shard=True shards a FAISS index; backend='torch' cannot shard")
            faiss_placement(index, run_device.type, num_gpus, shard)
        # exact search on CUDA without FAISS GPU support stays on the GPU with torch
        use_faiss = faiss is not None and (backend == "faiss" or index != "flat" or run_device.type != "cuda" or num_gpus > 0)
        self.metric, self.index, self.device = metric, index, run_device
        self.dim, self.ntotal = int(reference.shape[1]), int(reference.shape[0])
        self.faiss_index: Any = None
        self._gpu_resources: Any = None
        self._clustering_index: Any = None
        r = _search_rows(reference, metric, run_device if not use_faiss else "cpu")
        if not use_faiss:
            if params:
                raise ValueError(f"index_params {sorted(params)} apply to FAISS indexes only")
            self.placement, self.params, self.reference = "torch", {}, r
            self._minus_r_sq = -(r * r).sum(1)[None, :] if metric == "euclidean" else None
            return
        self.reference = None
        self.placement = faiss_placement(index, run_device.type, num_gpus, shard, k_hint)
        self.params = self._resolve_params(params, self.ntotal)
        self._build_faiss(faiss, np.ascontiguousarray(r.numpy(), dtype=np.float32), progress)

    @staticmethod
    def _resolve_params(params: dict[str, Any], n: int) -> dict[str, Any]:
        params = dict(params)
        if "nlist" in params:
            if params["nlist"] > n:
                raise ValueError(f"index_params['nlist'] = {params['nlist']} must be at most the number of references {n}")
            params.setdefault("train_size", min(n, 64 * params["nlist"]))
        if "train_size" in params and params["train_size"] is None:
            params["train_size"] = n
        return params

    def _build_faiss(self, faiss: Any, r_np: np.ndarray, progress: bool | None) -> None:
        n, d = r_np.shape
        faiss_metric = faiss.METRIC_L2 if self.metric == "euclidean" else faiss.METRIC_INNER_PRODUCT
        flat = (lambda: faiss.IndexFlatL2(d)) if self.metric == "euclidean" else (lambda: faiss.IndexFlatIP(d))
        p = self.params
        if self.index == "flat":
            idx = flat()
        elif self.index == "ivf":
            nlist = p.setdefault("nlist", default_nlist(n))
            p.setdefault("nprobe", 16)
            train_size = p["train_size"] = min(n, p.get("train_size") or 64 * nlist)
            if train_size < nlist:
                raise ValueError(f"index_params['train_size'] = {train_size} must be >= nlist = {nlist} (k-means needs a row per cell)")
            p.setdefault("niter", 10)
            p.setdefault("seed", 0)
            idx = faiss.IndexIVFFlat(flat(), d, nlist, faiss_metric)
            idx.cp.niter = p["niter"]
            idx.cp.seed = p["seed"]
            idx.cp.max_points_per_centroid = max(256, -(-train_size // nlist))  # we subsample ourselves
            if train_size < n:  # k-means on a random subsample: FAISS's guidance is 39-256 rows per cell
                rows = np.sort(np.random.default_rng(p["seed"]).choice(n, train_size, replace=False))
                sample = r_np[rows]
            else:
                sample = r_np
            if self.placement != "cpu":  # k-means assignment on the GPU(s); the trained index is copied below
                clustering = faiss.IndexFlatL2(d) if self.metric == "euclidean" else faiss.IndexFlatIP(d)
                # keep a Python reference: the SWIG attribute alone does not keep the GPU index alive
                self._clustering_index = faiss.index_cpu_to_all_gpus(clustering)
                idx.clustering_index = self._clustering_index
            idx.train(sample)
            idx.nprobe = min(p["nprobe"], nlist, GPU_MAX_K if self.placement != "cpu" else nlist)
        elif self.index == "pq":  # CPU only, like hnsw
            idx = self._build_pq(faiss, r_np, faiss_metric)
        else:  # hnsw (CPU only: faiss_placement never puts it on a GPU)
            idx = faiss.IndexHNSWFlat(d, p.setdefault("M", 32), faiss_metric)
            if "ef_construction" in p:
                idx.hnsw.efConstruction = p["ef_construction"]
            p.setdefault("ef_construction", int(idx.hnsw.efConstruction))
        idx = self._to_gpu(faiss, idx)
        blocks = -(-n // _ADD_BLOCK)
        with _bar(n, blocks if self.index == "hnsw" or n > 10 * _ADD_BLOCK else 1, progress, f"kNN index ({self.index}) add") as bar:
            for start in range(0, n, _ADD_BLOCK):
                idx.add(r_np[start:start + _ADD_BLOCK])
                bar.update(min(_ADD_BLOCK, n - start))
        self.faiss_index = idx

    def _build_pq(self, faiss: Any, r_np: np.ndarray, faiss_metric: int) -> Any:
        """4-bit PQ fast scan of every reference, its best ``k_factor * k`` re-ranked exactly.

        ``IndexPQFastScan`` (``m`` sub-quantizers of 16 centroids, codes scanned 32 at a time
        with SIMD table look-ups) inside ``IndexRefineFlat`` (which keeps the float vectors
        and recomputes the exact score of each candidate), i.e. FAISS's ``"PQ{m}x4fs,RFlat"``.
        """
        n, d = r_np.shape
        p = self.params
        m = p.setdefault("m", d // 2 if d % 2 == 0 else d)
        if d % m:
            raise ValueError(f"index_params['m'] = {m} must divide the embedding dimension {d} "
                             f"(each of the m sub-quantizers codes dim / m coordinates)")
        p.setdefault("k_factor", 16)
        p.setdefault("seed", 0)
        train_size = p["train_size"] = min(n, p.get("train_size") or _PQ_TRAIN_SIZE)
        if train_size < 16:
            raise ValueError(f"index_params['train_size'] = {train_size} must be >= 16 (4-bit codes: 16 centroids per "
                             f"sub-quantizer; there are {n} references)")
        base = faiss.IndexPQFastScan(d, m, 4, faiss_metric)
        base.pq.cp.seed = p["seed"]
        rows = np.sort(np.random.default_rng(p["seed"]).choice(n, train_size, replace=False)) if train_size < n else None
        base.train(r_np if rows is None else r_np[rows])
        idx = faiss.IndexRefineFlat(base)
        self._pq_base = base  # IndexRefineFlat does not own its base index: keep it alive here
        return idx

    def _to_gpu(self, faiss: Any, idx: Any) -> Any:
        """Copy the (trained, empty) CPU index to the GPU(s) chosen by :func:`faiss_placement`."""
        if self.placement == "gpu":
            self._gpu_resources = faiss.StandardGpuResources()  # must outlive the GPU index
            # the inputs' GPU (cuda:LOCAL_RANK under DDP), not always GPU 0
            gpu = self.device.index if self.device.index is not None else torch.cuda.current_device()
            return faiss.index_cpu_to_gpu(self._gpu_resources, gpu, idx)
        if self.placement == "gpu_sharded":
            co = faiss.GpuMultipleClonerOptions()
            co.shard = True  # each GPU holds 1/n of the references; results are merged
            if self.index == "ivf" and hasattr(co, "common_ivf_quantizer"):
                co.common_ivf_quantizer = True  # one coarse quantizer, not one per shard
            return faiss.index_cpu_to_all_gpus(idx, co=co)
        return idx

    def __len__(self) -> int:
        return self.ntotal

    @torch.no_grad()
    def search(self, query: Any, k: int, *, chunk_size: int | None = None,
               progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest references of every query: ``(scores, indices)``, ``(Q, k)`` each.

        Args:
            query: ``(Q, D)`` tensor or array.
            k: neighbours per query, ``1 <= k <= ntotal``.
            chunk_size: queries per block (default: torch path, blocks of at most 2**25
                scores; FAISS path, at most 2**20 results per call, between 256 and 16384
                queries).
            progress: tqdm bar (None: for searches of several blocks, on a terminal only).

        Returns:
            float32 scores and int64 indices on the query's device (see :func:`knn_search`).
            An approximate index that finds fewer than ``k`` candidates for a query pads its
            row with index -1 (increase ``nprobe`` / ``ef_search``).
        """
        query = _as_tensor(query, "query")
        if query.ndim != 2 or query.shape[1] != self.dim:
            raise ValueError(f"query must be 2-D (n, {self.dim}) like the reference, got shape {tuple(query.shape)}")
        _check_k(k, self.ntotal)
        k = int(k)
        _check_chunk_size(chunk_size)
        out_device = query.device
        if self.placement == "torch":
            q = _search_rows(query, self.metric, self.device)
            scores, indices = _torch_search(q, self.reference, k, self.metric, chunk_size, self._minus_r_sq, progress)
        else:
            if self.placement != "cpu" and k > GPU_MAX_K:
                raise ValueError(f"k = {k} exceeds FAISS GPU's limit of {GPU_MAX_K}; build the index with k_hint={k} "
                                 f"(it then stays on the CPU)")
            q = _search_rows(query, self.metric, "cpu")
            scores, indices = self._faiss_search(np.ascontiguousarray(q.numpy(), dtype=np.float32), k, chunk_size, progress)
        return scores.to(out_device), indices.to(out_device)

    def _faiss_search(self, q_np: np.ndarray, k: int, chunk_size: int | None,
                      progress: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.faiss_index
        if self.index == "hnsw":  # efSearch below k returns fewer than k neighbours
            idx.hnsw.efSearch = max(k, self.params.get("ef_search", max(64, 2 * k)))
        elif self.index == "pq":  # never ask the fast scan for more candidates than references
            idx.k_factor = float(min(self.params["k_factor"], max(1, self.ntotal // k)))
        num = len(q_np)
        if chunk_size is None:
            chunk_size = max(256, min(16384, _DEFAULT_FAISS_RESULTS // k))
        distances = np.empty((num, k), dtype=np.float32)
        indices = np.empty((num, k), dtype=np.int64)
        with _bar(num, -(-num // chunk_size), progress, f"kNN search ({self.index}, {self.placement})") as bar:
            for start in range(0, num, chunk_size):  # bounded result buffers, GPU transfers, progress
                stop = min(num, start + chunk_size)
                distances[start:stop], indices[start:stop] = idx.search(q_np[start:stop], k)
                bar.update(stop - start)
        self._fill_missing(q_np, k, distances, indices)
        scores = torch.from_numpy(distances)
        if self.metric == "euclidean":
            scores = scores.clamp_min_(0).sqrt_()  # FAISS's L2 indexes report squared distances
        return scores, torch.from_numpy(indices)

    def _fill_missing(self, q_np: np.ndarray, k: int, distances: np.ndarray, indices: np.ndarray) -> None:
        """Search again, with twice the ``nprobe`` (``ef_search``) each time, the rows where an
        approximate index found fewer than ``k`` candidates (index -1), until they are complete or
        the whole index was probed (IVF: ``nprobe = nlist`` is exhaustive)."""
        if self.index in ("flat", "pq") or self.placement != "cpu":
            return  # flat and pq scan every reference, so they return k; GPU parameters are left as built
        idx = self.faiss_index
        if self.index == "ivf":
            get, put, limit = (lambda: idx.nprobe), (lambda v: setattr(idx, "nprobe", v)), idx.nlist
        else:
            get, put, limit = (lambda: idx.hnsw.efSearch), (lambda v: setattr(idx.hnsw, "efSearch", v)), self.ntotal
        original = get()
        try:
            rows = np.flatnonzero((indices < 0).any(1))
            while len(rows) and get() < limit:
                put(min(limit, 2 * get()))
                distances[rows], indices[rows] = idx.search(q_np[rows], k)
                rows = rows[(indices[rows] < 0).any(1)]
        finally:
            put(original)

    def __repr__(self) -> str:
        return (f"KNNIndex(ntotal={self.ntotal}, dim={self.dim}, metric={self.metric!r}, index={self.index!r}, "
                f"placement={self.placement!r}, params={self.params})")


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
        index_params: options of the approximate indexes (:data:`INDEX_PARAMS`): ``nlist``
            (default ``4 * sqrt(N)``), ``nprobe`` (16), ``train_size`` (``min(N, 64 nlist)``
            random rows for k-means), ``niter`` (10), ``seed`` (0) for ``ivf``; ``M`` (32),
            ``ef_search`` (max(64, 2k)) and ``ef_construction`` (40) for ``hnsw``; ``m``
            (``dim / 2``), ``k_factor`` (16), ``train_size`` (``min(N, 65536)``), ``seed`` (0)
            for ``pq``.
        shard: with several GPUs, split the index over them (None: yes; see
            :func:`faiss_placement`).
        progress: tqdm bar (None: for searches of several blocks, on a terminal only).

    Returns:
        ``(scores, indices)``: ``(Q, k)`` float32 and int64 tensors on the query's device,
        without gradient. Ties are broken by the backend (FAISS and torch may order tied
        references differently). Approximate indexes pad rows with fewer than ``k``
        candidates with index -1.
    """
    query, reference = _check_inputs(query, reference, k, metric, index, backend)
    _check_chunk_size(chunk_size)
    built = KNNIndex(reference, metric=metric, index=index, backend=backend,
                     device=device if device is not None else query.device, shard=shard,
                     index_params=index_params, progress=progress, k_hint=k)
    return built.search(query, k, chunk_size=chunk_size, progress=progress)


def _torch_search(q: torch.Tensor, r: torch.Tensor, k: int, metric: str, chunk_size: int | None,
                  minus_r_sq: torch.Tensor | None = None, progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(r)
    if chunk_size is None:
        chunk_size = max(1, _DEFAULT_BLOCK_ELEMENTS // max(n, 1))
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scores = torch.empty(len(q), k, dtype=torch.float32, device=q.device)
    indices = torch.empty(len(q), k, dtype=torch.int64, device=q.device)
    euclidean = metric == "euclidean"
    if euclidean and minus_r_sq is None:
        minus_r_sq = -(r * r).sum(1)[None, :]
    with _bar(len(q), -(-len(q) // chunk_size), progress, "kNN search (torch)") as bar:
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


class KNN:
    """A PML ``knn_func`` built on :func:`knn_search`: a drop-in for PML's ``FaissKNN``.

    ``KNN()(query, k, reference, ref_includes_query)`` returns ``(distances, indices)`` of the
    ``k`` nearest references like PML's ``FaissKNN`` / ``CustomKNN``; with
    ``ref_includes_query`` it searches ``k + 1`` and removes each query's own match exactly as
    PML does. Unlike ``FaissKNN`` it works without FAISS (exact torch search), supports cosine
    similarity, approximate indexes, GPU sharding and chunked searches.

    Args:
        metric: ``"euclidean"`` (default, the ranking of PML's default ``FaissKNN``;
            distances are returned unsquared), ``"cosine"`` or ``"inner_product"``.
        index, backend, device, chunk_size, index_params, shard, progress: as in
            :func:`knn_search`; e.g. ``KNN(index="ivf", index_params={"nlist": 4096, "nprobe": 32})``.
        symmetric: a set searched against itself (``ref_includes_query`` with ``reference``
            equal to ``query``, the exact FAISS search on the CPU) computes each pair's score
            once (:func:`pml_plugins.knn_self.symmetric_self_search`, about 1.5x faster at
            60k x 512). None (default): from :data:`SYMMETRIC_MIN_ROWS` rows and
            :data:`SYMMETRIC_MIN_DIM` dimensions on; True: whenever
            it applies; False: never (FAISS's flat search, whose float rounding PML's
            ``FaissKNN`` shares: choose it to reproduce PML's order of near-tied neighbours).

    ``train(embeddings)`` / ``add(embeddings)`` / ``reset()`` keep a stored reference set for
    calls with ``reference=None`` (as PML's ``InferenceModel`` uses them); its index is built
    once, at the first such call, and rebuilt after ``train`` / ``add``.

    Raises (at call time):
        RuntimeError: an approximate index found fewer than ``k`` neighbours for some query
            (index -1), which would silently corrupt the metrics; raise ``nprobe`` or
            ``ef_search``.
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
        shard: bool | None = None,
        progress: bool | None = None,
        symmetric: bool | None = None,
    ) -> None:
        _check_options(metric, index, backend)
        _check_chunk_size(chunk_size)
        if shard is not None and not isinstance(shard, bool):
            raise TypeError(f"shard must be None or a bool, got {type(shard).__name__}")
        if symmetric is not None and not isinstance(symmetric, bool):
            raise TypeError(f"symmetric must be None or a bool, got {type(symmetric).__name__}")
        self.symmetric = symmetric
        self.metric = metric
        self.index = index
        self.backend = backend
        self.device = device
        self.chunk_size = chunk_size
        self.index_params = check_index_params(index, index_params)
        self.shard = shard
        self.progress = progress
        self.reference: torch.Tensor | None = None
        self._built: KNNIndex | None = None

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
        if ref_includes_query:
            k = k + 1
        if reference is None:
            if self.reference is None:
                raise ValueError("no reference given and none stored: pass reference=... or call train()/add() first")
            if self._built is None:
                self._built = self._build(self.reference, k_hint=None)
            scores, indices = self._built.search(query, k, chunk_size=self.chunk_size, progress=self.progress)
        elif ref_includes_query and self._use_symmetric(query, reference, k):
            from .knn_self import symmetric_self_search  # noqa: PLC0415

            q = _search_rows(query, self.metric, "cpu")
            scores, indices = symmetric_self_search(np.ascontiguousarray(q.numpy(), dtype=np.float32), k, self.metric,
                                                    _import_faiss(), progress=self.progress)
        else:
            scores, indices = knn_search(
                query, reference, k, metric=self.metric, index=self.index, backend=self.backend,
                device=self.device, chunk_size=self.chunk_size, index_params=self.index_params,
                shard=self.shard, progress=self.progress,
            )
        if bool((indices < 0).any()):
            missing = int((indices < 0).any(1).sum())
            raise RuntimeError(f"the {self.index!r} index found fewer than k = {k} neighbours for {missing} queries; "
                               f"search more of it (index_params nprobe / ef_search) or use index='flat'")
        if ref_includes_query:
            scores, indices = drop_self_matches(scores, indices)
        return scores, indices

    def _use_symmetric(self, query: Any, reference: Any, k: int) -> bool:
        """Whether a ``ref_includes_query`` call is a self-search that the symmetric path can run:
        the same rows on both sides, on the CPU, exact FAISS search."""
        if self.symmetric is False or self.index != "flat" or self.backend == "torch" or not faiss_available():
            return False
        if not (isinstance(query, torch.Tensor) and isinstance(reference, torch.Tensor)):
            return False
        if query.device.type != "cpu" or reference.device.type != "cpu" or (
                self.device is not None and torch.device(self.device).type != "cpu"):
            return False
        if query.ndim != 2 or query.shape != reference.shape or not 1 <= k <= len(query):
            return False
        if self.symmetric is None and (len(query) < SYMMETRIC_MIN_ROWS or query.shape[1] < SYMMETRIC_MIN_DIM):
            return False
        same_storage = query.data_ptr() == reference.data_ptr() and query.stride() == reference.stride()
        return same_storage or torch.equal(query, reference)

    def build_index(self, reference: Any, k_hint: int | None = None) -> KNNIndex:
        """A :class:`KNNIndex` over ``reference`` with this function's options (to search repeatedly)."""
        return self._build(reference, k_hint)

    def _build(self, reference: Any, k_hint: int | None) -> KNNIndex:
        return KNNIndex(reference, metric=self.metric, index=self.index, backend=self.backend,
                        device=self.device, shard=self.shard, index_params=self.index_params,
                        progress=self.progress, k_hint=k_hint)

    def train(self, embeddings: torch.Tensor) -> None:
        """Replace the stored reference set."""
        self.reference = _as_tensor(embeddings, "embeddings").float()
        self._built = None

    def add(self, embeddings: torch.Tensor) -> None:
        """Append to the stored reference set."""
        emb = _as_tensor(embeddings, "embeddings").float()
        self.reference = emb if self.reference is None else torch.cat([self.reference, emb.to(self.reference.device)])
        self._built = None

    def reset(self) -> None:
        self.reference = None
        self._built = None

    def __repr__(self) -> str:
        params = f", index_params={self.index_params}" if self.index_params else ""
        sym = "" if self.symmetric is None else f", symmetric={self.symmetric}"
        return f"KNN(metric={self.metric!r}, index={self.index!r}, backend={self.backend!r}{params}{sym})"
