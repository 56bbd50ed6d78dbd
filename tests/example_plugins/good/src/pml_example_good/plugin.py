import torch
from pytorch_metric_learning.miners import BatchHardMiner

import pml_plugins

from .hinge_pair_loss import HingePairLoss

pml_plugins_api_version = 1


class HardestPairMiner(BatchHardMiner):
    """PML's batch-hard mining under a plugin's name."""


def mean_first_neighbor_match(knn_labels: torch.Tensor, query_labels: torch.Tensor, **kwargs) -> float:
    """Fraction of queries whose first neighbour has the query's label (precision@1)."""
    return float((knn_labels[:, 0] == query_labels).float().mean())


@pml_plugins.hookimpl
def register_losses(register):
    register(
        HingePairLoss,
        name="hinge_pair",
        aliases=("example_hinge",),
        summary="Pair hinge loss (example)",
        paper="Hadsell et al., CVPR 2006",
        tags=("pair",),
        sampler="m_per_class",
    )


@pml_plugins.hookimpl
def register_miners(register):
    register(HardestPairMiner, name="hardest_pair", summary="Batch-hard miner (example)")


@pml_plugins.hookimpl
def register_metrics(register):
    register(mean_first_neighbor_match, name="first_neighbor_match", summary="precision@1 (example)")
