"""Model selection on validation classes: evaluate every epoch, keep the best epoch's weights.

Musgrave et al. (2020) select the model by validation MAP@R on classes held out of the training
classes, never by the test split; the test split is then evaluated once, on the selected model.
:class:`EpochSelection` is what :func:`~pml_plugins.pipeline.train.run_training` takes for that.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .evaluate import evaluate


@dataclass
class EpochSelection:
    """Hold ``held_out`` training classes (remapped ids) out as validation; after every epoch embed
    them, compute the metrics, and keep a copy of the weights of the epoch with the best ``metric``
    (higher is better). ``report(epoch, value)`` is called after each epoch (Optuna's pruning raises
    from it). After training :meth:`restore` loads the best epoch's weights back."""

    held_out: Sequence[int]
    metric: str = "map_at_r"
    report: Optional[Callable[[int, float], None]] = None
    #: filled by the run: (epoch, metric value) of every epoch, the best epoch and its metrics
    history: list = field(default_factory=list)
    best_epoch: Optional[int] = None
    best_metrics: dict = field(default_factory=dict)
    #: (epoch, metrics) of the latest validation, for the per-epoch log
    last: Optional[tuple] = None
    _best_value: float = -math.inf
    _best_state: Optional[dict] = None

    def __post_init__(self) -> None:
        if len(self.held_out) < 2:
            raise ValueError(f"validation needs at least 2 held-out classes, got {list(self.held_out)}")

    def make_hook(
        self,
        modules: dict[str, torch.nn.Module],
        dataset: Any,
        *,
        device: torch.device,
        retrieval_distance: str,
        ks: Sequence[int],
        batch_size: int,
    ) -> Callable[[Any], bool]:
        """The trainer's end-of-epoch hook (``modules``: ``trunk``, ``embedder`` and ``loss``)."""

        def hook(trainer: Any) -> bool:
            metrics = evaluate(
                modules["trunk"],
                modules["embedder"],
                dataset,
                device=device,
                retrieval_distance=retrieval_distance,
                ks=ks,
                batch_size=batch_size,
                progress=False,
            )
            value = float(metrics[self.metric])
            epoch = int(trainer.epoch)
            self.history.append((epoch, value))
            self.last = (epoch, metrics)
            if value > self._best_value or self.best_epoch is None:  # ties keep the earlier epoch
                self._best_value, self.best_epoch, self.best_metrics = value, epoch, metrics
                self._best_state = {k: copy.deepcopy(m.state_dict()) for k, m in modules.items()}
            if self.report is not None:
                self.report(epoch, value)
            return True

        return hook

    def state_dict(self) -> dict:
        """What a training checkpoint keeps of the selection (tensors and plain types), so a resumed
        run selects among all its epochs, the ones before the interruption included."""
        return {
            "held_out": [int(c) for c in self.held_out],
            "metric": self.metric,
            "history": [[int(e), float(v)] for e, v in self.history],
            "best_epoch": self.best_epoch,
            "best_value": float(self._best_value) if self.best_epoch is not None else None,
            "best_metrics": {k: float(v) for k, v in self.best_metrics.items()},
            "best_state": self._best_state,
            "last": None if self.last is None else [int(self.last[0]), {k: float(v) for k, v in self.last[1].items()}],
        }

    def same_classes(self, state: dict) -> bool:
        """Whether ``state`` (from :meth:`state_dict`) validated on these classes with this metric."""
        return state.get("held_out") == [int(c) for c in self.held_out] and state.get("metric") == self.metric

    def load_state_dict(self, state: dict) -> None:
        if not self.same_classes(state):
            raise ValueError(
                f"the checkpoint's epoch selection validated {state.get('metric')} on classes {state.get('held_out')}, "
                f"this run {self.metric} on {[int(c) for c in self.held_out]}"
            )
        self.history = [(int(e), float(v)) for e, v in state["history"]]
        self.best_epoch = state["best_epoch"]
        self._best_value = -math.inf if state["best_value"] is None else float(state["best_value"])
        self.best_metrics = dict(state["best_metrics"])
        self._best_state = state["best_state"]
        self.last = None if state.get("last") is None else (int(state["last"][0]), dict(state["last"][1]))

    def restore(self, modules: dict[str, torch.nn.Module]) -> None:
        """Load the best epoch's weights into ``modules`` (no-op before any epoch ended)."""
        if self._best_state is None:
            return
        for key, module in modules.items():
            module.load_state_dict(self._best_state[key])

    def record(self) -> dict:
        """``best_epoch``, the held-out ``val_classes`` (training-class ids), ``val_<metric>`` of the
        best epoch and the per-epoch ``val_history``."""
        return {
            "best_epoch": self.best_epoch,
            "val_classes": [int(c) for c in self.held_out],
            "val_metrics": {f"val_{k}": v for k, v in self.best_metrics.items()},
            "val_history": [{"epoch": e, f"val_{self.metric}": v} for e, v in self.history],
        }
