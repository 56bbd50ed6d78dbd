"""The pml-plugins entry point of pml-plugin-dmcac."""

from __future__ import annotations

import pml_plugins

from .database_knn_miner import DatabaseKNNMiner
from .dmcac_loss import DMCACLoss
from .training import training_setup

pml_plugins_api_version = "1.1"

PAPER = (
    "Trivedy & Latecki, Image Retrieval with Self-Supervised Divergence Minimization and "
    "Cross-Attention Classification (DMCAC)"
)


def conformance_instance(num_classes: int, embedding_size: int) -> DMCACLoss:
    """A small DMCACLoss (2 views, k = 4) for the conformance kit run on installed plugins."""
    return DMCACLoss(num_classes=num_classes, embedding_size=embedding_size, num_views=2, k=4)


@pml_plugins.hookimpl
def register_losses(register):
    register(
        DMCACLoss,
        name="dmcac",
        spec=pml_plugins.LossSpec(
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
            # for `pml-plugins compare --tune` (format: pml_plugins.search_space)
            search_space={
                "temperature": (0.1, 10.0, "log"),
                "frob_weight": (0.1, 10.0, "log"),
                "ce_weight": (0.1, 10.0, "log"),
                "loss_lr": (1e-5, 1e-2, "log"),
            },
            distributed="gradient_equivalent",
            distributed_note="whole queries (all A views) stay on one rank; each rank embeds a slice of the database "
            "with its identical model and the slices are all-gathered, so every rank holds the same "
            "database; without a database the gathered global batch is the in-batch database, as "
            "in one process",
            # the default six views need batches the kit does not build; two views exercise the same code
            conformance={"num_views": 2},
            conformance_factory=conformance_instance,
        ),
    )


@pml_plugins.hookimpl
def register_miners(register):
    register(
        DatabaseKNNMiner,
        name="database_knn",
        spec=pml_plugins.MinerSpec(
            summary="Pairs of each embedding with its k nearest reference (database) rows, split by label",
            paper=PAPER,
            tags=("pair", "knn", "database"),
        ),
    )
