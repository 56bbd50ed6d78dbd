"""DMCAC: divergence minimisation and cross-attention classification over a database.

Trivedy & Latecki, "Image Retrieval with Self-Supervised Divergence Minimization and
Cross-Attention Classification". Equation numbers below are the paper's.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.utils import common_functions as c_f

import pml_plugins
from pml_plugins.validation import check_choice, check_non_negative_float, check_positive_float, check_positive_int

from .divergence import frobenius_from_js, pairwise_js_divergence_from_log
from .retrieval import cosine_topk, union_from_indices_tuple, union_of_view_neighbours

RETRIEVAL_MODES = ("approximate", "full")


class DMCACLoss(WeightRegularizerMixin, BaseMetricLossFunction):
    """L_total = frob_weight * L_frob + ce_weight * L_ce + cac_weight * L_cac (eq. 20), per query.

    Embeddings come as B queries x A views (B*A rows, the A views of a query consecutive,
    view 0 the original); labels per row, equal within a query. The database is held by the
    loss (:meth:`set_database`) or passed per call as ``ref_emb``/``ref_labels``; without
    either, the other queries' rows of the batch serve as the database (never a query's own
    views). Sub-losses are per query (``reduction_type="element"``), so the default
    ``MeanReducer`` averages the total over the B queries.

    Args:
        num_classes: c, classes of the two linear classifiers (eq. 14, 18).
        embedding_size: F, the embedding width (attention projections are F x F, eq. 16).
        num_views: A, rows per query in a batch (the paper's default 6).
        k: top-k database rows retrieved per view in approximate retrieval (paper: 12).
        temperature: divides ``Z_A Z_S^T`` before the row softmax of eq. 9-10 (paper: 1).
        frob_weight, ce_weight, cac_weight: beta_frob, beta_ce, beta_cac of eq. 20.
        retrieval: ``"approximate"`` (top-k per view, union over views, rows as constants) or
            ``"full"`` (every database row, with gradient when ``ref_emb`` requires grad, or
            through the encoder when a :class:`~pml_plugin_dmcac.DatabaseEncoder` is attached
            with :meth:`set_database_encoder`, as the main job does; a database set with
            :meth:`set_database` is a constant).
        **kwargs: PML's ``reducer``, ``weight_init_func``, ``weight_regularizer`` (applied to
            the CE classifier), ``embedding_regularizer``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        num_views: int = 6,
        k: int = 12,
        temperature: float = 1.0,
        frob_weight: float = 1.0,
        ce_weight: float = 1.0,
        cac_weight: float = 1.0,
        retrieval: str = "approximate",
        **kwargs: Any,
    ):
        for name, value in (
            ("num_classes", num_classes),
            ("embedding_size", embedding_size),
            ("num_views", num_views),
            ("k", k),
        ):
            check_positive_int(name, value)
        check_positive_float("temperature", temperature)
        for name, value in (("frob_weight", frob_weight), ("ce_weight", ce_weight), ("cac_weight", cac_weight)):
            check_non_negative_float(name, value)
        check_choice("retrieval", retrieval, RETRIEVAL_MODES)
        distance = kwargs.get("distance")
        if distance is not None and type(distance) is not CosineSimilarity:
            raise ValueError(
                "DMCACLoss uses cosine similarity (eq. 9, unit-norm embeddings); distance must be CosineSimilarity()"
            )
        super().__init__(**kwargs)
        self.num_classes, self.embedding_size, self.num_views, self.k = num_classes, embedding_size, num_views, k
        self.temperature, self.retrieval = float(temperature), retrieval
        self.frob_weight, self.ce_weight, self.cac_weight = float(frob_weight), float(ce_weight), float(cac_weight)
        # eq. 14: the plain CE classifier; a separate matrix from the attention's W_q of eq. 16
        self.ce_W = torch.nn.Parameter(torch.Tensor(num_classes, embedding_size))
        # eq. 16: F x F query / key / value projections (stored (out, in) like torch.nn.Linear)
        self.query_W = torch.nn.Parameter(torch.Tensor(embedding_size, embedding_size))
        self.key_W = torch.nn.Parameter(torch.Tensor(embedding_size, embedding_size))
        self.value_W = torch.nn.Parameter(torch.Tensor(embedding_size, embedding_size))
        # eq. 18: W_c, the classifier on the attended representation z'
        self.cac_W = torch.nn.Parameter(torch.Tensor(num_classes, embedding_size))
        for weight in (self.ce_W, self.query_W, self.key_W, self.value_W, self.cac_W):
            self.weight_init_func(weight)
        # the database moves with .to() but stays out of state_dict: it is re-embedded, can be
        # large, and its size changes between refreshes
        self.register_buffer("db_embeddings", torch.empty(0, embedding_size), persistent=False)
        self.register_buffer("db_labels", torch.empty(0, dtype=torch.long), persistent=False)
        self.db_index: Optional[Any] = None
        self.db_encoder: Optional[Any] = None
        self.avg_union_size = 0.0
        self.add_to_recordable_attributes(
            list_of_names=[
                "num_classes",
                "embedding_size",
                "num_views",
                "k",
                "temperature",
                "frob_weight",
                "ce_weight",
                "cac_weight",
            ],
            is_stat=False,
        )
        self.add_to_recordable_attributes(list_of_names=["avg_union_size"], is_stat=True)

    def get_default_weight_init_func(self):
        # torch.nn.Linear's default: the attention starts near uniform, logits near zero
        return c_f.TorchInitWrapper(torch.nn.init.kaiming_uniform_, a=math.sqrt(5))

    def get_default_distance(self):
        return CosineSimilarity()

    def _sub_loss_names(self):
        return ["frob_loss", "ce_loss", "cac_loss"]

    # ------------------------------------------------------------------ database
    @property
    def has_database(self) -> bool:
        return self.db_embeddings.shape[0] > 0

    @torch.no_grad()
    def set_database(self, embeddings: torch.Tensor, labels: torch.Tensor, index: Optional[Any] = None) -> None:
        """Hold the training database Z_D (eq. 3-4): L2-normalised, detached, float32 buffers.

        Args:
            embeddings: ``(D, embedding_size)`` database embeddings.
            labels: ``(D,)`` their labels (kept for inspection; the loss itself does not use them).
            index: optional FAISS-like index over these rows (``search(x, k) -> (D, I)``), e.g.
                an IVF index; used for approximate retrieval instead of the core's kNN layer.
        """
        pml_plugins.check_embeddings_and_labels(
            embeddings,
            labels,
            embedding_size=self.embedding_size,
            embeddings_name="database embeddings",
            labels_name="database labels",
        )
        if embeddings.shape[0] == 0:
            raise ValueError("database embeddings must have at least one row")
        device = self.db_embeddings.device
        self.db_embeddings = F.normalize(embeddings.detach().float(), dim=1).to(device)
        self.db_labels = labels.detach().long().to(device)
        self.db_index = index

    def clear_database(self) -> None:
        """Forget the database and any encoder (the batch then serves as its own database)."""
        self.db_embeddings = self.db_embeddings.new_empty(0, self.embedding_size)
        self.db_labels = self.db_labels.new_empty(0)
        self.db_index = None
        self.db_encoder = None

    def set_database_encoder(self, encoder: Any) -> None:
        """Full retrieval end to end (eq. 6): every call embeds the database with the current
        encoder and the loss's gradient flows back into the encoder through every row.

        Args:
            encoder: a :class:`~pml_plugin_dmcac.DatabaseEncoder` (anything with ``rows()``
                returning a differentiable ``(D, embedding_size)`` tensor), or None to detach it.
        Only for ``retrieval="full"``: approximate retrieval treats the rows as constants anyway.
        """
        if encoder is not None and self.retrieval != "full":
            raise ValueError(
                'set_database_encoder needs retrieval="full" (approximate retrieval treats the '
                "retrieved rows as constants, section 3.4); use set_database for it"
            )
        if encoder is not None and not callable(getattr(encoder, "rows", None)):
            raise TypeError(
                f"encoder must have a rows() method returning the database rows, got {type(encoder).__name__}"
            )
        self.db_encoder = encoder

    # ------------------------------------------------------------------ forward
    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        pml_plugins.check_embeddings_and_labels(
            embeddings, labels, num_classes=self.num_classes, embedding_size=self.embedding_size
        )
        rows = embeddings.shape[0]
        if rows % self.num_views:
            raise ValueError(
                f"embeddings must hold B queries x num_views={self.num_views} views (B*A rows, views "
                f"consecutive); got {rows} rows, not a multiple of {self.num_views}"
            )
        per_query = labels.view(-1, self.num_views)
        if not bool((per_query == per_query[:, :1]).all()):
            bad = torch.nonzero((per_query != per_query[:, :1]).any(1)).flatten()[:5].tolist()
            raise ValueError(
                f"labels must be equal within each query's {self.num_views} consecutive views "
                f"(B*A layout); queries {bad} mix labels"
            )
        if ref_emb is not None and ref_emb is not embeddings:
            pml_plugins.check_embeddings_and_labels(
                ref_emb,
                ref_labels,
                embedding_size=self.embedding_size,
                labels_required=False,
                embeddings_name="ref_emb",
                labels_name="ref_labels",
            )
            if ref_emb.shape[0] == 0:
                raise ValueError("ref_emb must have at least one row")
        if indices_tuple is not None and (ref_emb is None or ref_emb is embeddings):
            raise ValueError(
                "indices_tuple is not supported without ref_emb: DMCACLoss reads it as links from each "
                "row to ref_emb rows (pass DatabaseKNNMiner(k)(emb, labels, ref_emb, ref_labels) with the same ref_emb)"
            )
        return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Eq. 14 before the softmax: the CE classifier's logits of the L2-normalised embeddings."""
        z = F.normalize(embeddings, dim=1)
        return F.linear(z, c_f.to_dtype(self.ce_W, dtype=z.dtype))

    def _reference(self, z: torch.Tensor, embeddings: torch.Tensor, ref_emb: torch.Tensor):
        """(reference rows R_all, FAISS-like index or None, whether R_all is the batch itself)."""
        if ref_emb is not embeddings:
            return F.normalize(ref_emb.to(z.dtype), dim=1), None, False
        if self.db_encoder is not None and self.retrieval == "full":
            rows = self.db_encoder.rows().to(device=z.device)
            if rows.ndim != 2 or rows.shape[1] != self.embedding_size:
                raise ValueError(
                    f"the database encoder must give (D, {self.embedding_size}) rows, got {tuple(rows.shape)}"
                )
            return F.normalize(rows.to(z.dtype), dim=1), None, False
        if self.has_database:
            return self.db_embeddings.to(device=z.device, dtype=z.dtype), self.db_index, False
        return z, None, True

    def _columns(self, z, ref_all, index, in_batch, indices_tuple, num_queries):
        """The columns each query's views are scored against (eq. 6 or eq. 8-9).

        Returns ``(R, mask)``: either shared rows ``(N, F)`` with a ``(B, N)`` mask or None
        (full retrieval), or per-query rows ``(B, T, F)`` with a ``(B, T)`` mask (the padded union).
        """
        A, n_ref = self.num_views, ref_all.shape[0]
        full = self.retrieval == "full"
        own = None
        if in_batch:  # a query never retrieves its own views
            q_of_row = torch.arange(n_ref, device=z.device) // A
            own = q_of_row[None, :] == torch.arange(num_queries, device=z.device)[:, None]  # (B, N)
        if indices_tuple is not None:  # the miner's links replace the retrieval (eq. 8 union)
            idx, valid = union_from_indices_tuple(indices_tuple, A, z.shape[0], n_ref)
        elif full:  # eq. 6: all database rows, gradient flows into ref_emb when it has one
            return ref_all, (None if own is None else ~own)
        elif in_batch:
            sim = (z @ z.T).detach().view(num_queries, A, n_ref)
            sim = sim.masked_fill(own[:, None, :], float("-inf")).view(num_queries * A, n_ref)
            vals, nbr = sim.topk(min(self.k, n_ref - A), dim=1)
            idx, valid = union_of_view_neighbours(nbr, torch.isfinite(vals), A, n_ref)
        else:  # top-k per view through the kNN layer / the given index, then eq. 8
            nbr, ok = cosine_topk(z, ref_all, self.k, index=index)
            idx, valid = union_of_view_neighbours(nbr, ok, A, n_ref)
        rows = ref_all if full else ref_all.detach()  # approximate: gathered rows are constants
        return rows[idx], valid

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        A = self.num_views
        B = embeddings.shape[0] // A
        # half precision: compute in float32 (softmaxes over many rows), cast the losses back
        cdtype = torch.float32 if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings.dtype
        z = F.normalize(embeddings.to(cdtype), dim=1)  # eq. 5 + unit ball: dot products are cosines
        Z = z.view(B, A, -1)
        ref_all, index, in_batch = self._reference(z, embeddings, ref_emb)
        R, mask = self._columns(z, ref_all, index, in_batch, indices_tuple, B)
        shared = R.ndim == 2
        if mask is None:
            mask = torch.ones(B, R.shape[0], dtype=torch.bool, device=z.device)
        self.avg_union_size = float(mask.sum(1).float().mean()) if mask.numel() else 0.0
        col_mask = mask[:, None, :]  # all views of a query share the columns S
        very_negative = torch.finfo(cdtype).min / 4  # finite: keeps log-space values and grads finite

        # eq. 9-10: P' = row-softmax(Z_A Z_S^T / temperature), masked to the query's union
        sims = torch.einsum("baf,nf->ban", Z, R) if shared else torch.einsum("baf,btf->bat", Z, R)
        sims = sims.to(cdtype)  # autocast may hand back float16, where the mask value overflows
        log_p = torch.log_softmax((sims / self.temperature).masked_fill(~col_mask, very_negative), dim=-1)
        # eq. 11-13: L_frob = sqrt(sum_{i>j} JS(P'_i, P'_j)^2 + eps)
        frob = frobenius_from_js(pairwise_js_divergence_from_log(log_p, col_mask))

        # eq. 14-15: a linear classifier on every view, CE with the query's label, summed over views
        ce_W = c_f.to_dtype(self.ce_W, dtype=cdtype)
        ce = F.cross_entropy(F.linear(z, ce_W), labels, reduction="none").view(B, A).sum(1)

        # eq. 16-17: cross-attention of each view over Z_S, scaled by sqrt(F). Reassociated:
        # Q K^T = (Q W_k) Z_S^T and softmax(.) V = (softmax(.) Z_S) W_v^T, so the F x F
        # projections act on the A views instead of the T >= A gathered rows (same values)
        Wq, Wk, Wv, Wc = (c_f.to_dtype(w, dtype=cdtype) for w in (self.query_W, self.key_W, self.value_W, self.cac_W))
        QWk = F.linear(Z, Wq) @ Wk  # rows are Q W_k, so (Q W_k) z_s = Q . (W_k z_s)
        att = torch.einsum("baf,nf->ban", QWk, R) if shared else torch.einsum("baf,btf->bat", QWk, R)
        att = (att.to(cdtype) / math.sqrt(self.embedding_size)).masked_fill(~col_mask, very_negative)
        att = torch.softmax(att, dim=-1)
        att = att * col_mask  # a query without database rows attends to nothing: z' = 0
        mixed = torch.einsum("ban,nf->baf", att, R) if shared else torch.einsum("bat,btf->baf", att, R)
        z_att = F.linear(mixed, Wv)  # sum_s a_s (W_v z_s) = W_v (sum_s a_s z_s)
        # eq. 18-19: W_c on z', CE with the query's label, summed over views
        cac = F.cross_entropy(F.linear(z_att, Wc).reshape(B * A, -1), labels, reduction="none").view(B, A).sum(1)

        out_dtype = embeddings.dtype
        indices = torch.arange(B, device=embeddings.device) * A  # each query's original view
        loss_dict = {
            name: {"losses": (weight * value).to(out_dtype), "indices": indices, "reduction_type": "element"}
            for name, weight, value in (
                ("frob_loss", self.frob_weight, frob),
                ("ce_loss", self.ce_weight, ce),
                ("cac_loss", self.cac_weight, cac),
            )
        }
        self.add_weight_regularization_to_loss_dict(loss_dict, self.ce_W)
        return loss_dict
