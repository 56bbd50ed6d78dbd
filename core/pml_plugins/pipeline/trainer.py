"""The training loop: PML's ``MetricLossOnly`` with progress, a NaN guard, timing and mixed precision."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Callable, Optional

import torch
import tqdm
from pytorch_metric_learning.trainers import MetricLossOnly
from pytorch_metric_learning.utils import common_functions as c_f


@contextlib.contextmanager
def quiet_pml_logger():
    """PML's trainer logs key-check warnings (e.g. no optimizer for a parameter-free trunk)."""
    logger = c_f.LOGGER
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)



class EmbeddingTrainer(MetricLossOnly):
    """PML's ``MetricLossOnly`` with a labelled, transient tqdm bar, a NaN guard, per-epoch
    timing, and mixed precision for the trunk on CUDA."""

    def __init__(self, *args: Any, progress: bool = True, desc: str = "", amp_dtype: Optional[torch.dtype] = None,
                 after_backward: Optional[Callable[[], None]] = None, loss_scale: float = 1.0, **kwargs: Any):
        self._progress, self._desc, self._amp_dtype = progress, desc, amp_dtype
        #: distributed: fixes the loss parameters' gradients; PML's wrapper returns W x the loss
        self._after_backward, self._loss_scale = after_backward, loss_scale
        self._scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 else None
        self.epoch_seconds: list[float] = []
        self.last_loss = math.nan
        #: mean loss of every epoch, and the epochs whose every iteration had a loss of exactly 0
        #: (nothing was trained: e.g. contrastive with no positive pair in any batch)
        self.epoch_losses: list[float] = []
        self.zero_loss_epochs: list[int] = []
        super().__init__(*args, **kwargs)

    def train(self, start_epoch: int = 1, num_epochs: int = 1) -> None:
        self.initialize_dataloader()
        for self.epoch in range(start_epoch, num_epochs + 1):
            start = time.perf_counter()
            self.set_to_train()
            pbar = tqdm.tqdm(range(self.iterations_per_epoch), desc=f"{self._desc} epoch {self.epoch}/{num_epochs}",
                             leave=False, disable=not self._progress, dynamic_ncols=True)
            total, all_zero = 0.0, True
            for self.iteration in pbar:
                self.forward_and_backward()
                loss = float(torch.as_tensor(self.losses["total_loss"]).detach()) * self._loss_scale
                if not math.isfinite(loss):
                    raise FloatingPointError(f"the loss became {loss} at epoch {self.epoch}, iteration "
                                             f"{self.iteration + 1} (try a lower --lr / --loss-lr)")
                total += loss
                all_zero = all_zero and loss == 0.0
                self.end_of_iteration_hook(self)
                pbar.set_postfix(loss=f"{loss:.4f}")
                self.step_lr_schedulers(end_of_epoch=False)
            self.last_loss = total / max(self.iterations_per_epoch, 1)
            self.epoch_losses.append(self.last_loss)
            if all_zero and self.iterations_per_epoch > 0:
                self.zero_loss_epochs.append(self.epoch)
            self.step_lr_schedulers(end_of_epoch=True)
            self.zero_losses()
            self.epoch_seconds.append(time.perf_counter() - start)
            if self.end_of_epoch_hook(self) is False:
                break

    def get_trunk_output(self, data):
        if self._amp_dtype is None:
            return super().get_trunk_output(data)
        with torch.autocast("cuda", dtype=self._amp_dtype):
            return super().get_trunk_output(data)

    def backward(self) -> None:
        if self._scaler is None:
            super().backward()
        else:
            self._scaler.scale(self.losses["total_loss"]).backward()
        if self._after_backward is not None:
            self._after_backward()

    def step_optimizers(self) -> None:
        if self._scaler is None:
            return super().step_optimizers()
        for k, v in self.optimizers.items():
            if c_f.regex_replace("_optimizer$", "", k) not in self.freeze_these:
                self._scaler.step(v)
        self._scaler.update()


def make_optimizer(name: str, params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay, momentum=0.9)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9)


def chain_hooks(*hooks: Optional[Callable]) -> Callable:
    hooks = [h for h in hooks if h is not None]

    def hook(trainer: Any) -> Any:
        keep_going = True
        for h in hooks:
            if h(trainer) is False:
                keep_going = False
        return keep_going

    return hook



def build_optimizers(models: dict[str, torch.nn.Module], loss: torch.nn.Module, *, optimizer: str, lr: float,
                     weight_decay: float, loss_lr: Optional[float]) -> dict[str, torch.optim.Optimizer]:
    """One optimizer per model with trainable parameters (``<key>_optimizer``, as PML's trainers name
    them) and ``metric_loss_optimizer`` for the loss's own parameters at ``loss_lr``."""
    optimizers = {}
    for key, module in models.items():
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            optimizers[f"{key}_optimizer"] = make_optimizer(optimizer, params, lr, weight_decay)
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    if loss_params:
        optimizers["metric_loss_optimizer"] = make_optimizer(optimizer, loss_params, float(loss_lr), weight_decay)
    return optimizers


def build_schedulers(optimizers: dict[str, torch.optim.Optimizer], step: Optional[int],
                     gamma: float) -> Optional[dict]:
    """Step decay by epoch for every optimizer (PML's ``<name>_scheduler_by_epoch`` keys), or None."""
    if not step:
        return None
    return {k.replace("_optimizer", "_scheduler_by_epoch"): torch.optim.lr_scheduler.StepLR(o, step_size=step,
                                                                                           gamma=gamma)
            for k, o in optimizers.items()}
