"""Common base of the three MPA-family losses: proxies, eq. 1 similarity, eq. 3 regulariser."""

from __future__ import annotations

from typing import Any, Optional

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.utils import common_functions as c_f

import pml_plugins
from pml_plugins.validation import (
    check_finite_float,
    check_non_negative_float,
    check_positive_float,
    check_positive_int,
)

from .functional import class_similarity, proxy_regularizer


def _compute_dtype(embeddings: torch.Tensor) -> torch.dtype:
    # half precision is computed in float32 (exp(alpha * S) with alpha = 32 overflows fp16)
    return torch.float32 if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings.dtype


def _is_plain_cosine(distance: Any) -> bool:
    return type(distance) is CosineSimilarity and distance.normalize_embeddings and distance.power == 1


class MultiProxyBase(WeightRegularizerMixin, BaseMetricLossFunction):
    """Shared part of MPA / MPA-DW / MPA-AP (Saeki et al., section 3).

    Args:
        num_classes: C.
        embedding_size: d.
        proxies_per_class: K proxies per class (paper: 10 on CUB / Cars).
        alpha: scale of the exponents in eq. 6, 12, 16. The paper never states alpha;
            32 is ProxyAnchor's default (Kim et al. 2020), assumed here.
        delta: margin of eq. 6, 12, 15 (paper: 0.1).
        gamma: softmax temperature over the K proxies in eq. 1 (paper: 0.1).
        tau: weight of the proxy regulariser eq. 3 in eq. 7, 13, 17 (paper: 0.2).
        **kwargs: PML's ``reducer``, ``weight_init_func``, ``weight_regularizer``,
            ``weight_reg_weight``, ``embedding_regularizer``, ... The distance may only be the
            default ``CosineSimilarity()`` (eq. 1 is defined on L2-normalised vectors).

    The parameter ``proxies`` has shape (num_classes * proxies_per_class, embedding_size);
    row ``c * K + k`` holds proxy k of class c. It stays float32 (cast inside forward).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        proxies_per_class: int = 10,
        alpha: float = 32.0,
        delta: float = 0.1,
        gamma: float = 0.1,
        tau: float = 0.2,
        **kwargs: Any,
    ) -> None:
        for name, value in (
            ("num_classes", num_classes),
            ("embedding_size", embedding_size),
            ("proxies_per_class", proxies_per_class),
        ):
            check_positive_int(name, value)
        check_positive_float("alpha", alpha)
        check_finite_float("delta", delta)
        check_positive_float("gamma", gamma, note="softmax temperature of eq. 1")
        check_non_negative_float("tau", tau, note="regulariser weight of eq. 7")
        super().__init__(**kwargs)
        if not _is_plain_cosine(self.distance):
            raise ValueError(
                f"{type(self).__name__} is defined on cosine similarities of L2-normalised vectors (eq. 1): "
                f"distance must be CosineSimilarity() (the default), got {self.distance!r}"
            )
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.proxies_per_class = proxies_per_class
        self.alpha = float(alpha)
        self.delta = float(delta)
        self.gamma = float(gamma)
        self.tau = float(tau)
        # row c * K + k = proxy k of class c (float32, as PML's proxies)
        self.proxies = torch.nn.Parameter(torch.empty(num_classes * proxies_per_class, embedding_size))
        self.weight_init_func(self.proxies)
        self.add_to_recordable_attributes(
            list_of_names=["num_classes", "embedding_size", "proxies_per_class", "alpha", "delta", "gamma", "tau"],
            is_stat=False,
        )

    # -- shared computation -------------------------------------------------------------
    def _proxies_for(self, embeddings: torch.Tensor) -> torch.Tensor:
        if self.proxies.device != embeddings.device:  # PML moves its proxies to the batch's device
            self.proxies.data = c_f.to_device(self.proxies.data, device=embeddings.device)
        return c_f.to_dtype(self.proxies, dtype=_compute_dtype(embeddings))

    def _check_input(
        self, embeddings: torch.Tensor, labels: Optional[torch.Tensor], ref_emb: Any, ref_labels: Any
    ) -> None:
        pml_plugins.check_embeddings_and_labels(
            embeddings, labels, num_classes=self.num_classes, embedding_size=self.embedding_size
        )
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)

    def _with_regularizer(self) -> bool:
        return self.tau > 0 and self.proxies_per_class > 1

    def similarity(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S, reg)``: S(x, c) of eq. 1, shape (B, C), and tau * eq. 3 (a scalar), in the
        compute dtype (float32 for half-precision embeddings)."""
        proxies = self._proxies_for(embeddings)
        emb = c_f.to_dtype(embeddings, dtype=proxies.dtype)
        with_reg = self._with_regularizer()
        sim, gram = class_similarity(
            emb, proxies, self.num_classes, self.proxies_per_class, self.gamma, with_gram=with_reg
        )
        reg = self.tau * proxy_regularizer(gram) if with_reg else sim.new_zeros(())
        return sim, reg

    def regularizer(self) -> torch.Tensor:
        """Eq. 3 alone (unweighted) for the current proxies."""
        proxies = self.proxies
        k = self.proxies_per_class
        if k < 2:
            return proxies.new_zeros(())
        w = torch.nn.functional.normalize(proxies, dim=1).view(self.num_classes, k, -1)
        return proxy_regularizer(torch.bmm(w, w.transpose(1, 2)))

    def _loss_dict(self, sim_losses: dict, reg: torch.Tensor) -> dict:
        sim_losses["proxy_reg_loss"] = {"losses": reg, "indices": None, "reduction_type": "already_reduced"}
        self.add_weight_regularization_to_loss_dict(sim_losses, self.proxies)
        return sim_losses

    # -- PML interface ------------------------------------------------------------------
    def get_default_distance(self) -> CosineSimilarity:
        return CosineSimilarity()

    def get_default_weight_init_func(self) -> c_f.TorchInitWrapper:
        return c_f.TorchInitWrapper(torch.nn.init.kaiming_normal_, mode="fan_out")  # as ProxyAnchorLoss

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """S(x, c) of eq. 1, shape (batch_size, num_classes): argmax classifies, sorting ranks classes."""
        pml_plugins.check_embeddings_and_labels(
            embeddings, None, embedding_size=self.embedding_size, labels_required=False
        )
        proxies = self._proxies_for(embeddings)
        sim, _ = class_similarity(
            c_f.to_dtype(embeddings, dtype=proxies.dtype), proxies, self.num_classes, self.proxies_per_class, self.gamma
        )
        return c_f.to_dtype(sim, dtype=embeddings.dtype)
