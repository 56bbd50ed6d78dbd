"""DatabaseKNNMiner: link each embedding to its k nearest reference (database) rows."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.miners import BaseMiner

import pml_plugins
from pml_plugins.validation import check_positive_int

from .retrieval import cosine_topk


class DatabaseKNNMiner(BaseMiner):
    """PML pair tuple ``(a1, p, a2, n)``: each embedding row with its k nearest ``ref_emb`` rows
    (by the miner's PML distance, cosine by default), split into same-label (a1, p) and
    different-label (a2, n) pairs.

    Without ``ref_emb`` the batch is its own reference and a row never pairs with itself
    (PML's convention). The tuple works with PML's pair losses
    (``ContrastiveLoss()(emb, labels, tuple, ref_emb, ref_labels)``) and, passed with the same
    ``ref_emb``, replaces :class:`DMCACLoss`'s own top-k retrieval (the union of eq. 8).

    Args:
        k: neighbours per embedding row (the paper's k = 12 for DMCAC).
        **kwargs: PML's ``distance`` (default ``CosineSimilarity()``).
    """

    def __init__(self, k: int = 12, **kwargs: Any):
        check_positive_int("k", k)
        super().__init__(**kwargs)
        self.k = k
        self.add_to_recordable_attributes(list_of_names=["k"], is_stat=False)

    def get_default_distance(self):
        return CosineSimilarity()

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        pml_plugins.check_embeddings_and_labels(embeddings, labels)
        if ref_emb is not None:
            pml_plugins.check_embeddings_and_labels(
                ref_emb,
                ref_labels,
                embedding_size=embeddings.shape[1],
                embeddings_name="ref_emb",
                labels_name="ref_labels",
            )
        return super().forward(embeddings, labels, ref_emb, ref_labels)

    def _neighbours(self, embeddings, ref_emb, self_ref: bool):
        """Top-k reference indices ``(N, k')`` and a validity mask (False for excluded self-matches)."""
        n, n_ref = embeddings.shape[0], ref_emb.shape[0]
        k = min(self.k, n_ref - 1 if self_ref else n_ref)
        if k <= 0:
            empty = torch.empty(n, 0, dtype=torch.long, device=embeddings.device)
            return empty, empty.bool()
        if type(self.distance) is CosineSimilarity and not self_ref:
            return cosine_topk(embeddings, ref_emb, k)  # the core's kNN layer: FAISS for big databases
        dtype = torch.float32 if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings.dtype
        mat = self.distance(embeddings.to(dtype), ref_emb.to(dtype))
        if self_ref:  # never pair a row with itself
            worst = float("-inf") if self.distance.is_inverted else float("inf")
            mat = mat.clone().fill_diagonal_(worst)
        _, idx = mat.topk(k, dim=1, largest=self.distance.is_inverted)
        return idx, torch.ones_like(idx, dtype=torch.bool)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        self_ref = ref_emb is embeddings
        idx, valid = self._neighbours(embeddings, ref_emb, self_ref)
        rows = torch.arange(embeddings.shape[0], device=embeddings.device)[:, None].expand_as(idx)
        rows, idx = rows[valid], idx[valid]
        same = labels[rows] == ref_labels.to(labels.device)[idx]
        return rows[same], idx[same], rows[~same], idx[~same]
