"""A plain pair hinge loss: the smallest loss that behaves like a PML built-in."""

import torch
from pytorch_metric_learning.losses import GenericPairLoss
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

import pml_plugins


class HingePairLoss(GenericPairLoss):
    """mean over positive pairs of relu(d - pos_margin) and negative pairs of relu(neg_margin - d)."""

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, **kwargs):
        super().__init__(mat_based_loss=False, **kwargs)
        self.pos_margin, self.neg_margin = pos_margin, neg_margin

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        pml_plugins.check_embeddings_and_labels(embeddings, labels, labels_required=indices_tuple is None)
        return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _compute_loss(self, pos_pair_dist, neg_pair_dist, indices_tuple):
        pos = torch.relu(pos_pair_dist - self.pos_margin)
        neg = torch.relu(self.neg_margin - neg_pair_dist)
        return {
            "pos_loss": {
                "losses": pos,
                "indices": lmu.pos_pairs_from_tuple(indices_tuple),
                "reduction_type": "pos_pair",
            },
            "neg_loss": {
                "losses": neg,
                "indices": lmu.neg_pairs_from_tuple(indices_tuple),
                "reduction_type": "neg_pair",
            },
        }

    def _sub_loss_names(self):
        return ["pos_loss", "neg_loss"]
