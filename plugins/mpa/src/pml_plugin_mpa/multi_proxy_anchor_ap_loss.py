"""Data-wise, all-paired Multi-Proxies Anchor (MPA-AP) loss: Saeki et al., eq. 15-17."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .base import MultiProxyBase


class MultiProxyAnchorAPLoss(MultiProxyBase):
    """MPA-AP: one soft-plus per sample over the margin similarities of all C classes.

    S'(x, c) = delta - S(x, c) if c = c_i, S(x, c) + delta otherwise          (eq. 15)
    L_MPAAP = 1/N sum_i log(1 + sum_c exp(alpha S'(x_i, c)))                  (eq. 16)
              + tau * L_Regularizer                                           (eq. 17, 3)

    The per-sample terms are a PML ``"element"`` sub-loss ``loss`` (default ``MeanReducer``:
    the 1/N of eq. 16); miner tuples weight the per-sample terms (as SoftTripleLoss).
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
        margin_sim = torch.where(pos_mask, self.delta - sim, sim + self.delta)  # eq. 15
        losses = lmu.logsumexp(self.alpha * margin_sim, add_one=True, dim=1).squeeze(1)  # eq. 16
        return self._loss_dict(
            {
                "loss": {
                    "losses": losses * miner_weights,
                    "indices": c_f.torch_arange_from_size(sim),
                    "reduction_type": "element",
                }
            },
            reg,
        )

    def _sub_loss_names(self) -> list[str]:
        return ["loss", "proxy_reg_loss"]
