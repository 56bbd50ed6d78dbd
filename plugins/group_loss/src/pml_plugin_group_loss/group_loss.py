"""GroupLoss: replicator-dynamics label propagation over the mini-batch (Elezi et al., ECCV 2020)."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.utils import common_functions as c_f

import pml_plugins
from pml_plugins.validation import (
    check_non_negative_float,
    check_non_negative_int,
    check_positive_float,
    check_positive_int,
)

from .functional import class_ranks, group_nll, initial_assignment, pearson_similarity, replicator_dynamics


class GroupLossBatchWarning(UserWarning):
    """The batch is not m-per-class with several classes; the Group Loss then has little to propagate."""


class GroupLoss(WeightRegularizerMixin, BaseMetricLossFunction):
    """The Group Loss (Elezi et al., "The Group Loss for Deep Metric Learning", ECCV 2020).

    Per batch (Algorithm 1): prior X(0) = softmax(classifier(embeddings) / temperature) (eq. 9),
    with the first ``num_anchors`` samples of every class replaced by one-hot rows (section 3.2);
    W = ReLU'd Pearson correlation of the embeddings (eq. 1, appendix G); ``num_iterations`` steps
    of replicator dynamics (eq. 2-6); loss = mean over the batch of -log(X(T)[i, y_i] + 1e-12)
    (section 3.4) + ``ce_weight`` * mean cross-entropy of the raw classifier logits (not in the
    paper: the authors' released code adds it; ``ce_weight=0`` gives the paper's loss).

    Args:
        num_classes: number of training classes C (the classifier's outputs).
        embedding_size: embedding dimension (the classifier's inputs).
        temperature: softmax temperature T of appendix C (CUB 24, Cars 79, SOP 54).
        num_anchors: labelled samples per class and batch (first in batch order); 0 = none.
        num_iterations: replicator-dynamics steps T (the released code trains with 1).
        ce_weight: weight of the auxiliary cross-entropy on the classifier logits.
        zero_diagonal: w_ii = 0 as in the paper (default keeps w_ii = 1 as the released code).
        **kwargs: PML options (``reducer``, ``weight_regularizer``, ``weight_init_func`` applied to
            ``classifier.weight``, ``embedding_regularizer``, ...).

    ``forward(embeddings, labels, *, logits=None, prior=None)``: ``logits`` (n, C) replaces the
    classifier's output (prior = softmax(logits / temperature), CE on ``logits``); ``prior`` (n, C,
    non-negative, rows summing to 1) replaces X(0) before the anchors are set (anchor rows become
    one-hot whatever they held), and then no CE term is added (there are no logits). Both bypass
    ``classifier``. ``compute_from_prior(embeddings, labels, prior)`` is the ``prior=`` call.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        temperature: float = 24.0,
        num_anchors: int = 2,
        num_iterations: int = 1,
        ce_weight: float = 1.0,
        zero_diagonal: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.embedding_size = check_positive_int("embedding_size", embedding_size)
        self.num_anchors = check_non_negative_int("num_anchors", num_anchors)
        self.num_iterations = check_non_negative_int("num_iterations", num_iterations)
        self.temperature = check_positive_float("temperature", temperature)
        self.ce_weight = check_non_negative_float("ce_weight", ce_weight)
        self.zero_diagonal = bool(zero_diagonal)
        self.classifier = torch.nn.Linear(embedding_size, num_classes, bias=True)
        if self.weight_init_func is not None:
            self.weight_init_func(self.classifier.weight)
        self.add_to_recordable_attributes(
            list_of_names=[
                "num_classes",
                "embedding_size",
                "temperature",
                "num_anchors",
                "num_iterations",
                "ce_weight",
            ],
            is_stat=False,
        )

    def get_default_weight_init_func(self):
        return None  # keep torch.nn.Linear's own initialisation, like the authors' classifier layer

    def _sub_loss_names(self):
        return ["loss", "ce_loss"]

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Raw classifier logits (n, C), computed in the embeddings' dtype (no temperature)."""
        weight = c_f.to_dtype(self.classifier.weight, dtype=embeddings.dtype)
        bias = c_f.to_dtype(self.classifier.bias, dtype=embeddings.dtype)
        return F.linear(embeddings, weight, bias)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        indices_tuple=None,
        ref_emb: Optional[torch.Tensor] = None,
        ref_labels: Optional[torch.Tensor] = None,
        *,
        logits: Optional[torch.Tensor] = None,
        prior: Optional[torch.Tensor] = None,
    ):
        """PML's forward, plus optional precomputed ``logits`` or ``prior`` (see the class docstring)."""
        self.reset_stats()
        if isinstance(labels, torch.Tensor) and isinstance(embeddings, torch.Tensor):
            labels = c_f.to_device(labels, embeddings)
        ref_emb, ref_labels = c_f.set_ref_emb(embeddings, labels, ref_emb, ref_labels)
        loss_dict = self.compute_loss(
            embeddings, labels, indices_tuple, ref_emb, ref_labels, logits=logits, prior=prior
        )
        self.add_embedding_regularization_to_loss_dict(loss_dict, embeddings)
        return self.reducer(loss_dict, embeddings, labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels, logits=None, prior=None):
        c_f.labels_required(labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        c_f.indices_tuple_not_supported(indices_tuple)
        pml_plugins.check_embeddings_and_labels(
            embeddings, labels, num_classes=self.num_classes, embedding_size=self.embedding_size
        )
        if logits is not None and prior is not None:
            raise ValueError("give at most one of logits= and prior=")
        n = embeddings.shape[0]
        if n == 0:
            return self.zero_losses()
        rank, counts = class_ranks(labels)
        self._warn_about_batch(counts)
        # half precision: compute in float32 (exp, products of probabilities), cast the losses back
        dtype = torch.float32 if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings.dtype
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = embeddings.to(dtype)
            if prior is not None:
                x0 = self._checked_matrix(prior, "prior", n).to(dtype)
                self._check_prior(x0)
            else:
                logits = self.get_logits(emb) if logits is None else self._checked_matrix(logits, "logits", n).to(dtype)
                x0 = torch.softmax(logits / self.temperature, dim=1)  # appendix C, eq. (9)
            x0 = initial_assignment(x0, labels, rank < self.num_anchors)  # section 3.2
            W = pearson_similarity(emb, zero_diagonal=self.zero_diagonal)  # eq. (1), appendix G
            refined = replicator_dynamics(x0, W, self.num_iterations)  # eq. (2)-(6)
            nll = group_nll(refined, labels)  # section 3.4
            ce = None
            if logits is not None and self.ce_weight > 0:
                ce = self.ce_weight * F.cross_entropy(logits, labels, reduction="none")
        indices = c_f.torch_arange_from_size(embeddings)
        loss_dict = {"loss": {"losses": nll.to(embeddings.dtype), "indices": indices, "reduction_type": "element"}}
        if ce is None:
            loss_dict["ce_loss"] = self.zero_loss()
        else:
            loss_dict["ce_loss"] = {"losses": ce.to(embeddings.dtype), "indices": indices, "reduction_type": "element"}
        self.add_weight_regularization_to_loss_dict(loss_dict, self.classifier.weight)
        return loss_dict

    def compute_from_prior(self, embeddings: torch.Tensor, labels: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """The loss with X(0) given: same as ``self(embeddings, labels, prior=prior)``."""
        return self(embeddings, labels, prior=prior)

    def _checked_matrix(self, value: torch.Tensor, name: str, n: int) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor of shape (batch_size, num_classes)")
        if tuple(value.shape) != (n, self.num_classes):
            raise ValueError(
                f"{name} must have shape (batch_size, num_classes) = ({n}, {self.num_classes}), "
                f"got {tuple(value.shape)}"
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} contain NaN or Inf values")
        return value

    @staticmethod
    def _check_prior(prior: torch.Tensor) -> None:
        # rows should sum to 1 (eq. 4 keeps them so); not enforced, since anchor rows are replaced
        # anyway and every replicator step renormalises
        if bool((prior < 0).any()):
            raise ValueError("prior must be non-negative (rows are probability distributions over the classes)")

    def _warn_about_batch(self, counts: torch.Tensor) -> None:
        # one host sync for both flags
        has_single, all_anchors = torch.stack([(counts == 1).any(), (counts <= self.num_anchors).all()]).tolist()
        if counts.numel() == 1:
            warnings.warn(
                "GroupLoss got a batch with a single class: every sample has the same label, so label "
                "propagation cannot separate classes. Use m-per-class batches with several classes "
                "(pytorch_metric_learning.samplers.MPerClassSampler).",
                GroupLossBatchWarning,
                stacklevel=6,
            )
        if has_single:
            warnings.warn(
                "GroupLoss got a batch with a class that has a single sample: it has no same-class "
                "neighbour to propagate from. Use m-per-class batches (MPerClassSampler, m > num_anchors).",
                GroupLossBatchWarning,
                stacklevel=6,
            )
        elif self.num_anchors > 0 and all_anchors:
            warnings.warn(
                f"GroupLoss: every sample of the batch is an anchor (num_anchors={self.num_anchors} >= samples "
                "per class), so the group term is 0 and only the cross-entropy term trains. Use more samples "
                "per class than num_anchors.",
                GroupLossBatchWarning,
                stacklevel=6,
            )


class GroupLossPaper(GroupLoss):
    """The Group Loss as the paper defines it: ``zero_diagonal=True`` (w_ii = 0, eq. 1) and
    ``ce_weight=0.0`` (no auxiliary cross-entropy: section 3.4's loss alone).

    :class:`GroupLoss` keeps the authors' released code's defaults (w_ii = 1, CE weight 1); this
    class only changes those two defaults, so both remain settable. Registered as
    ``group_loss_paper``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        temperature: float = 24.0,
        num_anchors: int = 2,
        num_iterations: int = 1,
        ce_weight: float = 0.0,
        zero_diagonal: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(
            num_classes,
            embedding_size,
            temperature=temperature,
            num_anchors=num_anchors,
            num_iterations=num_iterations,
            ce_weight=ce_weight,
            zero_diagonal=zero_diagonal,
            **kwargs,
        )
