"""The pml-plugins conformance kit on CAM (default, chunked repeller, one class, wide)."""

from __future__ import annotations

from pml_plugin_cam import ClassAnchorMarginLoss
from pml_plugins.testing import parametrize_with_checks


def default_loss() -> ClassAnchorMarginLoss:
    return ClassAnchorMarginLoss(num_classes=10, embedding_size=8)


def chunked_loss() -> ClassAnchorMarginLoss:
    # 3 rows per repeller block, close anchors: exercises the blocks and the near-pair path
    loss = ClassAnchorMarginLoss(num_classes=10, embedding_size=8, margin=0.5, min_norm=2.0, block_elements=30)
    loss.anchors.data[1] = loss.anchors.data[0]
    loss.anchors.data[2] = 0.0
    return loss


@parametrize_with_checks([default_loss, chunked_loss], embedding_size=8, num_classes=10)
def test_cam_conformance(check):
    check()


@parametrize_with_checks(
    [lambda: ClassAnchorMarginLoss(num_classes=1, embedding_size=3)],
    embedding_size=3,
    num_classes=1,
    skip={
        "check_trainer_step": "the kit's MPerClassSampler (m=4, batch 16) needs >= 4 classes; "
        "the 10-class factories above run this check"
    },
)
def test_cam_conformance_one_class(check):
    check()
