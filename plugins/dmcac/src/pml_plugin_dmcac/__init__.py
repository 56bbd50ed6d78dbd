"""pml-plugin-dmcac: DMCAC (divergence minimisation + cross-attention classification) for PML."""

from .data import MultiViewDataset, TensorViewAugment, dataset_labels, multi_view_collate, split_query_database
from .database_gradient import DatabaseEncoder
from .database_knn_miner import DatabaseKNNMiner
from .divergence import frobenius_js_loss, js_divergence, pairwise_js_divergence
from .dmcac_loss import DMCACLoss
from .refresh import DatabaseRefresher, make_embed_fn
from .retrieval import build_faiss_index
from .training import training_setup

__version__ = "0.1.0"

__all__ = [
    "DMCACLoss",
    "DatabaseKNNMiner",
    "frobenius_js_loss",
    "pairwise_js_divergence",
    "js_divergence",
    "split_query_database",
    "MultiViewDataset",
    "TensorViewAugment",
    "multi_view_collate",
    "dataset_labels",
    "DatabaseRefresher",
    "DatabaseEncoder",
    "make_embed_fn",
    "training_setup",
    "build_faiss_index",
]
