"""One training run: registry -> data -> model -> PML ``MetricLossOnly`` -> evaluation -> files.

What a loss declares when it registers is honoured here: ``sampler="m_per_class"`` gives PML's
``MPerClassSampler``; loss parameters get their own optimizer (PML's ``metric_loss_optimizer``)
with the registered ``loss_lr``; a ``training_setup`` callable is called with a
:class:`~pml_plugins.TrainingContext` and its :class:`~pml_plugins.TrainingSetup` is merged into
the trainer; ``retrieval_distance`` picks the evaluation geometry.

:func:`run_training` is the run as a short sequence of named steps; the pieces live in modules of
one job each: :mod:`.builders` (loss and miner from a name), :mod:`.sampling` (batch composition),
:mod:`.trainer` (the loop, optimizers, schedulers), :mod:`.memory` (peak memory), :mod:`.outputs`
(the run folder); the steps themselves: :mod:`.run_state` (what they share), :mod:`.run_trainer`
(loss, setup, sampler, optimizers, validation, DDP -> trainer), :mod:`.run_resume` (checkpoints,
signals, restoring), :mod:`.run_logs` (``metrics.jsonl``, TensorBoard, test embeddings).
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .. import distributed_losses
from .. import registry as reg
from . import data as data_mod
from . import ddp, protocols
from . import models as models_mod
from . import resume as resume_mod
from .builders import build_loss, build_miner, constructor_parameters
from .checkpoint import seed_all
from .class_texts import read_class_texts
from .config import TrainConfig
from .evaluate import evaluate
from .memory import PeakMemory
from .outputs import RunResult, metrics_record, plot_metrics, write_json, write_outputs
from .pretrain import pretrain_classifier, pretrain_epochs_for
from .run_logs import epoch_log_hook, save_test_embeddings, start_logs
from .run_resume import prepare_resumable, restore_run
from .run_state import RunState
from .run_trainer import build_trainer, selected_modules
from .sampling import choose_m
from .selection import EpochSelection
from .trainer import EmbeddingTrainer

__all__ = [
    "RunResult",
    "run_training",
    "build_loss",
    "build_miner",
    "constructor_parameters",
    "choose_m",
    "metrics_record",
    "plot_metrics",
    "write_json",
    "set_seed",
    "resolve_device",
    "PeakMemory",
]


# -- small utilities ---------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    """Seed every RNG the pipeline uses (PML's samplers use numpy's global RNG)."""
    seed_all(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch sees no CUDA device; use --device cpu or auto")
    return device


def _default_backbone(kind: str) -> str:
    return {"embeddings": "identity"}.get(kind, "cnn")


def _versions() -> dict:
    import pytorch_metric_learning

    from .. import __version__

    return {
        "pml_plugins": __version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _machine(device: torch.device) -> dict:
    """Where the run ran, for the report's setting."""
    info = {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# -- the run -----------------------------------------------------------------------------------
def run_training(
    cfg: TrainConfig,
    *,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    name: Optional[str] = None,
    write_checkpoint: bool = True,
    resume: Any = False,
    force: bool = False,
    resume_hint: Optional[str] = None,
    selection: Optional[EpochSelection] = None,
) -> RunResult:
    """Train ``cfg.loss`` (or, with ``cfg.loss=None`` / ``epochs=0``, only evaluate the untrained
    model), evaluate on the test split and write ``metrics.json``, ``config.json``,
    ``checkpoint.pt`` and ``metrics.png`` under ``cfg.out`` (when set).

    ``checkpoint.pt`` is written after every epoch (see :mod:`.resume`). ``resume=True`` continues
    from ``cfg.out``'s checkpoint (settings that differ are refused unless ``force``); ``"auto"``
    continues when the settings match and starts afresh otherwise. SIGINT / SIGTERM during
    training save after the current step and raise :class:`~.resume.TrainingInterrupted`, whose
    message says how to resume (``resume_hint``: the command, default ``train --resume OUT``).

    With ``selection`` its held-out training classes are validated after every epoch and the test
    split is evaluated once, on the weights of the best validation epoch (``result.extra`` holds
    ``best_epoch``, ``val_metrics`` and ``val_history``). A resumed run's selection covers only the
    epochs run after the resume.
    """
    name = name or cfg.loss or "untrained"
    threads = cfg.threads
    if threads is None and (cfg.backbone == "auto" or not cfg.backbone.startswith("timm:")):
        threads = 1
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        if not cfg.distributed:
            return _run(
                cfg,
                name,
                progress=progress,
                log=log,
                write_checkpoint=write_checkpoint,
                resume=(resume, force, resume_hint),
                selection=selection,
            )
        if selection is not None:
            raise ValueError(
                "per-epoch validation (val-classes / folds) is not supported with --distributed; "
                "use --val-classes 0 (the last epoch is reported)"
            )
        env = distributed_losses.env_from_torchrun()
        device = ddp.local_device(resolve_device(cfg.device), env)
        with ddp.process_group(env, device):
            lead = env.rank == 0  # only rank 0 logs, evaluates and writes
            return _run(
                cfg,
                name,
                progress=progress and lead,
                log=log if lead else None,
                write_checkpoint=write_checkpoint,
                env=env,
                device=device,
                resume=(resume, force, resume_hint),
            )
    finally:
        torch.set_num_threads(previous)


def _run(
    cfg: TrainConfig,
    name: str,
    *,
    progress: bool,
    log: Optional[Callable[[str], None]],
    write_checkpoint: bool,
    env: Optional[distributed_losses.DistributedEnv] = None,
    device: Optional[torch.device] = None,
    resume: tuple = (False, False, None),
    selection: Optional[EpochSelection] = None,
) -> RunResult:
    run = RunState(
        cfg=cfg,
        name=name,
        device=device if device is not None else resolve_device(cfg.device),
        progress=progress,
        log=log,
        env=env,
        selection=selection,
    )
    run.amp_dtype = _amp_dtype(run.device, cfg.amp)
    _check_names(run)  # fail fast on names before touching data
    train = cfg.loss is not None and cfg.epochs > 0
    state = resume_mod.find_resumable(cfg.to_dict(), cfg.out, resume[0], resume[1]) if train else None
    if state is not None and selection is not None and not selection.same_classes(state.get("best") or {}):
        # the checkpoint validated on other classes (or not at all): another run
        if resume[0] != "auto":
            raise ValueError(f"--resume {cfg.out}: the checkpoint's per-epoch validation differs from this run's")
        state = None
    _build_model_and_data(run)
    retrieval = cfg.retrieval_distance or "cosine"
    trainer, mem = None, PeakMemory(run.device)
    tb = start_logs(run, resumed_epoch=int(state["epoch"]) if state is not None else 0)
    try:
        if train:
            if state is None:  # a resumed run's weights (pre-trained or not) come from its checkpoint
                _pretrain(run)
            trainer, setup, retrieval = build_trainer(run, epoch_log=epoch_log_hook(run, tb))
            epoch_checkpoints = bool(cfg.out) and write_checkpoint
            with mem, resume_mod.StopSignal(distributed=env is not None, log=log) as stop:
                start = prepare_resumable(run, trainer, setup, state, stop, epoch_checkpoints, resume[2])
                if setup.before_training is not None and (state is None or setup.load_state_dict is None):
                    setup.before_training()
                if state is not None:
                    restore_run(run, trainer, setup, state)
                trainer.train(num_epochs=cfg.epochs, **start)
            write_checkpoint = write_checkpoint and not epoch_checkpoints  # the last epoch's is there already
            if trainer.iterations_per_epoch == 0:
                raise ValueError(f"no full batch of {cfg.batch_size} fits in the training split")
            if selection is not None:  # the test split sees only the model of the best validation epoch
                selection.restore(selected_modules(run, trainer))
        run.resolved["retrieval_distance"] = retrieval
        metrics, kept = {}, {}
        if run.lead:
            metrics = evaluate(
                run.trunk,
                run.embedder,
                run.splits.test,
                device=run.device,
                retrieval_distance=retrieval,
                ks=cfg.ks,
                batch_size=cfg.eval_batch_size,
                progress=progress,
                with_bits=cfg.eval_binarize,
                keep=kept if cfg.out else None,
                gallery=run.splits.gallery,
            )
        result = _result(run, metrics, trainer, mem)
        if cfg.out and run.lead:
            save_test_embeddings(run, kept, retrieval, tb, metrics, step=int(result.extra.get("epochs_run", 0)))
            write_outputs(Path(cfg.out), result, run.trunk, run.embedder, trainer, write_checkpoint)
    finally:
        if tb is not None:
            tb.close()
    return result


def _amp_dtype(device: torch.device, amp: str) -> Optional[torch.dtype]:
    if device.type == "cuda" and amp in ("auto", "on"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "on":
        raise ValueError("--amp on needs a CUDA device (mixed precision is for GPUs here)")
    return None


def _check_names(run: RunState) -> None:
    """Unknown loss / miner / dataset / backbone names fail here, before any data is read."""
    cfg = run.cfg
    run.entry = reg.get_entry("loss", cfg.loss) if cfg.loss is not None else None
    if cfg.miner and run.entry is None:
        raise ValueError("a miner needs a loss")
    if cfg.miner:
        reg.get_entry("miner", cfg.miner)
    kind, _ = data_mod.parse_dataset_spec(cfg.dataset)
    if cfg.class_texts is not None:  # a recipe that names its class texts refuses to start without them
        read_class_texts(cfg.class_texts)
    run.backbone = _default_backbone(kind) if cfg.backbone == "auto" else cfg.backbone
    models_mod.parse_backbone(run.backbone)


def _build_model_and_data(run: RunState) -> None:
    cfg = run.cfg
    set_seed(cfg.seed)
    run.model = models_mod.build_model(
        run.backbone,
        embedding_size=cfg.embedding_size,
        input_shape=data_mod.feature_shape(cfg.dataset),
        image_size=cfg.image_size,
        pooling=cfg.pooling,
        head_norm=cfg.head_norm,
        pretrained=cfg.pretrained,
        head=cfg.head,
    )
    run.splits = data_mod.load_data(cfg.dataset, run.model.transforms)
    if run.selection is not None and cfg.loss is not None and cfg.epochs > 0:
        run.splits = data_mod.hold_out_classes(run.splits, run.selection.held_out)
    # the papers' protocols: --query/--gallery, --samples-per-class (few-shot training)
    run.splits, protocol = protocols.apply_protocols(
        run.splits,
        query=cfg.query,
        gallery=cfg.gallery,
        samples_per_class=cfg.samples_per_class,
        seed=cfg.seed,
        transforms=run.model.transforms,
    )
    run.trunk, run.embedder = run.model.trunk.to(run.device), run.model.embedder.to(run.device)
    run.resolved = {
        "name": run.name,
        "device": str(run.device),
        "amp": str(run.amp_dtype) if run.amp_dtype else "off",
        "backbone": run.backbone,
        "model": run.model.description,
        "data": run.splits.describe(),
        "num_train_classes": run.splits.num_train_classes,
        "threads": torch.get_num_threads(),
        "versions": _versions(),
        "command": sys.argv,
        "machine": _machine(run.device),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **protocol,
    }
    if run.env is not None:
        run.resolved["distributed"] = {
            "world_size": run.env.world_size,
            "rank": run.env.rank,
            "backend": torch.distributed.get_backend(),
        }


def _pretrain(run: RunState) -> None:
    """Classification pre-training when the loss declares it (``pretrain_epochs``) or the user asks."""
    cfg = run.cfg
    epochs = pretrain_epochs_for(cfg.pretrain_epochs, run.entry.spec)
    if epochs == 0:
        return
    if run.env is not None:
        raise ValueError(
            "classification pre-training (pretrain_epochs) runs in one process only; pre-train "
            "without --distributed, or set --pretrain-epochs 0"
        )
    if run.log is not None:
        run.log(f"{run.name}: {epochs} epochs of classification pre-training (linear classifier + cross-entropy)")
    run.resolved["pretraining"] = pretrain_classifier(
        run.trunk,
        run.embedder,
        run.splits.train,
        num_classes=run.splits.num_train_classes,
        embedding_size=cfg.embedding_size,
        epochs=epochs,
        batch_size=cfg.batch_size,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        device=run.device,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        amp_dtype=run.amp_dtype,
        progress=run.progress,
    )


def _result(run: RunState, metrics: dict, trainer: Optional[EmbeddingTrainer], mem: PeakMemory) -> RunResult:
    epoch_seconds = trainer.epoch_seconds if trainer is not None else []
    result = RunResult(
        name=run.name,
        metrics=metrics,
        out=run.cfg.out,
        seconds_per_epoch=(sum(epoch_seconds) / len(epoch_seconds)) if epoch_seconds else None,
        train_seconds=sum(epoch_seconds),
        peak_memory_mb=mem.peak_mb,  # None when nothing was trained (the probe never ran)
        memory_kind=mem.kind,
    )
    result.config = {**run.cfg.to_dict(), "resolved": run.resolved}
    if trainer is not None:
        result.extra = {
            "final_epoch_loss": trainer.last_loss,
            "epochs_run": len(epoch_seconds),
            "iterations_per_epoch": trainer.iterations_per_epoch,
            "epoch_losses": list(trainer.epoch_losses),
            "zero_loss_epochs": list(trainer.zero_loss_epochs),
        }
        if run.selection is not None:
            result.extra.update(run.selection.record())
    return result
