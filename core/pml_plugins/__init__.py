"""pml-plugins: plugin-based losses, miners and retrieval metrics for pytorch-metric-learning."""

from __future__ import annotations

from .binarize import binarize_embeddings
from .hookspecs import hookimpl
from .knn import knn_search
from .registry import (
    PLUGIN_API_VERSION,
    AmbiguousNameError,
    Entry,
    PluginError,
    RegistrationError,
    UnknownNameError,
    create_loss,
    create_metric,
    create_miner,
    get_entry,
    get_loss,
    get_metric,
    get_miner,
    list_losses,
    list_metrics,
    list_miners,
    load_plugins,
    plugin_info,
    register_plugin,
    unregister_plugin,
)
from .specs import LossSpec, MetricSpec, MinerSpec
from .training_protocol import TrainingContext, TrainingSetup
from .validation import check_embeddings_and_labels

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "PLUGIN_API_VERSION",
    "hookimpl",
    "load_plugins",
    "register_plugin",
    "unregister_plugin",
    "plugin_info",
    "list_losses",
    "list_miners",
    "list_metrics",
    "get_loss",
    "get_miner",
    "get_metric",
    "get_entry",
    "create_loss",
    "create_miner",
    "create_metric",
    "Entry",
    "LossSpec",
    "MinerSpec",
    "MetricSpec",
    "PluginError",
    "UnknownNameError",
    "AmbiguousNameError",
    "RegistrationError",
    "check_embeddings_and_labels",
    "TrainingContext",
    "TrainingSetup",
    "AccuracyCalculator",
    "CrossBatchMemory",
    "SelfSupervisedLoss",
    "knn_search",
    "binarize_embeddings",
]


def __getattr__(name: str):
    # imported lazily: PML's calculator pulls in scikit-learn (seconds), its losses package
    # (behind the wrappers) all of PML's losses
    if name == "AccuracyCalculator":
        from .metrics import AccuracyCalculator

        return AccuracyCalculator
    if name in ("CrossBatchMemory", "SelfSupervisedLoss"):
        from . import wrappers

        return getattr(wrappers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
