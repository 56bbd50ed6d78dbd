"""pml-plugin-cam: the Class Anchor Margin (CAM) loss for pytorch-metric-learning."""

from __future__ import annotations

from .class_anchor_margin_loss import ClassAnchorMarginLoss, ScaledNormalInit

__version__ = "0.1.0"
__all__ = ["ClassAnchorMarginLoss", "ScaledNormalInit", "__version__"]
