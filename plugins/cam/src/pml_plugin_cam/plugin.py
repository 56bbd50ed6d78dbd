"""Registers the CAM loss with pml-plugins (entry point ``cam`` in the ``pml_plugins`` group)."""
from __future__ import annotations

import pml_plugins

from .class_anchor_margin_loss import ClassAnchorMarginLoss

pml_plugins_api_version = 1

PAPER = (
    "Ghita, A. and Ionescu, R. T. Class Anchor Margin Loss for Content-Based Image Retrieval. "
    "SciTePress, 2024 (longer version: arXiv:2306.00630)"
)


@pml_plugins.hookimpl
def register_losses(register):
    register(
        ClassAnchorMarginLoss,
        name="class_anchor_margin",
        aliases=("cam",),
        summary="Attract embeddings to learnable class anchors, repel anchors to 2m apart, keep anchors off the origin (L2)",
        paper=PAPER,
        tags=("proxy", "anchor", "euclidean", "classification"),
        loss_optimizer=True,
        # the paper gives no separate anchor lr: 1e-3 is its Adam lr for the whole ResNet model
        # (1e-4 when fine-tuning Swin-T), so this is the lr that also trained the anchors
        loss_lr=1e-3,
        loss_lr_note="no separate anchor lr in the paper; 1e-3 is its Adam lr for the ResNets (1e-4 for Swin-T)",
        loss_optimizer_type="Adam",
        retrieval_distance="euclidean",
        # per-sample attraction + anchor-only repulsion and norm terms: nothing depends on batch order
        distributed="gradient_equivalent",
        distributed_note="each rank computes the loss on the gathered global batch; anchors' gradients are "
                         "all-reduced and rescaled, so training equals one process with the global batch",
    )
