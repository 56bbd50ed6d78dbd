"""A reference set indexed once and searched many times: :class:`KNNIndex` (FAISS or torch)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from .faiss_index import default_nlist, faiss_num_gpus, faiss_placement, import_faiss
from .options import GPU_MAX_K, KNNOptions, as_tensor, check_int, check_k, search_rows
from .progress import progress_bar
from .torch_search import torch_search

__all__ = ["KNNIndex", "DEFAULT_FAISS_RESULTS"]

#: Result-block budget of the FAISS path, in (query, neighbour) entries per search call.
DEFAULT_FAISS_RESULTS = 2**20
_PQ_TRAIN_SIZE = 65536  # 16 centroids per sub-quantizer: a few thousand rows per centroid is plenty
_ADD_BLOCK = 65536  # reference rows per FAISS add() call (progress, bounded GPU staging memory)


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
        options: KNNOptions | None = None,
    ) -> None:
        if options is None:
            options = KNNOptions(
                metric=metric,
                index=index,
                backend=backend,
                device=device,
                shard=shard,
                index_params=index_params or {},
                progress=progress,
            )
        elif not isinstance(options, KNNOptions):
            raise TypeError(f"options must be a KNNOptions, got {type(options).__name__}")
        self.options = options
        metric, index, backend, shard, progress = (
            options.metric,
            options.index,
            options.backend,
            options.shard,
            options.progress,
        )
        params = dict(options.index_params)
        reference = as_tensor(reference, "reference")
        if reference.ndim != 2 or len(reference) == 0:
            raise ValueError(f"reference must be 2-D (n, dim) with n >= 1, got shape {tuple(reference.shape)}")
        device = options.device
        faiss = None if backend == "torch" else import_faiss()
        if backend == "faiss" and faiss is None:
            raise ImportError("backend='faiss' needs FAISS: pip install faiss-cpu (or faiss-gpu-cu12)")
        if index != "flat" and faiss is None:
            raise ImportError(
                f"index={index!r} needs FAISS (pip install faiss-cpu); the torch backend is exact ('flat') only"
            )
        run_device = torch.device(device) if device is not None else reference.device
        num_gpus = faiss_num_gpus(faiss) if faiss is not None else 0
        if shard:  # explicit sharding that cannot happen is an error, before any work
            faiss_placement(index, run_device.type, num_gpus, shard)
        # exact search on CUDA without FAISS GPU support stays on the GPU with torch
        use_faiss = faiss is not None and (
            backend == "faiss" or index != "flat" or run_device.type != "cuda" or num_gpus > 0
        )
        self.metric, self.index, self.device = metric, index, run_device
        self.dim, self.ntotal = int(reference.shape[1]), int(reference.shape[0])
        self.faiss_index: Any = None
        self._gpu_resources: Any = None
        self._clustering_index: Any = None
        r = search_rows(reference, metric, run_device if not use_faiss else "cpu")
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
                raise ValueError(
                    f"index_params['nlist'] = {params['nlist']} must be at most the number of references {n}"
                )
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
                raise ValueError(
                    f"index_params['train_size'] = {train_size} must be >= nlist = {nlist} "
                    "(k-means needs a row per cell)"
                )
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
        with progress_bar(
            n, blocks if self.index == "hnsw" or n > 10 * _ADD_BLOCK else 1, progress, f"kNN index ({self.index}) add"
        ) as bar:
            for start in range(0, n, _ADD_BLOCK):
                idx.add(r_np[start : start + _ADD_BLOCK])
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
            raise ValueError(
                f"index_params['m'] = {m} must divide the embedding dimension {d} "
                f"(each of the m sub-quantizers codes dim / m coordinates)"
            )
        p.setdefault("k_factor", 16)
        p.setdefault("seed", 0)
        train_size = p["train_size"] = min(n, p.get("train_size") or _PQ_TRAIN_SIZE)
        if train_size < 16:
            raise ValueError(
                f"index_params['train_size'] = {train_size} must be >= 16 (4-bit codes: 16 centroids per "
                f"sub-quantizer; there are {n} references)"
            )
        base = faiss.IndexPQFastScan(d, m, 4, faiss_metric)
        base.pq.cp.seed = p["seed"]
        rows = (
            np.sort(np.random.default_rng(p["seed"]).choice(n, train_size, replace=False)) if train_size < n else None
        )
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
    def search(
        self, query: Any, k: int, *, chunk_size: int | None = None, progress: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
        query = as_tensor(query, "query")
        if query.ndim != 2 or query.shape[1] != self.dim:
            raise ValueError(f"query must be 2-D (n, {self.dim}) like the reference, got shape {tuple(query.shape)}")
        check_k(k, self.ntotal)
        k = int(k)
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, 1)
        out_device = query.device
        if self.placement == "torch":
            q = search_rows(query, self.metric, self.device)
            scores, indices = torch_search(q, self.reference, k, self.metric, chunk_size, self._minus_r_sq, progress)
        else:
            if self.placement != "cpu" and k > GPU_MAX_K:
                raise ValueError(
                    f"k = {k} exceeds FAISS GPU's limit of {GPU_MAX_K}; build the index with k_hint={k} "
                    f"(it then stays on the CPU)"
                )
            q = search_rows(query, self.metric, "cpu")
            scores, indices = self._faiss_search(
                np.ascontiguousarray(q.numpy(), dtype=np.float32), k, chunk_size, progress
            )
        return scores.to(out_device), indices.to(out_device)

    def _faiss_search(
        self, q_np: np.ndarray, k: int, chunk_size: int | None, progress: bool | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.faiss_index
        if self.index == "hnsw":  # efSearch below k returns fewer than k neighbours
            idx.hnsw.efSearch = max(k, self.params.get("ef_search", max(64, 2 * k)))
        elif self.index == "pq":  # never ask the fast scan for more candidates than references
            idx.k_factor = float(min(self.params["k_factor"], max(1, self.ntotal // k)))
        num = len(q_np)
        if chunk_size is None:
            chunk_size = max(256, min(16384, DEFAULT_FAISS_RESULTS // k))
        distances = np.empty((num, k), dtype=np.float32)
        indices = np.empty((num, k), dtype=np.int64)
        with progress_bar(num, -(-num // chunk_size), progress, f"kNN search ({self.index}, {self.placement})") as bar:
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
        return (
            f"KNNIndex(ntotal={self.ntotal}, dim={self.dim}, metric={self.metric!r}, index={self.index!r}, "
            f"placement={self.placement!r}, params={self.params})"
        )
