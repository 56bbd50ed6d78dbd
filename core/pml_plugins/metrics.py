"""Retrieval metrics: :class:`AccuracyCalculator`, PML's calculator with nDCG@k, Recall@k, plugin metrics.

``pml_plugins.AccuracyCalculator`` is a subclass of PML's ``AccuracyCalculator`` and a
drop-in replacement for it (pass it to ``GlobalEmbeddingSpaceTester(accuracy_calculator=...)``).
It adds

* ``ndcg_at_<k>`` for every k in ``ndcg_ks``: Multi-Proxy Anchor paper, section 3.5,
  DCG(k) = sum_{i<=k} (2^{r_i} - 1) / log2(i + 1) (eq. 19), nDCG(k) = DCG(k) / DCG_best(k)
  (eq. 20), binary relevance through ``label_comparison_fn``; DCG_best has min(k, R) relevant
  items first, R = relevant references of the query (the query itself not counted);
* ``recall_at_<k>`` for every k in ``recall_ks``: 1 when any of the k nearest references is
  relevant (the deep-metric-learning Recall@k);
* graded relevance for nDCG through ``gain_fn``;
* metrics registered by plugins through the ``register_metrics`` hook, by name;

and computes PML's own metrics with identical values, but vectorised: labels are counted with
one ``torch.unique`` (O(N log N)) instead of a (unique labels x N) comparison matrix, and one
kNN search serves every metric. It also fixes PML 2.9's calculator where it is wrong:

* labels keep their integer dtype (PML casts them to float32: ids above 2**24 collide);
* ``include=("mean_reciprocal_rank",)`` alone works (PML's ``requires_knn`` omits it);
* without FAISS the kNN falls back to an exact torch search (and k-means to scikit-learn)
  instead of raising ``NameError``;
* the default ``k=None`` means what it means in PML, the full ranking, but is computed
  without PML's N x N kNN: ``mean_average_precision`` and ``mean_reciprocal_rank`` come from a
  blocked pass over the references (:mod:`pml_plugins.ranking`) that orders ties as PML's
  FAISS kNN does, and the search itself asks only for the neighbours the other metrics need
  (PML's metrics and PML-style subclass metrics still receive exactly PML's columns; a
  metric that needs the whole ranking as columns gets it, as under PML). ``k="all"`` is a
  synonym of ``k=None``.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from pytorch_metric_learning.utils import accuracy_calculator as pml_ac
from pytorch_metric_learning.utils import common_functions as c_f

from .knn import KNN, import_faiss
from .ranking import Relevance, full_ranking_precisions

__all__ = ["AccuracyCalculator", "SklearnKMeans", "DEFAULT_NDCG_KS", "DEFAULT_RECALL_KS", "PML_METRICS"]

DEFAULT_NDCG_KS = (2, 4, 8, 10, 100)
DEFAULT_RECALL_KS = (1, 2, 4, 8)
#: PML 2.9's own metrics.
PML_METRICS = (
    "AMI",
    "NMI",
    "mean_average_precision",
    "mean_average_precision_at_r",
    "mean_reciprocal_rank",
    "precision_at_1",
    "r_precision",
)
_R_METRICS = ("r_precision", "mean_average_precision_at_r")
_PML_KNN_METRICS = (
    "precision_at_1",
    "mean_average_precision",
    "mean_average_precision_at_r",
    "r_precision",
    "mean_reciprocal_rank",
)
# Elements per block when a custom label_comparison_fn counts matches (bounds memory).
_BLOCK_ELEMENTS = 2**24


class SklearnKMeans:
    """k-means for NMI/AMI when FAISS is missing (PML's ``FaissKMeans`` would raise ``NameError``)."""

    def __init__(self, niter: int = 20, seed: int = 1234):
        self.niter = niter
        self.seed = seed

    def __call__(self, x: torch.Tensor, nmb_clusters: int) -> torch.Tensor:
        from sklearn.cluster import KMeans

        data = c_f.to_numpy(x).astype(np.float32)
        km = KMeans(n_clusters=nmb_clusters, n_init=1, max_iter=self.niter, random_state=self.seed)
        return torch.as_tensor(km.fit_predict(data), dtype=torch.long, device=x.device)


def _check_ks(ks: Iterable[int] | None, name: str) -> tuple[int, ...]:
    if ks is None:
        return ()
    if isinstance(ks, int):
        ks = (ks,)
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{name} must hold positive ints, got {k!r}")
        out.append(int(k))
    return tuple(sorted(set(out)))


def _as_labels(x: Any, name: str, device: torch.device) -> torch.Tensor:
    t = c_f.numpy_to_torch(x)
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(np.asarray(t))
    if t.ndim not in (1, 2):
        raise ValueError(f"{name} must be 1-D (n,) or 2-D (n, label_columns), got shape {tuple(t.shape)}")
    return t.to(device)  # the dtype is kept: PML's float32 cast merges integer ids above 2**24


def _as_embeddings(x: Any, name: str, device: torch.device) -> torch.Tensor:
    t = c_f.numpy_to_torch(x)
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(np.asarray(t))
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, embedding_size), got shape {tuple(t.shape)}")
    return t.to(device).float()


class AccuracyCalculator(pml_ac.AccuracyCalculator):
    """PML's ``AccuracyCalculator`` plus nDCG@k, Recall@k and plugin metrics; faster, same values.

    Args:
        include, exclude, avg_of_avgs, return_per_class, label_comparison_fn, device:
            as in PML. Metric names: PML's (``precision_at_1``, ``r_precision``,
            ``mean_average_precision_at_r``, ``mean_average_precision``,
            ``mean_reciprocal_rank``, ``NMI``, ``AMI``), ``ndcg_at_<k>``, ``recall_at_<k>`` and
            the names of registered plugin metrics.
        k: neighbours for ``mean_average_precision`` and ``mean_reciprocal_rank`` (and the
            cap for R-precision / MAP@R), as in PML: ``None`` (default: the full ranking, PML's
            values, computed in bounded memory), ``"max_bin_count"``, or an int (capped at the
            number of references; PML pads a larger k with index -1). ``"all"``: same as None.
            The search itself uses the largest k any requested metric needs.
        knn_func: PML-style ``knn_func(query, k, reference, ref_includes_query)``. Default:
            :class:`pml_plugins.knn.KNN` with ``metric="euclidean"`` (PML's default ranking),
            FAISS when installed, exact torch otherwise.
        kmeans_func: default PML's ``FaissKMeans(niter=20)``, or :class:`SklearnKMeans`
            without FAISS.
        ndcg_ks: the k of ``ndcg_at_<k>`` (default 2, 4, 8, 10, 100); empty for none.
        recall_ks: the k of ``recall_at_<k>`` (default 1, 2, 4, 8); empty for none.
        gain_fn: graded relevance for nDCG: ``gain_fn(query_labels, reference_labels)``
            receives broadcastable label tensors (shapes ``(Q, 1)`` and ``(Q, k)``, or
            ``(U, 1)`` and ``(1, V)``) and returns the gain of each pair (the numerator of
            eq. 19; ``2**r - 1`` for a relevance grade r), >= 0, e.g. 2 for the same class,
            1 for the same super-class. Default: 1 when ``label_comparison_fn`` says the
            labels match, else 0 (binary, eq. 19 with r in {0, 1}). With a ``gain_fn``, a
            query counts for nDCG when its ideal DCG is positive.
        plugin_metrics: ``True`` (default): every metric registered through the
            ``register_metrics`` hook; ``False``: none; or an iterable of registered names.

    Values are fractions in [0, 1] (the papers print them x 100).
    """

    def __init__(
        self,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        avg_of_avgs: bool = False,
        return_per_class: bool = False,
        k: int | str | None = None,
        label_comparison_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | str | None = None,
        knn_func: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
        kmeans_func: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
        ndcg_ks: Iterable[int] | None = DEFAULT_NDCG_KS,
        recall_ks: Iterable[int] | None = DEFAULT_RECALL_KS,
        gain_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        plugin_metrics: bool | Iterable[str] = True,
    ) -> None:
        self.ndcg_ks = _check_ks(ndcg_ks, "ndcg_ks")
        self.recall_ks = _check_ks(recall_ks, "recall_ks")
        if gain_fn is not None and not callable(gain_fn):
            raise TypeError(f"gain_fn must be callable, got {type(gain_fn).__name__}")
        self.gain_fn = gain_fn
        self._metric_k: dict[str, int] = {}
        for kk in self.ndcg_ks:
            name = f"ndcg_at_{kk}"
            self._metric_k[name] = kk
            setattr(self, f"calculate_{name}", functools.partial(self._calculate_ndcg, at=kk))
        for kk in self.recall_ks:
            name = f"recall_at_{kk}"
            self._metric_k[name] = kk
            setattr(self, f"calculate_{name}", functools.partial(self._calculate_recall, at=kk))
        self._plugin_metrics = _registered_metrics(plugin_metrics, taken=set(PML_METRICS) | set(self._metric_k))
        for name in self._plugin_metrics:
            setattr(self, f"calculate_{name}", functools.partial(self._calculate_plugin_metric, name=name))

        pml_k = None if k == "all" else k
        if device is not None and not isinstance(device, torch.device):
            device = torch.device(device)
        if knn_func is None:
            knn_func = KNN(metric="euclidean")
        if kmeans_func is None:
            dev = c_f.use_cuda_if_available() if device is None else device
            kmeans_func = (
                pml_ac.FaissKMeans(niter=20, gpu=dev.type == "cuda")
                if import_faiss() is not None
                else SklearnKMeans(niter=20)
            )
        super().__init__(
            include=include,
            exclude=exclude,
            avg_of_avgs=avg_of_avgs,
            return_per_class=return_per_class,
            k=pml_k,
            label_comparison_fn=label_comparison_fn,
            device=device,
            knn_func=knn_func,
            kmeans_func=kmeans_func,
        )
        # PML metrics first (its order), then nDCG and Recall by k, then plugin metrics
        order = {n: i for i, n in enumerate([*PML_METRICS, *self._metric_k, *self._plugin_metrics])}
        self.original_function_dict = dict(
            sorted(self.original_function_dict.items(), key=lambda kv: order.get(kv[0], len(order)))
        )
        self.curr_function_dict = self.get_function_dict()

    # -- what each metric needs ------------------------------------------------------------
    def requires_knn(self) -> list[str]:
        # PML's list omits mean_reciprocal_rank, so include=("mean_reciprocal_rank",) crashed there
        plugin = [n for n, (_, spec) in self._plugin_metrics.items() if spec.requires_knn]
        return [*_PML_KNN_METRICS, *self._metric_k, *plugin]

    def requires_clustering(self) -> list[str]:
        plugin = [n for n, (_, spec) in self._plugin_metrics.items() if spec.requires_clustering]
        return ["NMI", "AMI", *plugin]

    def _pml_k(
        self, max_bin_count: int, match_counts: torch.Tensor, num_reference: int, ref_includes_query: bool
    ) -> int:
        """The k PML would search for its own metrics (with its warnings), capped by the reference size."""
        available = num_reference - int(ref_includes_query)
        k = super().determine_k(match_counts, num_reference, ref_includes_query) if len(match_counts) else 0
        return max(0, min(int(k), available))

    def _is_ours(self, metric: str) -> bool:
        """Whether ``calculate_<metric>`` is this class's own (not a subclass's override)."""
        own = AccuracyCalculator.__dict__.get(f"calculate_{metric}")
        return own is not None and getattr(type(self), f"calculate_{metric}", None) is own

    def _ranking_metric(self) -> str | None:
        """The metric whose full ranking the blocked pass reproduces for this ``knn_func``, or None."""
        return getattr(self.knn_func, "full_ranking_metric", None)

    def _plan(
        self, metrics: Iterable[str], k_pml: int, max_bin_count: int, available: int, ref_includes_query: bool
    ) -> tuple[int, bool]:
        """``(search_k, rank)``: the neighbours to search, and whether MAP/MRR come from the blocked pass."""
        ranked = ("mean_average_precision", "mean_reciprocal_rank")
        can_rank = self.k is None and self._ranking_metric() is not None
        self_count = int(ref_includes_query)
        needs, rank = [0], False
        for m in metrics:
            if m not in self.requires_knn():
                continue
            if m == "precision_at_1" and self._is_ours(m):
                needs.append(1)
            elif m in _R_METRICS and self._is_ours(m):
                needs.append(min(k_pml, max_bin_count - self_count))  # R-precision masks columns beyond R
            elif m in ranked and self._is_ours(m) and can_rank:
                rank = True
            elif m in self._metric_k:
                needs.append(self._metric_k[m])
            elif m in self._plugin_metrics and self._plugin_metrics[m][1].k is not None:
                want = self._plugin_metrics[m][1].k
                needs.append(max_bin_count - self_count if want == "max_bin_count" else int(want))
            else:  # PML's metrics in a subclass's version, or a subclass's own: PML's columns
                needs.append(k_pml)
        search_k = min(max(1, max(needs)), available)
        return search_k, rank and search_k < k_pml

    # -- the computation -------------------------------------------------------------------
    def get_accuracy(
        self,
        query: Any,
        query_labels: Any,
        reference: Any = None,
        reference_labels: Any = None,
        ref_includes_query: bool = False,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> dict[str, Any]:
        """PML's ``get_accuracy``: a dict from metric name to value (or per-class list)."""
        if reference is None:
            reference, reference_labels, ref_includes_query = query, query_labels, True
        elif reference_labels is None:
            raise ValueError("reference_labels must be given with reference")
        query = _as_embeddings(query, "query", self.device)
        reference = _as_embeddings(reference, "reference", self.device)
        query_labels = _as_labels(query_labels, "query_labels", self.device)
        reference_labels = _as_labels(reference_labels, "reference_labels", self.device)
        if len(query) != len(query_labels) or len(reference) != len(reference_labels):
            raise ValueError("embeddings and labels must have the same length")
        if query.shape[1] != reference.shape[1]:
            raise ValueError(
                f"query and reference must have the same embedding size, got {query.shape[1]} and {reference.shape[1]}"
            )
        if query_labels.shape[1:] != reference_labels.shape[1:]:
            raise ValueError("query_labels and reference_labels must have the same number of label columns")
        if ref_includes_query and not (
            len(reference) >= len(query)
            and _same_or_close(query, reference[: len(query)])
            and torch.equal(query_labels, reference_labels[: len(query)].to(query_labels.dtype))
        ):
            raise ValueError(
                "When ref_includes_query is True, the first len(query) elements of reference must be equal to query.\n"
                "Likewise, the first len(query_labels) elements of reference_labels must be equal to query_labels.\n"
            )
        self.check_primary_metrics(tuple(include), tuple(exclude))
        self.curr_function_dict = self.get_function_dict(include, exclude)
        metrics = self.get_curr_metrics()

        kwargs: dict[str, Any] = {
            "query": query,
            "reference": reference,
            "query_labels": query_labels,
            "reference_labels": reference_labels,
            "ref_includes_query": ref_includes_query,
            "label_comparison_fn": self.label_comparison_fn,
        }
        if any(m in self.requires_knn() for m in metrics):
            kwargs.update(
                self._knn_context(query, query_labels, reference, reference_labels, ref_includes_query, metrics)
            )
        if any(m in self.requires_clustering() for m in metrics):
            kwargs["cluster_labels"] = self.get_cluster_labels(**kwargs)
        return self._get_accuracy(self.curr_function_dict, **kwargs)

    def _knn_context(
        self, query, query_labels, reference, reference_labels, ref_includes_query, metrics
    ) -> dict[str, Any]:
        stats = _label_stats(query_labels, reference_labels, ref_includes_query, self.label_comparison_fn)
        match_counts = stats["label_counts"][1]
        max_bin_count = int(match_counts.max()) if len(match_counts) else 0
        available = len(reference) - int(ref_includes_query)
        k_pml = self._pml_k(max_bin_count, match_counts, len(reference), ref_includes_query)
        search_k, rank = self._plan(metrics, k_pml, max_bin_count, available, ref_includes_query)
        if search_k >= 1:
            knn_distances, knn_indices = self.knn_func(query, search_k, reference, ref_includes_query)
            knn_indices = knn_indices.to(self.device).long()
            knn_distances = knn_distances.to(self.device)
        else:  # a single reference that is the query itself: nothing to retrieve
            knn_distances = torch.zeros(len(query), 0, device=self.device)
            knn_indices = torch.zeros(len(query), 0, dtype=torch.long, device=self.device)
        knn_labels = reference_labels[knn_indices]
        if stats["reference_label_ids"] is not None:
            relevance = stats["reference_label_ids"][knn_indices] == stats["query_group_ids"][:, None]
        else:
            relevance = self.label_comparison_fn(query_labels[:, None], knn_labels).bool()
        if not bool(stats["not_lone_query_mask"].any()):
            c_f.LOGGER.warning("None of the query labels are in the reference set.")
        full_ranking = None
        if rank and bool(stats["not_lone_query_mask"].any()):
            full_ranking = self._full_ranking(
                query, reference, query_labels, reference_labels, ref_includes_query, stats, relevance
            )
        # PML's metrics and subclass metrics see exactly PML's columns; ours read the rest
        pml_labels = knn_labels[:, :k_pml]
        self._pml_knn_labels = pml_labels
        return {
            "label_counts": stats["label_counts"],
            "knn_labels": pml_labels,
            "knn_distances": knn_distances[:, :k_pml],
            "knn_indices": knn_indices[:, :k_pml],
            "lone_query_labels": stats["lone_query_labels"],
            "not_lone_query_mask": stats["not_lone_query_mask"],
            # pml-plugins extras (documented in hookspecs.register_metrics)
            "relevance": relevance,
            "num_relevant": stats["num_relevant"],
            "query_label_ids": stats["query_label_ids"],
            "k": k_pml,
            "searched_knn_labels": knn_labels,
            "searched_knn_distances": knn_distances,
            "searched_knn_indices": knn_indices,
            "full_ranking": full_ranking,
        }

    def _full_ranking(
        self, query, reference, query_labels, reference_labels, ref_includes_query, stats, relevance
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PML's full-ranking MAP numerator and first relevant rank per query (see ``pml_plugins.ranking``).

        When the searched columns are the first columns of the full ranking (FAISS's flat L2
        search orders ties the same way for every k) and labels are compared for equality, a
        query whose relevant references were all found among them is read off the columns; the
        blocked pass ranks only the others.
        """
        queries = None
        prefix_ok = getattr(self.knn_func, "full_ranking_prefix", None)
        use_prefix = (
            stats["reference_label_ids"] is not None
            and callable(prefix_ok)
            and bool(prefix_ok(query.device))
            and relevance.shape[1] > 0
        )
        if use_prefix:
            complete = relevance.sum(1) >= stats["num_relevant"]
            queries = torch.nonzero(~complete & stats["not_lone_query_mask"]).flatten()
        precision_sum, first_rank = full_ranking_precisions(
            query,
            reference,
            _relevance(stats, query_labels, reference_labels, self.label_comparison_fn),
            self._ranking_metric(),
            ref_includes_query,
            queries=queries,
            progress=getattr(self.knn_func, "progress", None),
        )
        if use_prefix:
            cols = torch.arange(1, relevance.shape[1] + 1, device=relevance.device)
            found = torch.cumsum(relevance.long(), 1)
            prefix_sum = torch.where(relevance, found.double() / cols.double(), 0.0).sum(1)
            prefix_first = torch.where(relevance.any(1), torch.argmax(relevance.to(torch.uint8), 1) + 1, 0)
            precision_sum = torch.where(complete, prefix_sum, precision_sum)
            first_rank = torch.where(complete, prefix_first, first_rank)
        return precision_sum, first_rank

    # -- averaging as PML does it ------------------------------------------------------------
    def _average(
        self, per_query: torch.Tensor, mask: torch.Tensor, label_ids: torch.Tensor, unique_labels: torch.Tensor
    ) -> Any:
        """Mean over the queries in ``mask``; per class first with ``avg_of_avgs``/``return_per_class``."""
        values = per_query[mask]
        if values.numel() == 0:
            return pml_ac.nan_accuracy(unique_labels, self.return_per_class)
        if not (self.avg_of_avgs or self.return_per_class):
            return torch.mean(values).item()
        _, group = torch.unique(label_ids[mask], return_inverse=True)  # sorted labels, as PML's per-class order
        sums = torch.zeros(int(group.max()) + 1, dtype=values.dtype, device=values.device).index_add_(0, group, values)
        per_class = sums / torch.bincount(group).to(values.dtype)
        if self.return_per_class:
            return per_class.cpu().tolist()
        return torch.mean(per_class).item()

    def _pml_average(self, per_query: torch.Tensor, **kwargs) -> Any:
        return self._average(
            per_query, kwargs["not_lone_query_mask"], kwargs["query_label_ids"], kwargs["label_counts"][0]
        )

    def _ours(self, knn_labels: Any, kwargs: dict[str, Any]) -> bool:
        """Whether a ``calculate_`` call comes from our ``get_accuracy`` with its own columns (fast
        path); a direct call, or a subclass handing other labels, runs PML's own code."""
        return "relevance" in kwargs and knn_labels is getattr(self, "_pml_knn_labels", None)

    # PML 2.9's signatures, positional order and names; our inputs arrive as keyword arguments
    def calculate_precision_at_1(self, knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs):
        if not self._ours(knn_labels, kwargs):
            return super().calculate_precision_at_1(
                knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs
            )
        relevance = kwargs["relevance"][:, :1]
        return self._pml_average(
            relevance.sum(1).type(torch.float64) / 1,
            not_lone_query_mask=not_lone_query_mask,
            label_counts=label_counts,
            **kwargs,
        )

    def _relevance_mask(self, relevance, num_relevant, k):
        rel = relevance[:, :k]
        cols = torch.arange(rel.shape[1], device=rel.device)
        return rel, cols[None, :] < num_relevant[:, None]

    def calculate_r_precision(
        self, knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts, **kwargs
    ):
        if not self._ours(knn_labels, kwargs):
            return super().calculate_r_precision(
                knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts, **kwargs
            )
        rel, mask = self._relevance_mask(kwargs["relevance"], kwargs["num_relevant"], kwargs["k"])
        matches = torch.sum(rel * mask, dim=1)
        return self._pml_average(
            matches.type(torch.float64) / torch.sum(mask, dim=1),
            not_lone_query_mask=not_lone_query_mask,
            label_counts=label_counts,
            **kwargs,
        )

    def _map(self, at_r: bool, **kwargs):
        relevance, num_relevant, k = kwargs["relevance"], kwargs["num_relevant"], kwargs["k"]
        if not at_r and kwargs.get("full_ranking") is not None:
            return self._pml_average(kwargs["full_ranking"][0] / num_relevant, **kwargs)
        rel, mask = self._relevance_mask(relevance, num_relevant, k)
        equality = rel * mask if at_r else rel
        cumulative_correct = torch.cumsum(equality, dim=1)
        k_idx = torch.arange(1, rel.shape[1] + 1, device=rel.device)
        precision_at_ks = (cumulative_correct * equality).type(torch.float64) / k_idx
        summed = torch.sum(precision_at_ks * mask if at_r else precision_at_ks, dim=1)
        return self._pml_average(summed / num_relevant, **kwargs)

    def calculate_mean_average_precision_at_r(
        self, knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts, **kwargs
    ):
        if not self._ours(knn_labels, kwargs):
            return super().calculate_mean_average_precision_at_r(
                knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts, **kwargs
            )
        return self._map(True, not_lone_query_mask=not_lone_query_mask, label_counts=label_counts, **kwargs)

    def calculate_mean_average_precision(
        self, knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts, **kwargs
    ):
        if not self._ours(knn_labels, kwargs):
            return super().calculate_mean_average_precision(
                knn_labels, query_labels, not_lone_query_mask, ref_includes_query, label_counts, **kwargs
            )
        return self._map(False, not_lone_query_mask=not_lone_query_mask, label_counts=label_counts, **kwargs)

    def calculate_mean_reciprocal_rank(self, knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs):
        if not self._ours(knn_labels, kwargs):
            return super().calculate_mean_reciprocal_rank(
                knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs
            )
        avg = {"not_lone_query_mask": not_lone_query_mask, "label_counts": label_counts, **kwargs}
        if kwargs.get("full_ranking") is not None:
            first = kwargs["full_ranking"][1]
            # float32 like PML's 1 / (argmax + 1.0)
            reciprocal = torch.where(first > 0, 1.0 / first.clamp(min=1).to(torch.float32), torch.zeros(()))
            return self._pml_average(reciprocal, **avg)
        rel = kwargs["relevance"][:, : kwargs["k"]]
        if rel.shape[1] == 0:
            return self._pml_average(torch.zeros(len(rel)), **avg)
        # descending weights make argmax pick the first relevant rank (as PML)
        first = torch.argmax(rel * torch.arange(rel.shape[1], 0, -1, device=rel.device), dim=1) + 1.0
        found = rel.any(dim=1)
        reciprocal = torch.where(found, 1.0 / first, torch.zeros_like(first))
        return self._pml_average(reciprocal, **avg)

    # -- new metrics -------------------------------------------------------------------------
    def _with_extras(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """PML's keyword arguments (``knn_labels``, ``query_labels``, ``label_counts``,
        ``not_lone_query_mask``, ``ref_includes_query``), as PML's own code or tests pass them to
        ``_get_accuracy``, completed with the inputs our metrics read (computed from them)."""
        if "relevance" in kwargs:
            return kwargs
        knn_labels = c_f.numpy_to_torch(kwargs["knn_labels"])
        query_labels = c_f.numpy_to_torch(kwargs["query_labels"]).to(knn_labels.device)
        unique = torch.as_tensor(kwargs["label_counts"][0], device=knn_labels.device)
        counts = torch.as_tensor(kwargs["label_counts"][1], device=knn_labels.device)
        match = c_f.torch_all_from_dim_to_end(query_labels[:, None] == unique[None], 2)  # (Q, labels)
        query_label_ids = torch.argmax(match.to(torch.uint8), dim=1)
        self_count = int(bool(kwargs.get("ref_includes_query", False)))
        num_relevant = torch.where(match.any(1), counts[query_label_ids] - self_count, torch.zeros_like(counts[:1]))
        return {
            **kwargs,
            "knn_labels": knn_labels,
            "query_labels": query_labels,
            "label_counts": (unique, counts),
            "not_lone_query_mask": torch.as_tensor(kwargs["not_lone_query_mask"], device=knn_labels.device),
            "relevance": self.label_comparison_fn(query_labels[:, None], knn_labels).bool(),
            "num_relevant": num_relevant,
            "query_label_ids": query_label_ids,
            "k": knn_labels.shape[1],
            "searched_knn_labels": knn_labels,
            "reference_labels": kwargs.get("reference_labels"),
            "ref_includes_query": bool(kwargs.get("ref_includes_query", False)),
        }

    def _calculate_recall(self, at, **kwargs):
        """Recall@k: 1 when any of the ``at`` nearest references is relevant."""
        kwargs = self._with_extras(kwargs)
        return self._pml_average(kwargs["relevance"][:, :at].any(dim=1).type(torch.float64), **kwargs)

    def _calculate_ndcg(self, at, **kwargs):
        """nDCG@k, eq. 19-20 of the Multi-Proxy Anchor paper."""
        kwargs = self._with_extras(kwargs)
        relevance, num_relevant, searched_knn_labels = (
            kwargs["relevance"],
            kwargs["num_relevant"],
            kwargs["searched_knn_labels"],
        )
        query_labels, reference_labels = kwargs["query_labels"], kwargs["reference_labels"]
        ref_includes_query = kwargs["ref_includes_query"]
        if self.gain_fn is not None and reference_labels is None:
            return pml_ac.nan_accuracy(kwargs["label_counts"][0], self.return_per_class)  # ideal DCG needs them
        device = relevance.device
        discount = 1.0 / torch.log2(torch.arange(2, at + 2, device=device, dtype=torch.float64))  # eq. 19 denominators
        if self.gain_fn is None:
            gains = relevance[:, :at].type(torch.float64)  # 2^r - 1 = r for binary r
            ideal_per_count = torch.cat([discount.new_zeros(1), torch.cumsum(discount, 0)])
            ideal = ideal_per_count[num_relevant.clamp(0, at)]  # min(k, R) relevant items first
        else:
            gains = _gains(self.gain_fn, query_labels[:, None], searched_knn_labels[:, :at])
            ideal = _ideal_dcg(self.gain_fn, query_labels, reference_labels, ref_includes_query, discount)
        dcg = torch.sum(gains * discount[: gains.shape[1]], dim=1)  # eq. 19
        mask = ideal > 0
        if self.gain_fn is None:
            mask = mask & kwargs["not_lone_query_mask"]
        ndcg = dcg / torch.where(mask, ideal, torch.ones_like(ideal))  # eq. 20
        return self._average(ndcg, mask, kwargs["query_label_ids"], kwargs["label_counts"][0])

    def _calculate_plugin_metric(self, name, **kwargs):
        fn, meta = self._plugin_metrics[name]
        if "knn_labels" in kwargs:
            kwargs = self._with_extras(kwargs)
        if "searched_knn_labels" in kwargs:  # a plugin metric sees every searched column (at least its k)
            kwargs = {
                **kwargs,
                "knn_labels": kwargs["searched_knn_labels"],
                "knn_distances": kwargs["searched_knn_distances"],
                "knn_indices": kwargs["searched_knn_indices"],
            }
        value = fn(**kwargs)
        if isinstance(value, torch.Tensor):
            if value.ndim == 1 and len(value) == len(kwargs["query_labels"]):
                value = value.to(kwargs["query_labels"].device)
                mask = ~torch.isnan(value)
                if "not_lone_query_mask" in kwargs:
                    mask &= kwargs["not_lone_query_mask"]
                    ids, unique = kwargs["query_label_ids"], kwargs["label_counts"][0]
                else:
                    unique, ids = torch.unique(kwargs["query_labels"], dim=0, return_inverse=True)
                return self._average(value, mask, ids, unique)
            if value.numel() == 1:
                return value.item()
        return value


def _same_or_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """PML's ``torch.allclose`` check, skipped when both views are the same memory (leave-one-out)."""
    if a.shape == b.shape and a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return torch.equal(a, b) or torch.allclose(a, b)


# -- label statistics ----------------------------------------------------------------------------
def _unique(x: torch.Tensor, **kw: Any):
    return torch.unique(x, dim=0, **kw) if x.ndim > 1 else torch.unique(x, **kw)


def _label_stats(
    query_labels: torch.Tensor, reference_labels: torch.Tensor, ref_includes_query: bool, label_comparison_fn: Callable
) -> dict[str, Any]:
    """Per-query relevant counts, PML's ``label_counts`` and lone queries, in O(N log N).

    PML builds a (unique query labels x N) comparison matrix for this; sorting the
    concatenated labels once gives the same counts.
    """
    num_query = len(query_labels)
    self_count = int(ref_includes_query)
    if label_comparison_fn is pml_ac.EQUALITY:
        both = torch.cat([query_labels, reference_labels.to(query_labels.dtype)])
        uniq, inverse = _unique(both, return_inverse=True)
        query_ids, reference_ids = inverse[:num_query], inverse[num_query:]
        reference_counts = torch.bincount(reference_ids, minlength=len(uniq))
        # the query labels among the sorted unique labels, in O(N) (no second sort)
        present = torch.bincount(query_ids, minlength=len(uniq)) > 0
        unique_query_ids = torch.nonzero(present).flatten()
        query_label_ids = (torch.cumsum(present, 0) - 1)[query_ids]
        unique_query_labels = uniq[unique_query_ids]
        match_counts = reference_counts[unique_query_ids]
        lone = match_counts - self_count <= 0  # a label always equals itself
        return _finish(
            unique_query_labels,
            match_counts,
            lone,
            query_label_ids,
            self_count,
            query_group_ids=query_ids,
            reference_label_ids=reference_ids,
        )
    unique_query_labels, query_label_ids = _unique(query_labels, return_inverse=True)
    match_counts = torch.empty(len(unique_query_labels), dtype=torch.long, device=query_labels.device)
    step = max(1, _BLOCK_ELEMENTS // max(1, len(reference_labels)))
    for start in range(0, len(unique_query_labels), step):  # blocks of labels, not queries: bounded memory
        block = unique_query_labels[start : start + step]
        match_counts[start : start + len(block)] = label_comparison_fn(block[:, None], reference_labels[None]).sum(1)
    if ref_includes_query:
        matches_itself = label_comparison_fn(unique_query_labels, unique_query_labels)
        lone = match_counts - matches_itself.long() <= 0
    else:
        lone = match_counts == 0
    return _finish(unique_query_labels, match_counts, lone, query_label_ids, self_count)


def _finish(
    unique_query_labels, match_counts, lone, query_label_ids, self_count, query_group_ids=None, reference_label_ids=None
) -> dict[str, Any]:
    return {
        "label_counts": (unique_query_labels, match_counts),
        "lone_query_labels": unique_query_labels[lone],
        "not_lone_query_mask": ~lone[query_label_ids],
        "num_relevant": match_counts[query_label_ids] - self_count,  # PML's count_per_query
        "query_label_ids": query_label_ids,
        "query_group_ids": query_group_ids,
        "reference_label_ids": reference_label_ids,
    }


def _relevance(
    stats: dict[str, Any], query_labels: torch.Tensor, reference_labels: torch.Tensor, label_comparison_fn: Callable
) -> Relevance:
    """Which references are relevant to which queries, for the ranking pass."""
    if stats["reference_label_ids"] is not None:
        return Relevance.by_ids(stats["query_group_ids"], stats["reference_label_ids"])
    return Relevance.by_mask(lambda ids: label_comparison_fn(query_labels[ids][:, None], reference_labels[None]).bool())


# -- graded relevance ------------------------------------------------------------------------------
def _gains(gain_fn: Callable, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    g = gain_fn(a, b)
    if not isinstance(g, torch.Tensor):
        g = torch.as_tensor(g)
    return g.to(device=a.device, dtype=torch.float64)


def _ideal_dcg(
    gain_fn: Callable,
    query_labels: torch.Tensor,
    reference_labels: torch.Tensor,
    ref_includes_query: bool,
    discount: torch.Tensor,
) -> torch.Tensor:
    """DCG_best(k) per query for graded gains: the k largest gains over all references.

    Gains depend on labels only, so this runs on unique labels: for each unique query label,
    sort the gains of the unique reference labels, weight them by how many references carry
    each label (minus the query itself), and read the gain at ranks 1..k from the cumulative
    counts.
    """
    at = len(discount)
    reference_labels = reference_labels.to(query_labels.dtype)
    uq, q_inverse = _unique(query_labels, return_inverse=True)
    ur, r_counts = _unique(reference_labels, return_counts=True)
    if ref_includes_query:
        # position of each unique query label among the unique reference labels
        _, joint = _unique(torch.cat([uq, ur]), return_inverse=True)
        pos_of = torch.full((int(joint.max()) + 1,), -1, dtype=torch.long, device=uq.device)
        pos_of[joint[len(uq) :]] = torch.arange(len(ur), device=uq.device)
        self_pos = pos_of[joint[: len(uq)]]
    ranks = torch.arange(at, device=uq.device)
    ideal_unique = torch.empty(len(uq), dtype=torch.float64, device=uq.device)
    step = max(1, _BLOCK_ELEMENTS // max(1, len(ur)))
    for start in range(0, len(uq), step):  # blocks of unique labels: bounded memory
        block = uq[start : start + step]
        gains = _gains(gain_fn, block[:, None], ur[None]).expand(len(block), len(ur))
        counts = r_counts[None].expand(len(block), -1).clone()
        if ref_includes_query:
            rows = torch.arange(len(block), device=uq.device)
            counts[rows, self_pos[start : start + len(block)]] -= 1
        order = torch.argsort(gains, dim=1, descending=True)
        sorted_gains = torch.gather(gains, 1, order)
        cum = torch.cumsum(torch.gather(counts, 1, order), dim=1)
        slot = torch.searchsorted(cum, ranks.expand(len(block), -1).contiguous(), right=True)
        top = torch.where(
            slot < len(ur),
            torch.gather(sorted_gains, 1, slot.clamp(max=len(ur) - 1)),
            torch.zeros((), dtype=torch.float64, device=uq.device),
        )
        ideal_unique[start : start + len(block)] = torch.sum(top * discount, dim=1)
    return ideal_unique[q_inverse]


# -- plugin metrics --------------------------------------------------------------------------------
def _registered_metrics(selection: bool | Iterable[str], taken: set[str]) -> dict[str, tuple[Callable, Any]]:
    """Metrics from the registry, by the name they appear under in the calculator."""
    if selection is False or selection is None:
        return {}
    from . import registry as reg

    out: dict[str, tuple[Callable, Any]] = {}
    if selection is True:
        names = reg.registry.names("metric")
    else:
        names = [selection] if isinstance(selection, str) else list(selection)
    for name in names:
        entry = reg.registry.get_entry("metric", name)
        key = entry.name if selection is True else reg.normalize_name(name)
        if key in taken or ":" in name:
            key = entry.qualified_name  # built-in names win; the plugin's stays reachable as plugin:name
        obj = entry.obj
        if inspect.isclass(obj):
            obj = obj()
        spec = entry.spec
        k = spec.k
        if k is not None and k != "max_bin_count" and not (isinstance(k, int) and k > 0):
            warnings.warn(
                f"metric {entry.qualified_name!r}: MetricSpec.k must be a positive int or 'max_bin_count', "
                f"got {k!r}; ignored",
                RuntimeWarning,
                stacklevel=3,
            )
            spec = spec.replace(k=None)
        out[key] = (obj, spec)
    return out
