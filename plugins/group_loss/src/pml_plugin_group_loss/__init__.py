"""The Group Loss (Elezi et al., ECCV 2020) for pytorch-metric-learning, registered with pml-plugins
as ``group_loss`` (the authors' released code's setting) and ``group_loss_paper`` (the paper's loss)."""

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
from .group_loss import GroupLoss, GroupLossBatchWarning, GroupLossPaper

__version__ = "0.1.0"

__all__ = [
    "GroupLoss",
    "GroupLossBatchWarning",
    "GroupLossPaper",
    "LOG_EPS",
    "anchor_mask",
    "class_ranks",
    "group_nll",
    "initial_assignment",
    "pearson_similarity",
    "replicator_dynamics",
    "support_eps",
]
