"""The Group Loss (Elezi et al., ECCV 2020) for pytorch-metric-learning, registered with pml-plugins
as ``group_loss``."""
from __future__ import annotations

from .functional import (
    LOG_EPS,
    anchor_mask,
    class_ranks,
    group_nll,
    initial_assignment,
    pearson_similarity,
    replicator_dynamics,
    support_eps,
)
from .group_loss import GroupLoss, GroupLossBatchWarning

__version__ = "0.1.0"

__all__ = [
    "GroupLoss",
    "GroupLossBatchWarning",
    "LOG_EPS",
    "anchor_mask",
    "class_ranks",
    "group_nll",
    "initial_assignment",
    "pearson_similarity",
    "replicator_dynamics",
    "support_eps",
]
