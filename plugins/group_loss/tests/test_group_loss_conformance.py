"""The pml-plugins conformance kit on GroupLoss (m-per-class batches, as the loss requires)."""

from __future__ import annotations

import pytest

from pml_plugin_group_loss import GroupLoss, GroupLossPaper
from pml_plugins.testing import parametrize_with_checks

NUM_CLASSES, EMBEDDING_SIZE = 10, 8

# the kit also feeds one-class and tiny batches on purpose: the loss warns and stays finite
pytestmark = pytest.mark.filterwarnings("ignore::pml_plugin_group_loss.GroupLossBatchWarning")


@parametrize_with_checks(
    [
        lambda: GroupLoss(num_classes=NUM_CLASSES, embedding_size=EMBEDDING_SIZE),
        # the paper's variant: w_ii = 0 (support-free rows), several iterations, no CE term
        lambda: GroupLoss(
            num_classes=NUM_CLASSES, embedding_size=EMBEDDING_SIZE, zero_diagonal=True, num_iterations=3, ce_weight=0.0
        ),
        # the registered paper preset (group_loss_paper)
        lambda: GroupLossPaper(num_classes=NUM_CLASSES, embedding_size=EMBEDDING_SIZE),
        # no anchors, sharp prior
        lambda: GroupLoss(num_classes=NUM_CLASSES, embedding_size=EMBEDDING_SIZE, num_anchors=0, temperature=0.5),
    ],
    embedding_size=EMBEDDING_SIZE,
    num_classes=NUM_CLASSES,
    samples_per_class=4,
)
def test_group_loss_conformance(check):
    check()
