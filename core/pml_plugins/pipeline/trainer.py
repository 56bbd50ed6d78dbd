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
    timing, mixed precision for the trunk on CUDA, and what checkpoints need:

    * ``begin_epoch(epoch)`` runs before each epoch's first batch (the run re-seeds every random
      state from the seed and the epoch there) and each epoch draws from a fresh data-loader
      iterator, so epoch e's batches depend on the seed, e and the model only, never on how many
      epochs this process ran before: a run resumed at an epoch boundary continues bit for bit;
    * ``save(epochs_done, steps_into_next, partial_loss_sum)`` after every epoch, and when
      ``should_stop()`` turns true after a step (Ctrl-C), which then raises ``stop_error()``;
    * ``train(..., resume_iteration=i, resume_rng=state)`` replays the first i batches of the
      start epoch's data stream without training on them, then restores the saved random states.
    """

    def __init__(
        self,
        *args: Any,
        progress: bool = True,
        desc: str = "",
        amp_dtype: Optional[torch.dtype] = None,
        after_backward: Optional[Callable[[], None]] = None,
        loss_scale: float = 1.0,
        begin_epoch: Optional[Callable[[int], None]] = None,
        save: Optional[Callable[[int, int, float], None]] = None,
        should_stop: Optional[Callable[[], bool]] = None,
        stop_error: Optional[Callable[[int, int], BaseException]] = None,
        before_step: Optional[Callable[[int, int], None]] = None,
        **kwargs: Any,
    ):
        self._progress, self._desc, self._amp_dtype = progress, desc, amp_dtype
        #: distributed: fixes the loss parameters' gradients; PML's wrapper returns W x the loss
        self._after_backward, self._loss_scale = after_backward, loss_scale
        self._scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 else None
        self._begin_epoch, self._save, self._should_stop = begin_epoch, save, should_stop
        self._stop_error, self._before_step = stop_error, before_step
        self.epoch_seconds: list[float] = []
        self.last_loss = math.nan
        #: mean loss of every epoch, and the epochs whose every iteration had a loss of exactly 0
        #: (nothing was trained: e.g. contrastive with no positive pair in any batch)
        self.epoch_losses: list[float] = []
        self.zero_loss_epochs: list[int] = []
        #: the last epoch whose checkpoint was written (None before the first)
        self.saved_epoch: Optional[int] = None
        #: learning rate of each optimizer during the current epoch (before the epoch's scheduler step)
        self.epoch_lr: dict[str, float] = {}
        super().__init__(*args, **kwargs)

    def configure_checkpoints(
        self,
        *,
        begin_epoch: Optional[Callable[[int], None]] = None,
        save: Optional[Callable[[int, int, float], None]] = None,
        should_stop: Optional[Callable[[], bool]] = None,
        stop_error: Optional[Callable[[int, int], BaseException]] = None,
        before_step: Optional[Callable[[int, int], None]] = None,
    ) -> None:
        """Set the callbacks of the class docstring after construction."""
        self._begin_epoch, self._save, self._should_stop = begin_epoch, save, should_stop
        self._stop_error, self._before_step = stop_error, before_step

    @property
    def scaler(self) -> Optional[torch.amp.GradScaler]:
        """The AMP grad scaler (float16 on CUDA), else None."""
        return self._scaler

    def train(
        self,
        start_epoch: int = 1,
        num_epochs: int = 1,
        *,
        resume_iteration: int = 0,
        resume_total: float = 0.0,
        resume_rng: Optional[dict] = None,
    ) -> None:
        self.initialize_dataloader()
        for self.epoch in range(start_epoch, num_epochs + 1):
            start = time.perf_counter()
            self.epoch_lr = {
                k[: -len("_optimizer")] if k.endswith("_optimizer") else k: float(o.param_groups[0]["lr"])
                for k, o in self.optimizers.items()
            }
            self.set_to_train()
            if self._begin_epoch is not None:
                self._begin_epoch(self.epoch)
            self.dataloader_iter = iter(self.dataloader)
            first, total = 0, 0.0
            if self.epoch == start_epoch and resume_iteration:
                first, total = self._replay(resume_iteration, resume_total, resume_rng)
            pbar = tqdm.tqdm(
                range(first, self.iterations_per_epoch),
                initial=first,
                total=self.iterations_per_epoch,
                desc=f"{self._desc} epoch {self.epoch}/{num_epochs}",
                leave=False,
                disable=not self._progress,
                dynamic_ncols=True,
            )
            all_zero = total == 0.0  # a resumed epoch: the iterations before the resume count too
            for self.iteration in pbar:
                if self._before_step is not None:
                    self._before_step(self.epoch, self.iteration)
                self.forward_and_backward()
                loss = float(torch.as_tensor(self.losses["total_loss"]).detach()) * self._loss_scale
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"the loss became {loss} at epoch {self.epoch}, iteration "
                        f"{self.iteration + 1} (try a lower --lr / --loss-lr)"
                    )
                total += loss
                all_zero = all_zero and loss == 0.0
                self.end_of_iteration_hook(self)
                pbar.set_postfix(
                    loss=f"{loss:.4f}",
                    **({"saved": f"epoch {self.saved_epoch}"} if self.saved_epoch is not None else {}),
                )
                self.step_lr_schedulers(end_of_epoch=False)
                done = self.iteration + 1
                if done < self.iterations_per_epoch and self._stop_requested():
                    pbar.close()
                    self._checkpoint(self.epoch - 1, done, total)  # the step finished: save where we are
                    raise self._interrupted(self.epoch - 1, done)
            self.last_loss = total / max(self.iterations_per_epoch, 1)
            self.epoch_losses.append(self.last_loss)
            if all_zero and self.iterations_per_epoch > 0:
                self.zero_loss_epochs.append(self.epoch)
            self.step_lr_schedulers(end_of_epoch=True)
            self.zero_losses()
            self.epoch_seconds.append(time.perf_counter() - start)
            keep_going = self.end_of_epoch_hook(self) is not False
            self._checkpoint(self.epoch, 0, 0.0)
            if self.epoch < num_epochs and self._stop_requested():
                raise self._interrupted(self.epoch, 0)
            if not keep_going:
                break

    def initialize_dataloader(self) -> None:
        """PML's data loader; a shuffling one draws from its own generator, which ``begin_epoch``
        seeds (the order of epoch e then depends on nothing a training step draws)."""
        self.data_generator = None
        if self.sampler is None:
            self.data_generator = torch.Generator()
            self.dataloader = torch.utils.data.DataLoader(
                self.dataset,
                batch_size=int(self.batch_size),
                shuffle=True,
                drop_last=True,
                num_workers=self.dataloader_num_workers,
                collate_fn=self.collate_fn,
                pin_memory=False,
                generator=self.data_generator,
            )
        else:
            self.dataloader = c_f.get_train_dataloader(
                self.dataset, self.batch_size, self.sampler, self.dataloader_num_workers, self.collate_fn
            )
        if not self.iterations_per_epoch:
            self.iterations_per_epoch = len(self.dataloader)
        self.dataloader_iter = None  # train() starts a fresh iterator every epoch

    def _replay(self, steps: int, total: float, rng: Optional[dict]) -> tuple[int, float]:
        """Draw (and drop) the first ``steps`` batches of this epoch, then restore the random
        states saved after them: the data stream and every RNG are where the interrupted run was."""
        from .checkpoint import restore_rng_state

        if not 0 < steps < self.iterations_per_epoch:
            raise ValueError(f"cannot resume at step {steps} of an epoch of {self.iterations_per_epoch} steps")
        for _ in range(steps):
            self.dataloader_iter, _batch = c_f.try_next_on_generator(self.dataloader_iter, self.dataloader)
        if rng is not None:
            restore_rng_state(rng)
        return steps, float(total)

    def _stop_requested(self) -> bool:
        return self._should_stop is not None and bool(self._should_stop())

    def _checkpoint(self, epoch: int, iteration: int, total: float) -> None:
        if self._save is not None:
            self._save(epoch, iteration, total)
            if not iteration:
                self.saved_epoch = epoch  # the progress bar shows it

    def _interrupted(self, epoch: int, iteration: int) -> BaseException:
        if self._stop_error is not None:
            return self._stop_error(epoch, iteration)
        return KeyboardInterrupt(f"stopped after epoch {epoch}" + (f" + {iteration} steps" if iteration else ""))

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


def build_optimizers(
    models: dict[str, torch.nn.Module],
    loss: torch.nn.Module,
    *,
    optimizer: str,
    lr: float,
    weight_decay: float,
    loss_lr: Optional[float],
) -> dict[str, torch.optim.Optimizer]:
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


def build_schedulers(optimizers: dict[str, torch.optim.Optimizer], step: Optional[int], gamma: float) -> Optional[dict]:
    """Step decay by epoch for every optimizer (PML's ``<name>_scheduler_by_epoch`` keys), or None."""
    if not step:
        return None
    return {
        k.replace("_optimizer", "_scheduler_by_epoch"): torch.optim.lr_scheduler.StepLR(o, step_size=step, gamma=gamma)
        for k, o in optimizers.items()
    }
