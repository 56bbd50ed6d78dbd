"""The built-in plugin: registers pytorch-metric-learning's own losses and miners.

This lets every comparison include PML's built-ins by name, e.g.
``create_loss("proxy_anchor", num_classes=100, embedding_size=128)``.
"""
from __future__ import annotations

import inspect

from pytorch_metric_learning import losses, miners

from .hookspecs import hookimpl
from .names import snake_case
from .specs import LossSpec, MinerSpec

pml_plugins_api_version = "1.1"

# Names where snake-casing the class name reads badly; the snake-cased form stays an alias.
_NAME_OVERRIDES = {
    "ArcFaceLoss": "arcface",
    "CosFaceLoss": "cosface",
    "SphereFaceLoss": "sphereface",
    "SubCenterArcFaceLoss": "subcenter_arcface",
    "NTXentLoss": "ntxent",
    "PNPLoss": "pnp",
    "P2SGradLoss": "p2sgrad",
    "SupConLoss": "supcon",
    "VICRegLoss": "vicreg",
    "SignalToNoiseRatioContrastiveLoss": "snr_contrastive",
    "ThresholdConsistentMarginLoss": "threshold_consistent_margin",
    "HDCMiner": "hdc",
}
# Losses that own learnable class weights / proxies (need a loss optimizer).
_CLASSIFICATION_LOSSES = {
    "ArcFaceLoss", "CosFaceLoss", "LargeMarginSoftmaxLoss", "NormalizedSoftmaxLoss",
    "P2SGradLoss", "ProxyAnchorLoss", "ProxyNCALoss", "SoftTripleLoss", "SphereFaceLoss",
    "SubCenterArcFaceLoss",
}
# Abstract bases and losses that only make sense wrapped or with unusual inputs.
_SKIP = {"BaseMetricLossFunction", "GenericPairLoss", "BaseMiner", "EmbeddingsAlreadyPackagedAsTriplets"}
_SELF_SUPERVISED = {"VICRegLoss"}


def _classes(module, base):
    for name, cls in inspect.getmembers(module, inspect.isclass):
        if issubclass(cls, base) and name not in _SKIP:
            yield name, cls


def _summary(cls) -> str:
    doc = cls.__dict__.get("__doc__") or ""  # not inherited: nn.Module's says nothing
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    return first or f"pytorch-metric-learning's {cls.__name__}"


def _names(class_name: str, suffix: str) -> tuple[str, tuple[str, ...]]:
    snake = snake_case(class_name, suffix)
    name = _NAME_OVERRIDES.get(class_name, snake)
    aliases = tuple(a for a in {snake, class_name.lower()} if a != name)
    return name, aliases


@hookimpl
def register_losses(register):
    for class_name, cls in _classes(losses, losses.BaseMetricLossFunction):
        name, aliases = _names(class_name, "Loss")
        common = dict(summary=_summary(cls), paper="see the pytorch-metric-learning docs")
        if class_name in _CLASSIFICATION_LOSSES:
            spec = LossSpec(**common, tags=("pml", "proxy"), loss_optimizer=True, loss_lr=1e-2)
        elif class_name in _SELF_SUPERVISED:
            spec = LossSpec(**common, tags=("pml", "self_supervised"), loss_optimizer=False)
        else:
            spec = LossSpec(**common, tags=("pml", "pair"), loss_optimizer=False, sampler="m_per_class")
        register(cls, name=name, aliases=aliases, spec=spec)


@hookimpl
def register_miners(register):
    for class_name, cls in _classes(miners, miners.BaseMiner):
        name, aliases = _names(class_name, "Miner")
        register(cls, name=name, aliases=aliases, spec=MinerSpec(summary=_summary(cls), tags=("pml",)))
