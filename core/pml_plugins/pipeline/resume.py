"""Crash-safe training: a checkpoint after every epoch, Ctrl-C / SIGTERM handling, ``--resume``.

How a resumed run ends with the numbers of an uninterrupted one (same seed, CPU):

* every epoch starts by re-seeding torch, numpy, Python and PML's ``NUMPY_RANDOM`` from
  :func:`epoch_seed` (``seed`` and the epoch), and the trainer draws each epoch from a fresh
  data-loader iterator: epoch e's batches do not depend on how many epochs this process ran;
* the checkpoint after epoch e holds every weight and state a step changes (trunk, embedder,
  loss parameters and buffers, optimizers, LR schedulers, the AMP scaler, what the loss's
  training setup keeps), so epoch e + 1 starts from exactly the same state;
* a Ctrl-C saves after the step it interrupts, with the random states of that moment; the
  resumed run replays the epoch's first batches (without training on them) and restores them.

A ``kill -9`` loses the partial epoch it hits: the run resumes from the last epoch's checkpoint.
Under DDP, rank 0 writes, every rank reads, and the ranks agree on when a signal stops them.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from .checkpoint import (
    CHECKPOINT_NAME,
    FORMAT,
    RESUME_FREE_KEYS,
    capture_rng_state,
    check_plain,
    config_diff,
    is_resumable,
    load_checkpoint,
    load_module_state,
    plain_config,
    save_checkpoint,
    seed_all,
)
from .outputs import write_text_atomic

#: test hook: ``"EPOCH:ITERATION:SIGNAL"`` makes the run send itself SIGNAL (e.g. SIGKILL, SIGINT)
#: just before step ITERATION (0-based) of epoch EPOCH, a real signal at a chosen point
TEST_SIGNAL_ENV = "PML_PLUGINS_TEST_SIGNAL"
#: settings that may change between a run and its resumption without --force (where and how it
#: runs; bit-for-bit equality needs the same device, threads and workers)
RESUME_FREE = RESUME_FREE_KEYS


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed every random state gets at the start of ``epoch`` (1-based)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919) % (2**31 - 1)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM stopped training after a step; the checkpoint is saved. The CLI exits 130."""

    def __init__(self, message: str, epoch: int, iteration: int):
        super().__init__(message)
        self.epoch, self.iteration = epoch, iteration

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "interrupted"


class StopSignal:
    """While active, SIGINT and SIGTERM only ask training to stop after the current step (a second
    one stops at once). Under DDP the ranks agree each step (a max all-reduce of the flag), so they
    all stop after the same step. Outside the main thread it installs nothing."""

    def __init__(self, distributed: bool = False, log: Optional[Callable[[str], None]] = None):
        self.distributed, self.log = distributed, log
        self.requested: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:  # the second one: stop now, as without this handler
            raise KeyboardInterrupt(f"{name} again: stopped without saving the current step")
        self.requested = name
        if self.log is not None:
            self.log(f"{name}: finishing the current step, then saving a checkpoint (again to stop at once)")

    def __call__(self) -> bool:
        """Whether to stop now (every rank gets the same answer under DDP)."""
        flag = self.requested is not None
        if self.distributed and torch.distributed.is_initialized():
            t = torch.tensor([1 if flag else 0], dtype=torch.int64)
            if torch.distributed.get_backend() == "nccl":
                t = t.cuda()
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self.requested is None:
                self.requested = "a signal on another rank"
        return flag


def test_signal_hook() -> Optional[Callable[[int, int], None]]:
    """The :data:`TEST_SIGNAL_ENV` hook, or None when the variable is not set."""
    spec = os.environ.get(TEST_SIGNAL_ENV)
    if not spec:
        return None
    try:
        epoch, iteration, name = spec.split(":")
        at, sig = (int(epoch), int(iteration)), getattr(signal, name)
    except (ValueError, AttributeError):
        raise ValueError(f"{TEST_SIGNAL_ENV} must look like EPOCH:ITERATION:SIGNAME, got {spec!r}") from None

    def hook(e: int, i: int) -> None:
        if (e, i) == at:
            os.kill(os.getpid(), sig)
            time.sleep(0.05)  # let the handler run before the step starts

    return hook


def reseed(seed: int, rank: int = 0) -> None:
    """Every random state from ``seed`` (DDP: torch's per rank, for distinct augmentation streams)."""
    seed_all(seed)
    if rank:
        torch.manual_seed(seed + rank)


def begin_epoch_fn(cfg_seed: int, trainer_ref: Callable[[], Any], rank: int = 0) -> Callable[[int], None]:
    """``begin_epoch(epoch)`` for the trainer: re-seed, seed the loader's generator, set sampler epochs."""

    def begin(epoch: int) -> None:
        seed = epoch_seed(cfg_seed, epoch)
        reseed(seed, rank)
        trainer = trainer_ref()
        generator = getattr(trainer, "data_generator", None)
        if generator is not None:
            generator.manual_seed(seed)
        reset_sampler(getattr(trainer, "sampler", None), epoch)

    return begin


def reset_sampler(sampler: Any, epoch: int) -> None:
    """Make a sampler's draw for ``epoch`` independent of earlier epochs: ``set_epoch(epoch - 1)``
    where it has one (DDP's samplers), and PML's ``MPerClassSampler``, which shuffles its label list
    in place every epoch, gets its first order back. Wrappers (``.base``) are followed."""
    seen = 0
    while sampler is not None and seen < 8:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch - 1)
        labels = getattr(sampler, "labels", None)
        if labels is not None and hasattr(sampler, "labels_to_indices"):
            initial = getattr(sampler, "_initial_labels", None)
            if initial is None:
                sampler._initial_labels = initial = copy.copy(labels)
            sampler.labels = copy.copy(initial)
        sampler, seen = getattr(sampler, "base", None), seen + 1


# -- what a checkpoint holds -------------------------------------------------------------------------
def unwrap(module: Any) -> Any:
    """The loss or model inside a DDP / distributed-loss wrapper."""
    from .. import distributed_losses

    if isinstance(module, distributed_losses.DistributedLossWrapper):
        return module.loss
    return (
        getattr(module, "module", module) if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
    )


def training_state(
    trainer: Any,
    *,
    trunk: torch.nn.Module,
    embedder: torch.nn.Module,
    loss: torch.nn.Module,
    setup: Any,
    config: Mapping,
    resolved: Mapping,
    epoch: int,
    iteration: int,
    total: float,
    rng: Any,
    selection: Any = None,
) -> dict:
    """The checkpoint dict (tensors and plain types only; checked). ``best`` holds the per-epoch
    model selection (:class:`~.selection.EpochSelection`) of a run that validates, else None."""
    schedulers = trainer.lr_schedulers or {}
    plugin = setup.state_dict() if getattr(setup, "state_dict", None) is not None else None
    state = {
        "format": FORMAT,
        "epoch": int(epoch),
        "iteration": int(iteration),
        "trunk": trunk.state_dict(),
        "embedder": embedder.state_dict(),
        "loss": loss.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in trainer.optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "plugin": plugin,
        "rng": rng,
        "trainer": {
            "epoch_seconds": [float(s) for s in trainer.epoch_seconds],
            "last_loss": float(trainer.last_loss),
            "partial_loss_sum": float(total),
            "iterations_per_epoch": int(trainer.iterations_per_epoch),
        },
        # the best validation epoch so far, its metrics and weights (runs with per-epoch validation)
        "best": selection.state_dict() if selection is not None else None,
        "config": plain_config(config),
        "resolved": plain_config(resolved),
    }
    check_plain(state["plugin"], "the training setup's state_dict()")
    check_plain(state)  # a checkpoint that needs pickle would be refused when read back: fail now
    return state


def make_saver(
    trainer_ref: Callable[[], Any], *, out: Path, keep_last: int, env: Any, log: Optional[Callable], **parts: Any
) -> Callable[[int, int, float], None]:
    """``save(epoch, iteration, total)`` for the trainer. Under DDP every rank calls it (the random
    states of all ranks are gathered) and rank 0 writes."""

    def save(epoch: int, iteration: int, total: float) -> None:
        rng: Any = capture_rng_state()
        if env is not None and torch.distributed.is_initialized():
            states: list = [None] * env.world_size
            torch.distributed.all_gather_object(states, rng)
            rng = {"ranks": states}
        if env is not None and env.rank != 0:
            return
        state = training_state(trainer_ref(), epoch=epoch, iteration=iteration, total=total, rng=rng, **parts)
        path = save_checkpoint(state, out, keep_last=keep_last)
        if log is not None and iteration == 0:
            log(f"saved epoch {epoch} to {path}")

    return save


def rank_rng(state: Mapping, rank: int) -> Optional[dict]:
    """This rank's random states from a checkpoint (rank 0's in a checkpoint of another world size)."""
    rng = state.get("rng")
    if isinstance(rng, Mapping) and "ranks" in rng:
        ranks = rng["ranks"]
        return ranks[rank] if rank < len(ranks) else ranks[0]
    return rng


def restore_training(
    state: Mapping,
    trainer: Any,
    *,
    trunk: torch.nn.Module,
    embedder: torch.nn.Module,
    loss: torch.nn.Module,
    setup: Any,
    source: str,
    selection: Any = None,
) -> None:
    """Load a checkpoint's weights and states into the built run (one-line errors on mismatch)."""
    load_module_state(trunk, state["trunk"], "trunk", source)
    load_module_state(embedder, state["embedder"], "embedding head", source)
    if state.get("loss") is not None:
        load_module_state(loss, state["loss"], f"loss ({type(loss).__name__})", source)
    saved, own = state.get("optimizers") or {}, trainer.optimizers
    if sorted(saved) != sorted(own):
        raise ValueError(f"{source} has optimizers {sorted(saved)}, this run {sorted(own)} (another loss or model?)")
    for key, opt in own.items():
        try:
            opt.load_state_dict(saved[key])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(f"{source}: {key} does not fit this run ({str(exc).splitlines()[0]})") from None
    for key, sched in (trainer.lr_schedulers or {}).items():
        if key in (state.get("schedulers") or {}):
            sched.load_state_dict(state["schedulers"][key])
    if trainer.scaler is not None and state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    if state.get("plugin") is not None:
        if getattr(setup, "load_state_dict", None) is None:
            raise ValueError(
                f"{source} holds training-setup state, but this loss's training setup has no "
                f"load_state_dict (another loss or plugin version?)"
            )
        setup.load_state_dict(state["plugin"])
    if selection is not None:
        if state.get("best") is None:
            raise ValueError(f"{source} was saved without per-epoch validation: it cannot continue one that validates")
        selection.load_state_dict(state["best"])
    info = state.get("trainer") or {}
    trainer.epoch_seconds = list(info.get("epoch_seconds", []))
    trainer.last_loss = float(info.get("last_loss", float("nan")))


# -- deciding whether to resume ----------------------------------------------------------------------
def differences(saved: Mapping, current: Mapping) -> list[str]:
    return config_diff(saved, current, ignore=RESUME_FREE)


def find_resumable(cfg_dict: Mapping, out: Optional[str], mode: Any, force: bool = False) -> Optional[dict]:
    """The checkpoint to resume from, or None to start afresh.

    ``mode`` True (``--resume``): OUT must hold a resumable checkpoint with the same settings
    (differences are refused, listed, unless ``force``); ``"auto"`` (``compare``): resume when the
    settings match, else start afresh; False: never.
    """
    if not mode or not out:
        return None
    path = Path(out) / CHECKPOINT_NAME
    if mode == "auto" and not path.is_file():
        return None
    if not Path(out).is_dir():
        raise FileNotFoundError(f"--resume: run folder {str(out)!r} does not exist")
    try:
        state = load_checkpoint(out)
    except (ValueError, FileNotFoundError):
        if mode == "auto":
            return None  # a broken checkpoint in a compare folder: train that run again
        raise
    if not is_resumable(state):
        if mode == "auto":
            return None
        raise ValueError(
            f"checkpoint {str(path)!r} holds final weights only (written by an older pml-plugins): it cannot be resumed"
        )
    diffs = differences(state.get("config") or {}, cfg_dict)
    if diffs and not force:
        if mode == "auto":
            return None
        raise ValueError(
            f"--resume {out}: the settings differ from the checkpoint's: "
            + "; ".join(diffs)
            + " (use --force to continue anyway; it is recorded in the run folder)"
        )
    state["forced_differences"] = diffs
    return state


def record_resume(out: Path, state: Mapping, forced: list) -> None:
    """Append this resumption to ``OUT/resumed.json`` (when, from which epoch, forced differences)."""
    path = Path(out) / "resumed.json"
    try:
        history = json.loads(path.read_text()) if path.is_file() else []
    except (json.JSONDecodeError, OSError):
        history = []
    history.append(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "from_epoch": int(state.get("epoch", 0)),
            "from_iteration": int(state.get("iteration", 0)),
            "forced_differences": list(forced),
        }
    )
    write_text_atomic(path, json.dumps(history, indent=2) + "\n")


def interrupted_message(out: Optional[str], epoch: int, iteration: int, resume_hint: Optional[str]) -> str:
    where = f"epoch {epoch}" + (f" + {iteration} steps of epoch {epoch + 1}" if iteration else "")
    saved = f"saved {where} to {Path(out) / CHECKPOINT_NAME}" if out else f"stopped after {where} (no --out: not saved)"
    hint = resume_hint or (f"pml-plugins train --resume {out}" if out else None)
    return f"interrupted: {saved}" + (f"; resume with: {hint}" if hint and out else "")


__all__ = [
    "TrainingInterrupted",
    "StopSignal",
    "epoch_seed",
    "find_resumable",
    "restore_training",
    "make_saver",
    "training_state",
    "record_resume",
    "interrupted_message",
    "TEST_SIGNAL_ENV",
    "RESUME_FREE",
]
