"""Adaptive additive margin softmax (Fehervari and Macedo, eq. 1-3)."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

import pml_plugins
from pml_plugins.validation import check_finite_float, check_positive_float, check_positive_int

from .class_distances import check_class_distances, class_distances_from_text, load_class_texts


def _compute_dtype(embeddings: torch.Tensor) -> torch.dtype:
    # half precision is computed in float32 (the buffer d and the proxies are float32 anyway)
    return torch.float32 if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings.dtype


class AdaptiveMarginSoftmaxLoss(WeightRegularizerMixin, BaseMetricLossFunction):
    """Normalised softmax over class proxies with an additive margin m on the target class and
    an adaptive margin on every other class z, from class distances d in another modality.

    With cos_z = x^T p_z (unit-norm embedding x, unit-norm proxy p_z) and label y (eq. 3)::

        logit_y = s * (cos_y - m)
        logit_z = s * (cos_z + (1 - cos_z) * d_yz)      for z != y
        loss    = cross-entropy(logits, y)   (averaged over the batch by PML's MeanReducer)

    The paper writes the scale as a temperature, "sigma = 20"; here it is the multiplicative
    s = 1 / temperature = 20 (a temperature of 0.05, as in the normalized-softmax baseline).
    Special cases: d = 0 is LMCL (eq. 2) = PML's ``CosFaceLoss(margin=m, scale=s)``; d = 0 and
    m = 0 is eq. 1 = PML's ``NormalizedSoftmaxLoss(temperature=1/s)``. Where d_yz = 1 the
    negative logit is the constant s: that pair contributes no gradient.

    Args:
        num_classes: C.
        embedding_size: D.
        class_distances: the C x C matrix d in [0, 1] (tensor, numpy array, nested lists, or a
            path to ``.npy`` / ``.pt`` / ``.txt`` / ``.csv``); ``None`` means d = 0 (LMCL). The
            diagonal is ignored (stored as 0). Stored as the float32 buffer ``class_distances``.
        margin: m, the additive margin on the target cosine (paper: 0.4).
        scale: s, the logit scale (paper: "sigma = 20", i.e. temperature 0.05).
        class_texts: instead of ``class_distances``: one text per class (a list of strings or a
            path to a text file, one line per class); d is then
            ``class_distances_from_text(class_texts, model=text_model)`` (needs the ``[text]`` extra).
        text_model: the sentence-transformers model for ``class_texts`` (default: the packaged
            all-MiniLM-L6-v2); a local folder, an installed model package, or a loaded model.
        **kwargs: PML's ``reducer``, ``weight_init_func``, ``weight_regularizer``,
            ``weight_reg_weight``, ``embedding_regularizer``, ... The distance may only be the
            default ``CosineSimilarity()`` (eq. 1-3 use cosines).

    The parameter ``proxies`` has shape (num_classes, embedding_size), float32 (cast inside
    forward), normalised in the forward pass. It needs its own optimizer (paper: SGD, lr 0.01).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        class_distances: Optional[Union[torch.Tensor, Any, str]] = None,
        margin: float = 0.4,
        scale: float = 20.0,
        *,
        class_texts: Optional[Union[str, Sequence[str]]] = None,
        text_model: Any = None,
        **kwargs: Any,
    ) -> None:
        check_positive_int("num_classes", num_classes)
        check_positive_int("embedding_size", embedding_size)
        check_finite_float("margin", margin)
        check_positive_float("scale", scale)
        if class_texts is not None and class_distances is not None:
            raise ValueError("give class_distances or class_texts, not both")
        super().__init__(**kwargs)
        if not (
            type(self.distance) is CosineSimilarity and self.distance.normalize_embeddings and self.distance.power == 1
        ):
            raise ValueError(
                f"{type(self).__name__} is defined on cosines of unit vectors (eq. 1-3): distance must "
                f"be CosineSimilarity() (the default), got {self.distance!r}"
            )
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.margin = float(margin)
        self.scale = float(scale)
        self.proxies = torch.nn.Parameter(torch.empty(num_classes, embedding_size))
        self.weight_init_func(self.proxies)
        if class_texts is not None:
            texts = load_class_texts(class_texts)
            if len(texts) != num_classes:
                raise ValueError(
                    f"class_texts must hold one description per class: got {len(texts)} for num_classes={num_classes}"
                )
            class_distances = class_distances_from_text(texts, model=text_model)
        # None: d = 0 without a C x C buffer (C can be tens of thousands)
        d = None if class_distances is None else check_class_distances(class_distances, num_classes)
        self.register_buffer("class_distances", d)
        self.add_to_recordable_attributes(
            list_of_names=["num_classes", "embedding_size", "margin", "scale"], is_stat=False
        )

    # -- computation ------------------------------------------------------------------------
    def _to_batch(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Proxies and d on the batch's device (PML moves its proxies there too), compute dtype."""
        device, dtype = embeddings.device, _compute_dtype(embeddings)
        if self.proxies.device != device:
            self.proxies.data = c_f.to_device(self.proxies.data, device=device)
        d = self.class_distances
        if d is not None and d.device != device:
            self.class_distances = d = d.to(device)
        return c_f.to_dtype(self.proxies, dtype=dtype), None if d is None else c_f.to_dtype(d, dtype=dtype)

    def get_cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """cos_z = x^T p_z of unit vectors (eq. 1-3), shape (batch_size, num_classes), compute dtype."""
        proxies, _ = self._to_batch(embeddings)
        return self.distance(c_f.to_dtype(embeddings, dtype=proxies.dtype), proxies)

    def margin_logits(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The logits of eq. 3 (eq. 2 when d is None): s (cos_y - m) for the label, s (cos_z + (1 -
        cos_z) d_yz) for the other classes."""
        _, d = self._to_batch(cosine)
        if d is None:
            logits = cosine  # eq. 2: d = 0
        else:
            d_rows = d[labels]  # d_yz for each sample's label y, (batch_size, num_classes); d_yy = 0
            # eq. 3, written d + (1 - d) cos: the same value, exactly constant where d = 1, and
            # exactly cos at the label (d_yy = 0)
            logits = d_rows + (1 - d_rows) * cosine
        # the target's margin added the way PML's CosFaceLoss does, so d = 0 matches it bit for bit
        target = torch.nn.functional.one_hot(labels, self.num_classes).to(cosine.dtype)
        cos_y = cosine.gather(1, labels[:, None])
        logits = logits + target * ((cos_y - self.margin) - cos_y)  # eq. 2-3: cos_y - m
        return logits * self.scale

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
        logits = self.margin_logits(self.get_cosine(embeddings), labels)
        # eq. 3: -log softmax at the label (cross_entropy is a log-sum-exp)
        losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=losses.dtype)  # as CosFaceLoss
        loss_dict = {
            "loss": {
                "losses": losses * miner_weights,
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            }
        }
        self.add_weight_regularization_to_loss_dict(loss_dict, self.proxies)
        return loss_dict

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """s * cos_z without margins (inference logits, as CosFaceLoss.get_logits), (batch_size, num_classes)."""
        pml_plugins.check_embeddings_and_labels(
            embeddings, None, embedding_size=self.embedding_size, labels_required=False
        )
        return c_f.to_dtype(self.get_cosine(embeddings) * self.scale, dtype=embeddings.dtype)

    # -- PML interface --------------------------------------------------------------------
    def get_default_distance(self) -> CosineSimilarity:
        return CosineSimilarity()

    def _sub_loss_names(self) -> list[str]:
        return ["loss"]

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        # a loss built without d (buffer None) accepts a checkpoint that has one
        key = prefix + "class_distances"
        if self.class_distances is None and key in state_dict:
            self.class_distances = check_class_distances(state_dict[key], self.num_classes).to(self.proxies.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
