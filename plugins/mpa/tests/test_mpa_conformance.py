"""The pml-plugins conformance kit on the three MPA-family losses."""

from __future__ import annotations

from pml_plugin_mpa import MultiProxyAnchorAPLoss, MultiProxyAnchorDWLoss, MultiProxyAnchorLoss
from pml_plugins.testing import parametrize_with_checks

NUM_CLASSES, EMBEDDING_SIZE = 10, 8


@parametrize_with_checks(
    [
        lambda: MultiProxyAnchorLoss(num_classes=NUM_CLASSES, embedding_size=EMBEDDING_SIZE, proxies_per_class=3),
        lambda: MultiProxyAnchorDWLoss(num_classes=NUM_CLASSES, embedding_size=EMBEDDING_SIZE, proxies_per_class=3),
        lambda: MultiProxyAnchorAPLoss(num_classes=NUM_CLASSES, embedding_size=EMBEDDING_SIZE, proxies_per_class=3),
        # K = 1 (ProxyAnchor) takes the no-softmax, no-regulariser branch of the fused computation
        lambda: MultiProxyAnchorLoss(num_classes=NUM_CLASSES, embedding_size=EMBEDDING_SIZE, proxies_per_class=1),
    ],
    embedding_size=EMBEDDING_SIZE,
    num_classes=NUM_CLASSES,
)
def test_mpa_conformance(check):
    check()
