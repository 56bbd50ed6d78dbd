""":class:`KNN`: PML's ``knn_func`` (a drop-in for ``FaissKNN``) on top of :class:`KNNIndex`."""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .faiss_index import faiss_available, faiss_num_gpus, import_faiss
from .index import KNNIndex
from .options import GPU_MAX_K, SYMMETRIC_MIN_DIM, SYMMETRIC_MIN_ROWS, KNNOptions, as_tensor, search_rows
from .search import knn_search
from .self_search import symmetric_self_search
from .torch_search import drop_self_matches

__all__ = ["KNN"]

# PML's logger: FaissKNN reports each search there at INFO level (PML's tests listen for it)
_PML_LOGGER = logging.getLogger("PML")


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
            ``index`` names the kind of index; the FAISS index object itself is the attribute
            ``.index`` (as on ``FaissKNN``).
        symmetric: a set searched against itself (``ref_includes_query`` with ``reference``
            equal to ``query``, the exact FAISS search on the CPU) computes each pair's score
            once (:func:`pml_plugins.knn.self_search.symmetric_self_search`, about 1.5x faster at
            60k x 512). None (default): from ``SYMMETRIC_MIN_ROWS`` rows and
            ``SYMMETRIC_MIN_DIM`` dimensions on; True: whenever it applies; False: never
            (FAISS's flat search, whose float rounding PML's ``FaissKNN`` shares: choose it to
            reproduce PML's order of near-tied neighbours).
        reset_before: ``FaissKNN``'s meaning. True (default): each call indexes the
            ``reference`` it is given afresh. False: the call's ``reference`` is added to the
            stored reference set (``train`` / ``add``) and the whole stored set is searched.
        reset_after: ``FaissKNN``'s meaning. True (default): ``.index`` is None after a call.
            False: ``.index`` keeps the FAISS index the call searched (None for the torch search).
        index_init_fn: ``FaissKNN``'s ``index_init_fn``: ``index_init_fn(dim)`` returns an empty
            FAISS index (e.g. ``faiss.IndexFlatIP``) that the call fills with the reference and
            searches, exactly as ``FaissKNN`` does (distances as that index reports them, e.g.
            squared for ``IndexFlatL2``). ``metric``, ``index`` and ``backend`` then do not apply.
        gpus: ``FaissKNN``'s ``gpus``: a list of GPU ids for an ``index_init_fn`` index (the
            other indexes follow ``device`` / ``shard``).

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
        reset_before: bool = True,
        reset_after: bool = True,
        index_init_fn: Callable[[int], Any] | None = None,
        gpus: Sequence[int] | None = None,
    ) -> None:
        self.options = KNNOptions(
            metric=metric,
            index=index,
            backend=backend,
            device=device,
            chunk_size=chunk_size,
            index_params=index_params or {},
            shard=shard,
            progress=progress,
            symmetric=symmetric,
        )
        for name, value in (("reset_before", reset_before), ("reset_after", reset_after)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        if index_init_fn is not None and not callable(index_init_fn):
            raise TypeError(f"index_init_fn must be callable (dim -> FAISS index), got {type(index_init_fn).__name__}")
        if gpus is not None:  # FaissKNN's checks and messages
            if not isinstance(gpus, (list, tuple)):
                raise TypeError("gpus must be a list")
            if len(gpus) < 1:
                raise ValueError("gpus must have length greater than 0")
        self.reset_before, self.reset_after = reset_before, reset_after
        self.index_init_fn, self.gpus = index_init_fn, gpus
        self.index: Any = None  # the FAISS index of the last call (FaissKNN's attribute)
        self.reference: torch.Tensor | None = None
        self._built: KNNIndex | None = None

    # the options, under the names they always had
    metric = property(lambda self: self.options.metric)
    index_type = property(lambda self: self.options.index, doc="The kind of index: one of ``INDEXES``.")
    backend = property(lambda self: self.options.backend)
    device = property(lambda self: self.options.device)
    chunk_size = property(lambda self: self.options.chunk_size)
    index_params = property(lambda self: dict(self.options.index_params))
    shard = property(lambda self: self.options.shard)
    progress = property(lambda self: self.options.progress)
    symmetric = property(lambda self: self.options.symmetric)

    @property
    def full_ranking_metric(self) -> str | None:
        """The metric by which :mod:`pml_plugins.ranking` can reproduce this function's complete
        ranking (an exact flat search over the given reference, FAISS's order of ties), or None.

        ``AccuracyCalculator(k=None)`` then computes the full-ranking MAP and MRR in bounded
        memory instead of asking this function for every reference.
        """
        if self.index_init_fn is not None or self.index_type != "flat" or not self.reset_before:
            return None
        return self.metric

    def full_ranking_prefix(self, device: str | torch.device) -> bool:
        """Whether the ``k`` columns this function returns for inputs on ``device`` are the first
        ``k`` of its full ranking: FAISS's flat L2 search on the CPU, which orders equal distances
        by index for every ``k`` (FAISS's inner-product heaps keep other tied indices for k < 100,
        and ``torch.topk`` orders ties arbitrarily)."""
        o = self.options
        on_cpu = torch.device(device).type == "cpu" and (o.device is None or o.device.type == "cpu")
        return self.full_ranking_metric == "euclidean" and o.backend != "torch" and on_cpu and faiss_available()

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
        _PML_LOGGER.info("running k-nn with k=%d", k)
        if self.index_init_fn is not None:
            scores, indices = self._call_faiss_init_fn(query, k, reference)
        else:
            if reference is not None and not self.reset_before:
                self.add(reference)  # FaissKNN(reset_before=False): the index grows with every call
                reference = None
            scores, indices = self._search(query, k, reference, ref_includes_query)
        if bool((indices < 0).any()):
            missing = int((indices < 0).any(1).sum())
            raise RuntimeError(
                f"the {self.index_type!r} index found fewer than k = {k} neighbours for {missing} "
                f"queries; search more of it (index_params nprobe / ef_search) or use index='flat'"
            )
        if self.reset_after:
            self.index = None
        if ref_includes_query:
            scores, indices = drop_self_matches(scores, indices)
        return scores, indices

    def _search(
        self, query: Any, k: int, reference: Any, ref_includes_query: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.options
        if reference is None:
            if self.reference is None:
                raise ValueError("no reference given and none stored: pass reference=... or call train()/add() first")
            if self._built is None:
                self._built = self._build(self.reference, k_hint=None)
            self.index = self._built.faiss_index
            return self._built.search(query, k, chunk_size=o.chunk_size, progress=o.progress)
        if ref_includes_query and self._use_symmetric(query, reference, k):
            q = search_rows(query, o.metric, "cpu")
            return symmetric_self_search(
                np.ascontiguousarray(q.numpy(), dtype=np.float32), k, o.metric, import_faiss(), progress=o.progress
            )
        if self.reset_after:
            return knn_search(query, reference, k, options=o)
        opts = o if o.device is not None else o.replace(device=as_tensor(query, "query").device)
        built = KNNIndex(reference, options=opts, k_hint=k)  # kept: .index after the call
        self.index = built.faiss_index
        self._kept = built  # GPU resources must outlive the index
        return built.search(query, k, chunk_size=o.chunk_size, progress=o.progress)

    def _call_faiss_init_fn(self, query: Any, k: int, reference: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``FaissKNN.__call__``'s search: the ``index_init_fn`` index, filled with ``reference``."""
        faiss = import_faiss()
        if faiss is None:
            raise ImportError("index_init_fn needs FAISS: pip install faiss-cpu")
        query = as_tensor(query, "query")
        if self.reset_before:
            self.index = self.index_init_fn(int(query.shape[1]))
        if self.index is None:
            raise ValueError("self.index is None. It needs to be initialized before being used.")
        index = self.index
        use_gpu = (query.is_cuda or self.gpus is not None) and faiss_num_gpus(faiss) > 0 and k <= GPU_MAX_K
        if use_gpu and "Gpu" not in type(index).__name__:
            index = (
                faiss.index_cpu_to_all_gpus(index)
                if self.gpus is None
                else faiss.index_cpu_to_gpus_list(index, gpus=list(self.gpus))
            )
        if reference is not None:
            index.add(np.ascontiguousarray(as_tensor(reference, "reference").float().cpu().numpy()))
        distances, indices = index.search(np.ascontiguousarray(query.float().cpu().numpy()), k)
        if use_gpu and index is not self.index:
            self.index = faiss.index_gpu_to_cpu(index)
        return torch.from_numpy(distances).to(query.device), torch.from_numpy(indices).to(query.device)

    def _use_symmetric(self, query: Any, reference: Any, k: int) -> bool:
        """Whether a ``ref_includes_query`` call is a self-search that the symmetric path can run:
        the same rows on both sides, on the CPU, exact FAISS search."""
        o = self.options
        if o.symmetric is False or o.index != "flat" or o.backend == "torch" or not faiss_available():
            return False
        if not (isinstance(query, torch.Tensor) and isinstance(reference, torch.Tensor)):
            return False
        if (
            query.device.type != "cpu"
            or reference.device.type != "cpu"
            or (o.device is not None and o.device.type != "cpu")
        ):
            return False
        if query.ndim != 2 or query.shape != reference.shape or not 1 <= k <= len(query):
            return False
        if o.symmetric is None and (len(query) < SYMMETRIC_MIN_ROWS or query.shape[1] < SYMMETRIC_MIN_DIM):
            return False
        same_storage = query.data_ptr() == reference.data_ptr() and query.stride() == reference.stride()
        return same_storage or torch.equal(query, reference)

    def build_index(self, reference: Any, k_hint: int | None = None) -> KNNIndex:
        """A :class:`KNNIndex` over ``reference`` with this function's options (to search repeatedly)."""
        return self._build(reference, k_hint)

    def _build(self, reference: Any, k_hint: int | None) -> KNNIndex:
        return KNNIndex(reference, options=self.options, k_hint=k_hint)

    def train(self, embeddings: torch.Tensor) -> None:
        """Replace the stored reference set (with ``index_init_fn``: a new index holding it)."""
        self.reference = as_tensor(embeddings, "embeddings").float()
        self._built = None
        if self.index_init_fn is not None:
            self.index = self.index_init_fn(int(self.reference.shape[1]))
            self.index.add(np.ascontiguousarray(self.reference.cpu().numpy()))

    def add(self, embeddings: torch.Tensor) -> None:
        """Append to the stored reference set (with ``index_init_fn``: to ``.index``)."""
        emb = as_tensor(embeddings, "embeddings").float()
        if self.index_init_fn is not None:
            if self.index is None:
                self.index = self.index_init_fn(int(emb.shape[1]))
            self.index.add(np.ascontiguousarray(emb.cpu().numpy()))
        self.reference = emb if self.reference is None else torch.cat([self.reference, emb.to(self.reference.device)])
        self._built = None

    def reset(self) -> None:
        """Forget the stored reference set and the FAISS index."""
        self.reference = None
        self._built = None
        self.index = None

    def save(self, filename: str) -> None:
        """Write ``.index`` with ``faiss.write_index`` (``FaissKNN.save``)."""
        import_faiss().write_index(self.index, filename)

    def load(self, filename: str) -> None:
        """Read ``.index`` with ``faiss.read_index`` (``FaissKNN.load``)."""
        self.index = import_faiss().read_index(filename)

    def __repr__(self) -> str:
        params = f", index_params={self.index_params}" if self.index_params else ""
        sym = "" if self.symmetric is None else f", symmetric={self.symmetric}"
        return f"KNN(metric={self.metric!r}, index={self.index_type!r}, backend={self.backend!r}{params}{sym})"
