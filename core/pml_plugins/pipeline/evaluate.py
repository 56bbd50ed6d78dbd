"""Evaluation: PML's ``GlobalEmbeddingSpaceTester`` with the project's ``AccuracyCalculator``.

The test split is queried against itself (each query excluded from its own neighbours), the
standard deep-metric-learning protocol; or, given a ``gallery``, a query set is searched in a
separate gallery set (``ref_includes_query=False``), In-Shop's protocol. Besides Recall@k,
nDCG@k, MAP@R and P@1 the reported metrics include PML's ``mean_average_precision`` (the mAP
CAM reports) and ``NMI`` (k-means clustering, the Group Loss's metric), under PML's names.
``retrieval_distance`` (from the loss's registry entry) picks the geometry: ``"cosine"``
L2-normalises the embeddings before the kNN; ``"euclidean"`` (losses such as Class Anchor Margin
that shape an unnormalised space) searches with L2 distance on the raw embeddings.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import tqdm
from pytorch_metric_learning.testers import GlobalEmbeddingSpaceTester

DEFAULT_KS = (1, 2, 4, 8)
RETRIEVAL_DISTANCES = ("cosine", "euclidean")


def make_accuracy_calculator(
    ks: Sequence[int] = DEFAULT_KS, retrieval_distance: str = "cosine", device: torch.device | None = None
) -> Any:
    """The one place that chooses the accuracy calculator (Recall@k, nDCG@k, MAP@R, mAP, NMI, P@1)."""
    if retrieval_distance not in RETRIEVAL_DISTANCES:
        raise ValueError(f"retrieval_distance must be one of {RETRIEVAL_DISTANCES}, got {retrieval_distance!r}")
    include = (
        "precision_at_1",
        "mean_average_precision_at_r",
        "mean_average_precision",
        "r_precision",
        "NMI",
        *[f"recall_at_{k}" for k in ks],
        *[f"ndcg_at_{k}" for k in ks],
    )
    from ..knn import KNN
    from ..metrics import AccuracyCalculator

    # one kNN layer for the whole toolkit (pml_plugins.knn); cosine: the tester L2-normalises
    # first, so both rankings are exact L2 / cosine kNN
    return AccuracyCalculator(
        include=include,
        k="max_bin_count",
        device=device,
        knn_func=KNN(metric=retrieval_distance),
        ndcg_ks=tuple(ks),
        recall_ks=tuple(ks),
        plugin_metrics=False,
    )


class _QuietTester(GlobalEmbeddingSpaceTester):
    """PML's tester with a tqdm bar that can be hidden and does not stay on screen."""

    def __init__(
        self,
        *args: Any,
        progress: bool = True,
        desc: str = "embedding test split",
        binarize: bool = False,
        **kwargs: Any,
    ):
        self._progress, self._desc, self._binarize = progress, desc, binarize
        super().__init__(*args, **kwargs)

    def compute_all_embeddings(self, dataloader, trunk_model, embedder_model):
        original = tqdm.tqdm
        bar = lambda it, *a, **k: original(
            it, desc=self._desc, leave=False, disable=not self._progress, dynamic_ncols=True
        )
        tqdm.tqdm = bar  # PML's base tester calls tqdm.tqdm(dataloader) directly
        try:
            embeddings, labels = super().compute_all_embeddings(dataloader, trunk_model, embedder_model)
        finally:
            tqdm.tqdm = original
        if self._binarize:  # before the tester's L2 normalisation; codes of norm sqrt(D) become 1/sqrt(D)
            from ..binarize import binarize_embeddings

            embeddings = binarize_embeddings(embeddings)
        return embeddings, labels


#: MAP@R gets its short name; mAP and NMI keep PML's names (``mean_average_precision``, ``NMI``)
_NAMES = {"mean_average_precision_at_r": "map_at_r"}


def standard_metric_name(name: str) -> str:
    """``recall_at_1_level0`` -> ``recall_at_1``; ``mean_average_precision_at_r`` -> ``map_at_r``; others
    keep PML's names."""
    if name.endswith("_level0"):
        name = name[: -len("_level0")]
    return _NAMES.get(name, name)


def evaluate(
    trunk: torch.nn.Module,
    embedder: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    device: torch.device,
    retrieval_distance: str = "cosine",
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 256,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    binarize: bool = False,
    with_bits: bool = False,
    keep: Optional[dict] = None,
    gallery: torch.utils.data.Dataset | None = None,
) -> dict[str, float]:
    """Embed ``dataset`` and return retrieval metrics, test split queried against itself, or,
    with ``gallery``, ``dataset`` as the query set searched in ``gallery`` (``ref_includes_query``
    False: a query's own row is never excluded, the gallery holds other images). NMI then
    clusters the query set.

    ``binarize=True`` evaluates the ±1 codes of :func:`pml_plugins.binarize_embeddings`
    instead (cosine of codes = 1 - 2 Hamming / D, so the ranking is by Hamming distance; needs
    ``retrieval_distance="cosine"``). ``with_bits=True`` evaluates the float embeddings and
    then, from the same embedding pass, their codes, reported as ``bits_<metric>``. A ``keep`` dict
    receives the evaluated ``embeddings`` (L2-normalised for cosine) and ``labels`` (N,) as tensors.
    """
    if retrieval_distance not in RETRIEVAL_DISTANCES:
        raise ValueError(f"retrieval_distance must be one of {RETRIEVAL_DISTANCES}, got {retrieval_distance!r}")
    if binarize and retrieval_distance != "cosine":
        raise ValueError(
            f"binarize=True ranks codes by Hamming distance: retrieval_distance must be 'cosine', "
            f"got {retrieval_distance!r}"
        )
    calculator = make_accuracy_calculator(ks, retrieval_distance, device=device)
    kept: dict = {}  # the embeddings of the pass, for with_bits (PML's tester deletes them after its hook)
    tester = _QuietTester(
        normalize_embeddings=retrieval_distance == "cosine",
        batch_size=batch_size,
        dataloader_num_workers=0,
        data_device=device,
        dtype=dtype,
        accuracy_calculator=calculator,
        end_of_testing_hook=lambda tester: kept.update(
            tester.embeddings_and_labels if with_bits or keep is not None else {}
        ),
        progress=progress,
        binarize=binarize,
        desc="embedding test split" + (" (bits)" if binarize else ""),
    )
    if gallery is None:
        accuracies = tester.test({"test": dataset}, 0, trunk, embedder, splits_to_eval=[("test", ["test"])])
        query_key = "test"
    else:  # PML: a query split absent from the reference list -> ref_includes_query=False
        accuracies = tester.test(
            {"query": dataset, "gallery": gallery}, 0, trunk, embedder, splits_to_eval=[("query", ["gallery"])]
        )
        query_key = "query"
    out = {standard_metric_name(key): float(value) for key, value in accuracies[query_key].items() if key != "epoch"}
    if keep is not None and gallery is None:  # the report's gallery and map re-rank the test split itself
        embeddings, labels = kept["test"]
        keep.update(embeddings=embeddings, labels=labels[:, 0] if labels.ndim == 2 else labels)
    if with_bits and not binarize:
        from ..binarize import binarize_embeddings

        # L2-normalised for cosine, which leaves the codes unchanged (the sign of x - mean(x) is
        # scale-invariant)
        embeddings, labels = kept[query_key]
        flat = lambda y: y[:, 0] if y.ndim == 2 else y
        if gallery is None:
            bits = make_accuracy_calculator(ks, "cosine", device=device).get_accuracy(
                binarize_embeddings(embeddings), flat(labels)
            )
        else:
            ref, ref_labels = kept["gallery"]
            bits = make_accuracy_calculator(ks, "cosine", device=device).get_accuracy(
                binarize_embeddings(embeddings),
                flat(labels),
                binarize_embeddings(ref),
                flat(ref_labels),
                ref_includes_query=False,
            )
        out.update({f"bits_{standard_metric_name(key)}": float(value) for key, value in bits.items()})
    return out


__all__ = ["evaluate", "make_accuracy_calculator", "standard_metric_name", "DEFAULT_KS", "RETRIEVAL_DISTANCES"]
