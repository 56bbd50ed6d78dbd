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
    "ArcFaceLoss",
    "CosFaceLoss",
    "LargeMarginSoftmaxLoss",
    "NormalizedSoftmaxLoss",
    "P2SGradLoss",
    "ProxyAnchorLoss",
    "ProxyNCALoss",
    "SoftTripleLoss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
}
# Abstract bases and losses that only make sense wrapped or with unusual inputs.
_SKIP = {"BaseMetricLossFunction", "GenericPairLoss", "BaseMiner", "EmbeddingsAlreadyPackagedAsTriplets"}
_SELF_SUPERVISED = {"VICRegLoss"}
# Search spaces for `compare --tune` (format: pml_plugins.search_space): ranges around PML's
# defaults in the spirit of Musgrave et al. 2020 (supplementary: wide ranges, log scale for
# scales and temperatures). loss_lr is added below for every loss with parameters.
_LR = (1e-4, 1e-1, "log")
_SEARCH_SPACES = {
    "ContrastiveLoss": {"pos_margin": (0.0, 0.5), "neg_margin": (0.3, 1.6)},
    "TripletMarginLoss": {"margin": (0.0, 0.5)},
    "MultiSimilarityLoss": {"alpha": (0.01, 50.0, "log"), "beta": (1.0, 100.0, "log"), "base": (0.0, 1.0)},
    "CircleLoss": {"m": (0.0, 0.6), "gamma": (4.0, 512.0, "log")},
    "LiftedStructureLoss": {"pos_margin": (0.0, 0.5), "neg_margin": (0.3, 1.6)},
    "GeneralizedLiftedStructureLoss": {"pos_margin": (0.0, 0.5), "neg_margin": (0.3, 1.6)},
    "MarginLoss": {"margin": (0.0, 0.5), "beta": (0.5, 1.6)},
    "NTXentLoss": {"temperature": (0.01, 1.0, "log")},
    "SupConLoss": {"temperature": (0.01, 1.0, "log")},
    "NCALoss": {"softmax_scale": (1.0, 64.0, "log")},
    "TupletMarginLoss": {"margin": (0.0, 20.0), "scale": (4.0, 128.0, "log")},
    "ProxyAnchorLoss": {"margin": (0.0, 0.5), "alpha": (4.0, 128.0, "log")},
    "ProxyNCALoss": {"softmax_scale": (1.0, 64.0, "log")},
    "SoftTripleLoss": {
        "centers_per_class": (1, 10, "int"),
        "la": (4.0, 100.0, "log"),
        "gamma": (0.01, 1.0, "log"),
        "margin": (0.0, 0.5),
    },
    "NormalizedSoftmaxLoss": {"temperature": (0.01, 1.0, "log")},
    "ArcFaceLoss": {"margin": (5.0, 60.0), "scale": (4.0, 128.0, "log")},
    "SubCenterArcFaceLoss": {"margin": (5.0, 60.0), "scale": (4.0, 128.0, "log"), "sub_centers": (1, 5, "int")},
    "CosFaceLoss": {"margin": (0.0, 0.6), "scale": (4.0, 128.0, "log")},
}


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
        space = dict(_SEARCH_SPACES.get(class_name, {}))
        if class_name in _CLASSIFICATION_LOSSES:
            space["loss_lr"] = _LR
            spec = LossSpec(**common, tags=("pml", "proxy"), loss_optimizer=True, loss_lr=1e-2)
        elif class_name in _SELF_SUPERVISED:
            spec = LossSpec(**common, tags=("pml", "self_supervised"), loss_optimizer=False)
        else:
            spec = LossSpec(**common, tags=("pml", "pair"), loss_optimizer=False, sampler="m_per_class")
        if space:
            spec = spec.replace(search_space=space)
        register(cls, name=name, aliases=aliases, spec=spec)


@hookimpl
def register_miners(register):
    for class_name, cls in _classes(miners, miners.BaseMiner):
        name, aliases = _names(class_name, "Miner")
        register(cls, name=name, aliases=aliases, spec=MinerSpec(summary=_summary(cls), tags=("pml",)))
