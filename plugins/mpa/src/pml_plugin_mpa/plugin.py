"""Registers the MPA family with pml-plugins (entry point ``mpa`` in the ``pml_plugins`` group)."""

from __future__ import annotations

import pml_plugins

from .multi_proxy_anchor_ap_loss import MultiProxyAnchorAPLoss
from .multi_proxy_anchor_dw_loss import MultiProxyAnchorDWLoss
from .multi_proxy_anchor_loss import MultiProxyAnchorLoss

pml_plugins_api_version = "1.1"

PAPER = (
    "Saeki, S., Kawahara, M. and Aman, H. Multi Proxy Anchor Family Loss for Several Types of Gradients. "
    "Preprint, June 2023 (arXiv:2110.03997), section 3"
)
#: what the three losses share; each registration adds its summary and tags
_COMMON = pml_plugins.LossSpec(
    paper=PAPER,
    loss_optimizer=True,
    loss_lr=1e-2,  # the paper's proxy lr (1e-4 for the backbone)
    retrieval_distance="cosine",
    # for `pml-plugins compare --tune` (format: pml_plugins.search_space); paper: K=10, alpha=32, delta=0.1
    search_space={
        "proxies_per_class": (1, 10, "int"),
        "alpha": (4.0, 128.0, "log"),
        "delta": (0.0, 0.5),
        "gamma": (0.01, 1.0, "log"),
        "loss_lr": (1e-4, 1e-1, "log"),
    },
    distributed="gradient_equivalent",
    distributed_note="each rank computes the loss on the gathered global batch (proxy terms aggregate over "
    "the whole batch); proxy gradients are all-reduced and rescaled",
)


@pml_plugins.hookimpl
def register_losses(register):
    register(
        MultiProxyAnchorLoss,
        name="multi_proxy_anchor",
        aliases=("mpa",),
        spec=_COMMON.replace(
            summary="ProxyAnchor with K softmax-weighted proxies per class (proxy-centred soft-plus terms)",
            tags=("proxy", "multi-proxy", "cosine", "proxy-anchor"),
        ),
    )
    register(
        MultiProxyAnchorDWLoss,
        name="multi_proxy_anchor_dw",
        aliases=("mpa_dw",),
        spec=_COMMON.replace(
            summary="Data-wise MPA: per-sample positive and negative soft-plus over K-proxy class similarities",
            tags=("proxy", "multi-proxy", "cosine", "proxy-anchor", "data-wise"),
        ),
    )
    register(
        MultiProxyAnchorAPLoss,
        name="multi_proxy_anchor_ap",
        aliases=("mpa_ap",),
        spec=_COMMON.replace(
            summary="All-paired MPA: per-sample soft-plus over margin similarities to all classes (K proxies each)",
            tags=("proxy", "multi-proxy", "cosine", "proxy-anchor", "data-wise"),
        ),
    )
