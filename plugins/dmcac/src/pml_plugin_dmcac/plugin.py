"""The pml-plugins entry point of pml-plugin-dmcac."""
from __future__ import annotations

import pml_plugins

from .database_knn_miner import DatabaseKNNMiner
from .dmcac_loss import DMCACLoss
from .training import training_setup

pml_plugins_api_version = 1

PAPER = ("Trivedy & Latecki, Image Retrieval with Self-Supervised Divergence Minimization and "
         "Cross-Attention Classification (DMCAC)")


@pml_plugins.hookimpl
def register_losses(register):
    register(
        DMCACLoss,
        name="dmcac",
        summary="JS divergence between views over retrieved database rows + CE + cross-attention CE",
        paper=PAPER,
        tags=("self-supervised", "classification", "database", "multi-view", "cross-attention"),
        sampler=None,
        multi_view=True,
        database_refresh=True,
        loss_optimizer=True,
        loss_lr=3e-5,  # the paper's AdamW learning rate (section 4.2), used for every parameter
        retrieval_distance="cosine",
        training_setup=training_setup,
    )


@pml_plugins.hookimpl
def register_miners(register):
    register(
        DatabaseKNNMiner,
        name="database_knn",
        summary="Pairs of each embedding with its k nearest reference (database) rows, split by label",
        paper=PAPER,
        tags=("pair", "knn", "database"),
    )
