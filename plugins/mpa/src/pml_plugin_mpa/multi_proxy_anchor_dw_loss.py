"""Data-wise Multi-Proxies Anchor (MPA-DW) loss: Saeki et al., eq. 12-13."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .base import MultiProxyBase


class MultiProxyAnchorDWLoss(MultiProxyBase):
    """MPA-DW: eq. 6 with the order of summation changed, one soft-plus pair per sample.

    L_MPADW = 1/N sum_i [ log(1 + exp(-alpha (S(x_i, c_i) - delta)))
                        + log(1 + sum_{c != c_i} exp(alpha (S(x_i, c) + delta))) ]   (eq. 12)
              + tau * L_Regularizer                                                  (eq. 13, 3)

    The per-sample terms are a PML ``"element"`` sub-loss ``loss`` (default ``MeanReducer``:
    the 1/N of eq. 12); miner tuples weight the per-sample terms (as SoftTripleLoss).
    Arguments: see :class:`~pml_plugin_mpa.base.MultiProxyBase` (alpha = 32 is an
    assumption: the paper never states alpha; 32 is ProxyAnchor's default).
    """

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: Optional[torch.Tensor],
        indices_tuple: Any,
        ref_emb: Optional[torch.Tensor],
        ref_labels: Optional[torch.Tensor],
    ) -> dict:
        self._check_input(embeddings, labels, ref_emb, ref_labels)
        sim, reg = self.similarity(embeddings)  # eq. 1, eq. 3 (weighted by tau)
        miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=sim.dtype)
        pos_mask = F.one_hot(labels, self.num_classes).bool()
        pos_sim = sim.gather(1, labels[:, None]).squeeze(1)
        pos = F.softplus(-self.alpha * (pos_sim - self.delta))  # eq. 12, positive soft-plus
        neg = lmu.logsumexp(self.alpha * (sim + self.delta), keep_mask=~pos_mask, add_one=True, dim=1).squeeze(
            1
        )  # eq. 12, negative soft-plus over c != c_i
        losses = (pos + neg) * miner_weights
        return self._loss_dict(
            {"loss": {"losses": losses, "indices": c_f.torch_arange_from_size(sim), "reduction_type": "element"}},
            reg,
        )

    def _sub_loss_names(self) -> list[str]:
        return ["loss", "proxy_reg_loss"]
