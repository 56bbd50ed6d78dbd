"""Adaptive additive margin softmax (Fehervari and Macedo) for pytorch-metric-learning, registered
with pml-plugins: margins on the negative classes from class distances in another modality."""

from __future__ import annotations

from .adaptive_margin_softmax_loss import AdaptiveMarginSoftmaxLoss
from .binarize import binarize_embeddings
from .class_distances import (
    check_class_distances,
    class_distances_from_embeddings,
    class_distances_from_text,
    load_class_distances,
    load_class_texts,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveMarginSoftmaxLoss",
    "binarize_embeddings",
    "check_class_distances",
    "class_distances_from_embeddings",
    "class_distances_from_text",
    "load_class_distances",
    "load_class_texts",
]
