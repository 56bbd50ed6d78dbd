"""The Multi-Proxies Anchor loss family (MPA, MPA-DW, MPA-AP) of Saeki et al. for
pytorch-metric-learning, registered with pml-plugins."""

from __future__ import annotations

from .base import MultiProxyBase
from .functional import ProxyClassSimilarity, class_similarity, proxy_regularizer
from .multi_proxy_anchor_ap_loss import MultiProxyAnchorAPLoss
from .multi_proxy_anchor_dw_loss import MultiProxyAnchorDWLoss
from .multi_proxy_anchor_loss import MultiProxyAnchorLoss

__version__ = "0.1.0"

__all__ = [
    "MultiProxyBase",
    "MultiProxyAnchorLoss",
    "MultiProxyAnchorDWLoss",
    "MultiProxyAnchorAPLoss",
    "ProxyClassSimilarity",
    "class_similarity",
    "proxy_regularizer",
]
