"""Multi-Proxies Anchor (MPA) loss: Saeki et al., eq. 6-7."""

from __future__ import annotations

from typing import Any, Optional

import torch
from pytorch_metric_learning.reducers import DivisorReducer
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .base import MultiProxyBase


class MultiProxyAnchorLoss(MultiProxyBase):
    """MPA: ProxyAnchor's proxy-centred soft-plus terms on the multi-proxy similarity S (eq. 1).

    L_MPA = 1/|C+| sum_{c in C+} log(1 + sum_{x in X_c+} exp(-alpha (S(x, c) - delta)))
          + 1/|C|  sum_{c in C}  log(1 + sum_{x in X_c-} exp( alpha (S(x, c) + delta)))   (eq. 6)
          + tau * L_Regularizer                                                          (eq. 7, 3)

    C+ is the set of classes present in the batch. The paper leaves |C-| undefined; as PML's
    ``ProxyAnchorLoss`` the negative term is divided by the number of all classes C. With
    ``proxies_per_class=1`` and ``tau=0`` this is PML's ``ProxyAnchorLoss(margin=delta, alpha=alpha)``.
    The default reducer is PML's ``DivisorReducer`` (as ProxyAnchorLoss); miner tuples weight
    samples as in ProxyAnchorLoss. Arguments: see :class:`~pml_plugin_mpa.base.MultiProxyBase`
    (alpha = 32 is an assumption: the paper never states alpha; 32 is ProxyAnchor's default).
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
        # ProxyAnchorLoss's miner handling: unmined samples get -1 added inside the exponents
        miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=sim.dtype).unsqueeze(1) - 1
        pos_mask = torch.nn.functional.one_hot(labels, self.num_classes).bool()
        # eq. 6, first term: per class, log(1 + sum over its positives), as a masked log-sum-exp
        pos_term = lmu.logsumexp(
            -self.alpha * (sim - self.delta) + miner_weights, keep_mask=pos_mask, add_one=True, dim=0
        )
        # eq. 6, second term: per class, log(1 + sum over its negatives)
        neg_term = lmu.logsumexp(
            self.alpha * (sim + self.delta) + miner_weights, keep_mask=~pos_mask, add_one=True, dim=0
        )
        num_pos_classes = int(pos_mask.any(dim=0).sum())  # |C+|
        indices = torch.arange(self.num_classes, device=sim.device)
        return self._loss_dict(
            {
                "pos_loss": {
                    "losses": pos_term.squeeze(0),
                    "indices": indices,
                    "reduction_type": "element",
                    "divisor": num_pos_classes,
                },
                "neg_loss": {
                    "losses": neg_term.squeeze(0),
                    "indices": indices,
                    "reduction_type": "element",
                    "divisor": self.num_classes,
                },
            },
            reg,
        )

    def get_default_reducer(self) -> DivisorReducer:
        return DivisorReducer()

    def _sub_loss_names(self) -> list[str]:
        return ["pos_loss", "neg_loss", "proxy_reg_loss"]
