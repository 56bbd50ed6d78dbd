"""Class Anchor Margin (CAM) loss: Ghita & Ionescu, "Class Anchor Margin Loss for
Content-Based Image Retrieval" (eq. 1-4)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

import pml_plugins
from pml_plugins.validation import check_non_negative_float, check_positive_float, check_positive_int

from .functional import attractor_losses, min_norm_loss, negative_distances, repeller_loss


class ScaledNormalInit:
    """Anchors ~ N(0, 1/embedding_size): norms close to 1 (the default p), distinct directions.

    Any PML-style ``weight_init_func`` works; avoid initialising anchors exactly at the origin
    or on top of each other, where eq. 2 and 3 have a zero (sub)gradient.
    """

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=tensor.shape[1] ** -0.5)


def _is_plain_l2(distance: Any) -> bool:
    return (
        isinstance(distance, LpDistance)
        and distance.p == 2
        and distance.power == 1
        and not distance.normalize_embeddings
    )


class ClassAnchorMarginLoss(WeightRegularizerMixin, BaseMetricLossFunction):
    """CAM: attract embeddings to learnable class anchors, repel anchors, keep them off the origin.

    L_CAM = L_A + repeller_weight * L_R + min_norm_weight * L_N (eq. 4), on plain (not
    normalised) embeddings and Euclidean distances.

    Args:
        num_classes: t, the number of classes (one anchor each).
        embedding_size: n, the embedding dimension.
        margin: m of eq. 2; anchors are pushed until they are 2m apart (paper: 2).
        min_norm: p of eq. 3, the minimum anchor norm (paper: 1).
        repeller_weight: weight of L_R (paper: 1).
        min_norm_weight: weight of L_N (paper: 1).
        block_elements: elements per (rows x t) block of the chunked repeller, its memory bound;
            None picks 2**22 on CPU and 2**23 on GPUs.
        **kwargs: PML's ``reducer``, ``weight_init_func``, ``weight_regularizer``,
            ``weight_reg_weight``, ``embedding_regularizer``, ... The ``distance`` may only be
            ``LpDistance(normalize_embeddings=False, p=2, power=1)`` (the default).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 2.0,
        min_norm: float = 1.0,
        repeller_weight: float = 1.0,
        min_norm_weight: float = 1.0,
        block_elements: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        check_positive_int("num_classes", num_classes)
        check_positive_int("embedding_size", embedding_size)
        check_positive_int("block_elements", block_elements, allow_none=True)
        check_positive_float("margin", margin, note="m of eq. 2")
        for name, value in (
            ("min_norm", min_norm),
            ("repeller_weight", repeller_weight),
            ("min_norm_weight", min_norm_weight),
        ):
            check_non_negative_float(name, value)
        super().__init__(**kwargs)
        if not _is_plain_l2(self.distance):
            raise ValueError(
                "ClassAnchorMarginLoss is defined on plain Euclidean distances (eq. 1-3): distance must be "
                f"LpDistance(normalize_embeddings=False, p=2, power=1), got {self.distance!r}"
            )
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.margin = float(margin)
        self.min_norm = float(min_norm)
        self.repeller_weight = float(repeller_weight)
        self.min_norm_weight = float(min_norm_weight)
        self.block_elements = block_elements
        # the class anchors C = {c_1, ..., c_t}, rows indexed by label (float32, as PML's proxies)
        self.anchors = torch.nn.Parameter(torch.empty(num_classes, embedding_size))
        self.weight_init_func(self.anchors)
        self.add_to_recordable_attributes(
            list_of_names=["num_classes", "embedding_size", "margin", "min_norm", "repeller_weight", "min_norm_weight"],
            is_stat=False,
        )

    def _anchors_for(self, embeddings: torch.Tensor) -> torch.Tensor:
        # PML moves its proxies to the embeddings' device; the parameter itself stays float32
        if self.anchors.device != embeddings.device:
            self.anchors.data = c_f.to_device(self.anchors.data, device=embeddings.device)
        return c_f.to_dtype(self.anchors, dtype=_compute_dtype(embeddings))

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: Optional[torch.Tensor],
        indices_tuple: Any,
        ref_emb: Optional[torch.Tensor],
        ref_labels: Optional[torch.Tensor],
    ) -> dict:
        pml_plugins.check_embeddings_and_labels(
            embeddings, labels, num_classes=self.num_classes, embedding_size=self.embedding_size
        )
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        dtype = _compute_dtype(embeddings)  # half precision is computed in float32
        anchors = self._anchors_for(embeddings)
        emb = c_f.to_dtype(embeddings, dtype=dtype)
        miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=dtype)
        l_a = attractor_losses(emb, anchors, labels) * miner_weights  # eq. 1, per sample
        l_r = repeller_loss(anchors, self.margin, self.block_elements)  # eq. 2
        l_n = min_norm_loss(anchors, self.min_norm)  # eq. 3
        loss_dict = {  # eq. 4: PML's reducer sums the sub-losses
            "attractor_loss": {
                "losses": l_a,
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            },
            "repeller_loss": {
                "losses": self.repeller_weight * l_r,
                "indices": None,
                "reduction_type": "already_reduced",
            },
            "min_norm_loss": {
                "losses": self.min_norm_weight * l_n,
                "indices": None,
                "reduction_type": "already_reduced",
            },
        }
        self.add_weight_regularization_to_loss_dict(loss_dict, anchors)
        return loss_dict

    def get_default_distance(self) -> LpDistance:
        return LpDistance(normalize_embeddings=False, p=2, power=1)

    def get_default_weight_init_func(self) -> ScaledNormalInit:
        return ScaledNormalInit()

    def _sub_loss_names(self) -> list[str]:
        return ["attractor_loss", "repeller_loss", "min_norm_loss"]

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Negative Euclidean distances to every anchor, shape (batch_size, num_classes).

        ``argmax`` gives the nearest anchor (classification); sorting gives nearest-anchor retrieval.
        """
        pml_plugins.check_embeddings_and_labels(
            embeddings, None, embedding_size=self.embedding_size, labels_required=False
        )
        anchors = self._anchors_for(embeddings)
        logits = negative_distances(c_f.to_dtype(embeddings, dtype=anchors.dtype), anchors)
        return c_f.to_dtype(logits, dtype=embeddings.dtype)


def _compute_dtype(embeddings: torch.Tensor) -> torch.dtype:
    if embeddings.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return embeddings.dtype
