"""Drop-in versions of PML's ``CrossBatchMemory`` and ``SelfSupervisedLoss`` that accept plugin losses.

PML's wrappers check the wrapped loss's class name against a fixed list of PML losses, so a
plugin loss is refused even when it supports ``ref_emb``. These subclasses accept PML's list
plus every loss registered with pml-plugins whose registration does not declare
``supports_ref_emb=False``; everything else is refused with a ``TypeError`` that says why.
"""

from __future__ import annotations

from pytorch_metric_learning import losses as pml_losses

from . import registry as _registry


def _registered_entry(loss_cls: type):
    for entry in _registry.registry.entries("loss"):
        if entry.obj is loss_cls:
            return entry
    return None


def _check_support(wrapper: str, pml_supported: list[str], loss_name: str, loss_cls: type | None) -> None:
    if loss_name in pml_supported:
        return
    entry = _registered_entry(loss_cls) if loss_cls is not None else None
    if entry is None:
        raise TypeError(
            f"{wrapper} needs a loss that supports ref_emb: PML's {', '.join(pml_supported)}, or a loss registered "
            f"with pml-plugins; {loss_name} is neither (register it with pml_plugins.register_plugin)"
        )
    if entry.plugin == _registry.BUILTIN_PLUGIN or not entry.spec.supports_ref_emb:
        raise TypeError(f"{wrapper} needs a loss that supports ref_emb; {loss_name} ({entry.qualified_name}) does not")


class CrossBatchMemory(pml_losses.CrossBatchMemory):
    """PML's ``CrossBatchMemory`` (same arguments and behaviour) accepting registered plugin losses."""

    def __init__(self, loss, embedding_size, memory_size=1024, miner=None, **kwargs):
        self._loss_cls = type(loss)
        super().__init__(loss, embedding_size, memory_size=memory_size, miner=miner, **kwargs)

    def check_loss_support(self, loss_name):  # instance method: needs the loss class, not only its name
        _check_support(
            "CrossBatchMemory",
            pml_losses.CrossBatchMemory.supported_losses(),
            loss_name,
            getattr(self, "_loss_cls", None),
        )


class SelfSupervisedLoss(pml_losses.SelfSupervisedLoss):
    """PML's ``SelfSupervisedLoss`` (same arguments and behaviour) accepting registered plugin losses."""

    def __init__(self, loss, symmetric=True, **kwargs):
        self._loss_cls = type(loss)
        super().__init__(loss, symmetric=symmetric, **kwargs)

    def check_loss_support(self, loss_name):
        _check_support(
            "SelfSupervisedLoss",
            pml_losses.SelfSupervisedLoss.supported_losses(),
            loss_name,
            getattr(self, "_loss_cls", None),
        )
