"""One training run: registry -> data -> model -> PML ``MetricLossOnly`` -> evaluation -> files.

What a loss declares when it registers is honoured here: ``sampler="m_per_class"`` gives PML's
``MPerClassSampler``; loss parameters get their own optimizer (PML's ``metric_loss_optimizer``)
with the registered ``loss_lr``; a ``training_setup`` callable is called with a
:class:`~pml_plugins.TrainingContext` and its :class:`~pml_plugins.TrainingSetup` is merged into
the trainer; ``retrieval_distance`` picks the evaluation geometry.

:func:`run_training` is the run as a short sequence of named steps; the pieces live in modules of
one job each: :mod:`.builders` (loss and miner from a name), :mod:`.sampling` (batch composition),
:mod:`.trainer` (the loop, optimizers, schedulers), :mod:`.memory` (peak memory), :mod:`.outputs`
(the run folder).
"""
from __future__ import annotations

import platform
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from pytorch_metric_learning.utils import common_functions as c_f

from .. import distributed as dist_mod
from .. import registry as reg
from ..training import TrainingContext, TrainingSetup
from . import data as data_mod
from . import distributed as ddp_mod
from . import models as models_mod
from .builders import build_loss, build_miner, constructor_parameters
from .config import TrainConfig
from .evaluate import evaluate
from .memory import PeakMemory
from .outputs import RunResult, metrics_record, plot_metrics, write_json, write_outputs
from .sampling import choose_m, m_per_class_sampler, preferred_m
from .selection import EpochSelection
from .trainer import EmbeddingTrainer, build_optimizers, build_schedulers, chain_hooks, quiet_pml_logger

__all__ = ["RunResult", "run_training", "build_loss", "build_miner", "constructor_parameters", "choose_m",
           "metrics_record", "plot_metrics", "write_json", "set_seed", "resolve_device", "PeakMemory"]


# -- small utilities ---------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    """Seed every RNG the pipeline uses (PML's samplers use numpy's global RNG)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if isinstance(c_f.NUMPY_RANDOM, np.random.RandomState):
        c_f.NUMPY_RANDOM.seed(seed % (2**32))


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

    return {"pml_plugins": __version__, "pytorch_metric_learning": pytorch_metric_learning.__version__,
            "torch": torch.__version__, "python": platform.python_version()}



# -- the run -----------------------------------------------------------------------------------
def run_training(cfg: TrainConfig, *, progress: bool = True, log: Optional[Callable[[str], None]] = None,
                 name: Optional[str] = None, write_checkpoint: bool = True,
                 selection: Optional[EpochSelection] = None) -> RunResult:
    """Train ``cfg.loss`` (or, with ``cfg.loss=None`` / ``epochs=0``, only evaluate the untrained
    model), evaluate on the test split and write ``metrics.json``, ``config.json``,
    ``checkpoint.pt`` and ``metrics.png`` under ``cfg.out`` (when set).

    With ``selection`` its held-out training classes are validated after every epoch and the test
    split is evaluated once, on the weights of the best validation epoch (``result.extra`` holds
    ``best_epoch``, ``val_metrics`` and ``val_history``)."""
    name = name or cfg.loss or "untrained"
    threads = cfg.threads
    if threads is None and (cfg.backbone == "auto" or not cfg.backbone.startswith("timm:")):
        threads = 1
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        if not cfg.distributed:
            return _run(cfg, name, progress=progress, log=log, write_checkpoint=write_checkpoint, selection=selection)
        if selection is not None:
            raise ValueError("per-epoch validation (val-classes / folds) is not supported with --distributed; "
                             "use --val-classes 0 (the last epoch is reported)")
        env = dist_mod.env_from_torchrun()
        device = ddp_mod.local_device(resolve_device(cfg.device), env)
        with ddp_mod.process_group(env, device):
            lead = env.rank == 0  # only rank 0 logs, evaluates and writes
            return _run(cfg, name, progress=progress and lead, log=log if lead else None,
                        write_checkpoint=write_checkpoint, env=env, device=device)
    finally:
        torch.set_num_threads(previous)


@dataclass
class _Run:
    """What the steps of one run share (built by :func:`_run`, read and extended by each step)."""

    cfg: TrainConfig
    name: str
    device: torch.device
    progress: bool
    log: Optional[Callable[[str], None]]
    env: Optional[dist_mod.DistributedEnv]
    amp_dtype: Optional[torch.dtype] = None
    entry: Optional[reg.Entry] = None
    backbone: str = ""
    model: Any = None
    splits: Any = None
    trunk: Optional[torch.nn.Module] = None
    embedder: Optional[torch.nn.Module] = None
    resolved: dict = None  # type: ignore[assignment]
    selection: Optional[EpochSelection] = None

    @property
    def lead(self) -> bool:
        """Only rank 0 logs, evaluates and writes."""
        return self.env is None or self.env.rank == 0


def _run(cfg: TrainConfig, name: str, *, progress: bool, log: Optional[Callable[[str], None]],
         write_checkpoint: bool, env: Optional[dist_mod.DistributedEnv] = None,
         device: Optional[torch.device] = None, selection: Optional[EpochSelection] = None) -> RunResult:
    run = _Run(cfg=cfg, name=name, device=device if device is not None else resolve_device(cfg.device),
               progress=progress, log=log, env=env, selection=selection)
    run.amp_dtype = _amp_dtype(run.device, cfg.amp)
    _check_names(run)  # fail fast on names before touching data
    _build_model_and_data(run)
    train = cfg.loss is not None and cfg.epochs > 0
    retrieval = cfg.retrieval_distance or "cosine"
    trainer, mem = None, PeakMemory(run.device)
    if train:
        trainer, setup, retrieval = _build_trainer(run)
        with mem:
            if setup.before_training is not None:
                setup.before_training()
            trainer.train(num_epochs=cfg.epochs)
        if trainer.iterations_per_epoch == 0:
            raise ValueError(f"no full batch of {cfg.batch_size} fits in the training split")
        if selection is not None:  # the test split sees only the model of the best validation epoch
            selection.restore(_selected_modules(run, trainer))
    run.resolved["retrieval_distance"] = retrieval
    metrics = {}
    if run.lead:
        metrics = evaluate(run.trunk, run.embedder, run.splits.test, device=run.device, retrieval_distance=retrieval,
                           ks=cfg.ks, batch_size=cfg.eval_batch_size, progress=progress, with_bits=cfg.eval_binarize)
    result = _result(run, metrics, trainer, mem if train else None)
    if cfg.out and run.lead:
        write_outputs(Path(cfg.out), result, run.trunk, run.embedder, trainer, write_checkpoint)
    return result


def _amp_dtype(device: torch.device, amp: str) -> Optional[torch.dtype]:
    if device.type == "cuda" and amp in ("auto", "on"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "on":
        raise ValueError("--amp on needs a CUDA device (mixed precision is for GPUs here)")
    return None


def _check_names(run: _Run) -> None:
    """Unknown loss / miner / dataset / backbone names fail here, before any data is read."""
    cfg = run.cfg
    run.entry = reg.get_entry("loss", cfg.loss) if cfg.loss is not None else None
    if cfg.miner and run.entry is None:
        raise ValueError("a miner needs a loss")
    if cfg.miner:
        reg.get_entry("miner", cfg.miner)
    kind, _ = data_mod.parse_dataset_spec(cfg.dataset)
    run.backbone = _default_backbone(kind) if cfg.backbone == "auto" else cfg.backbone
    models_mod.parse_backbone(run.backbone)


def _build_model_and_data(run: _Run) -> None:
    cfg = run.cfg
    set_seed(cfg.seed)
    run.model = models_mod.build_model(run.backbone, embedding_size=cfg.embedding_size,
                                       input_shape=data_mod.feature_shape(cfg.dataset), image_size=cfg.image_size,
                                       pooling=cfg.pooling, head_norm=cfg.head_norm, pretrained=cfg.pretrained)
    run.splits = data_mod.load_data(cfg.dataset, run.model.transforms)
    if run.selection is not None and cfg.loss is not None and cfg.epochs > 0:
        run.splits = data_mod.hold_out_classes(run.splits, run.selection.held_out)
    run.trunk, run.embedder = run.model.trunk.to(run.device), run.model.embedder.to(run.device)
    run.resolved = {"name": run.name, "device": str(run.device),
                    "amp": str(run.amp_dtype) if run.amp_dtype else "off", "backbone": run.backbone,
                    "model": run.model.description, "data": run.splits.describe(),
                    "num_train_classes": run.splits.num_train_classes, "threads": torch.get_num_threads(),
                    "versions": _versions(), "command": sys.argv}
    if run.env is not None:
        run.resolved["distributed"] = {"world_size": run.env.world_size, "rank": run.env.rank,
                                       "backend": torch.distributed.get_backend()}


def _build_trainer(run: _Run) -> tuple[EmbeddingTrainer, TrainingSetup, str]:
    """Loss, miner, the loss's training setup, sampler, optimizers and DDP wrapping -> PML trainer."""
    cfg, env, resolved = run.cfg, run.env, run.resolved
    loss, entry, loss_args, options = build_loss(run.entry.qualified_name, num_classes=run.splits.num_train_classes,
                                                 embedding_size=cfg.embedding_size, loss_args=cfg.loss_args,
                                                 loss_options=cfg.loss_options)
    loss = loss.to(run.device)
    semantics = None
    if env is not None:  # refuse a loss that cannot run distributed before touching the data
        semantics = dist_mod.check_distributed_support(entry, efficient=cfg.distributed_efficient)
        dist_mod.broadcast_module(loss)
    needs = entry.needs()
    retrieval = cfg.retrieval_distance or needs["retrieval_distance"] or "cosine"
    miner = build_miner(cfg.miner, cfg.miner_args)[0] if cfg.miner else None
    resolved.update(loss=entry.qualified_name, loss_class=f"{type(loss).__module__}.{type(loss).__qualname__}",
                    loss_plugin=f"{entry.distribution or entry.plugin} {entry.version or ''}".strip(),
                    loss_args=loss_args, loss_needs={k: v for k, v in needs.items()})

    setup = _training_setup(run, loss, entry, options)
    # Every loss run with the same seed draws the same batches (when it uses the same sampler):
    # building the loss consumed random numbers a different loss does not.
    set_seed(cfg.seed)
    train_dataset = setup.train_dataset if setup.train_dataset is not None else run.splits.train
    sampler, m = _sampler(run, entry, needs, setup, train_dataset)
    local_batch = cfg.batch_size
    if env is not None:  # each rank takes its slice of the same global batches
        base = sampler if sampler is not None else ddp_mod.GlobalRandomSampler(len(train_dataset), cfg.seed)
        sampler = ddp_mod.RankSliceSampler(base, cfg.batch_size, env.rank, env.world_size)
        local_batch = sampler.local_batch_size
        resolved["distributed"].update({
            "global_batch_size": cfg.batch_size, "local_batch_size": local_batch,
            "efficient": cfg.distributed_efficient, "loss_semantics": semantics or "not declared",
            "loss_parameter_gradients":
                f"all-reduced sum / {env.world_size if cfg.distributed_efficient else env.world_size ** 2}"})

    models = {"trunk": run.trunk, "embedder": run.embedder}
    has_loss_params = any(p.requires_grad for p in loss.parameters())
    loss_lr = float(cfg.loss_lr if cfg.loss_lr is not None else (needs["loss_lr"] or cfg.lr)) if has_loss_params else None
    optimizers = build_optimizers(models, loss, optimizer=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  loss_lr=loss_lr)
    resolved["loss_lr"] = loss_lr
    if run.log is not None:
        lr_text = f", loss parameters lr {loss_lr:g}" if loss_lr is not None else ""
        sampler_text = f"m-per-class (m={m})" if m else resolved["sampler"]
        views = f", {setup.views_per_sample} views/sample" if setup.views_per_sample != 1 else ""
        run.log(f"{run.name}: {type(loss).__name__} [{resolved['loss_plugin']}] on {run.splits.describe()}; "
                f"{run.model.description}; {cfg.epochs} epochs x batch {cfg.batch_size}, sampler {sampler_text}"
                f"{views}, {cfg.optimizer} lr {cfg.lr:g}{lr_text}; {run.device}; retrieval {retrieval}")
    schedulers = build_schedulers(optimizers, cfg.lr_step, cfg.lr_gamma)
    metric_loss, after_backward, loss_scale = loss, None, 1.0
    if env is not None:
        models = {k: ddp_mod.wrap_model(v, run.device) for k, v in models.items()}
        metric_loss = dist_mod.wrap_loss(loss, entry, efficient=cfg.distributed_efficient)
        miner = dist_mod.wrap_miner(miner, efficient=cfg.distributed_efficient) if miner is not None else None
        if has_loss_params:
            def after_backward() -> None:
                dist_mod.average_loss_gradients(loss, efficient=cfg.distributed_efficient)
        loss_scale = 1.0 / env.world_size
        if run.log is not None:
            run.log(f"distributed: {env.world_size} processes ({resolved['distributed']['backend']}), global batch "
                    f"{cfg.batch_size} = {env.world_size} x {local_batch}; {run.name} semantics: "
                    f"{semantics or 'not declared'}")
        torch.manual_seed(cfg.seed + env.rank)  # distinct augmentation streams; samplers are shared
    with quiet_pml_logger():
        trainer = EmbeddingTrainer(models=models, optimizers=optimizers, batch_size=local_batch,
                                   loss_funcs={"metric_loss": metric_loss}, dataset=train_dataset,
                                   mining_funcs={"tuple_miner": miner} if miner is not None else {},
                                   iterations_per_epoch=cfg.iterations_per_epoch, data_device=run.device,
                                   sampler=sampler, collate_fn=setup.collate_fn, lr_schedulers=schedulers,
                                   dataloader_num_workers=cfg.num_workers,
                                   end_of_iteration_hook=chain_hooks(setup.end_of_iteration_hook),
                                   end_of_epoch_hook=chain_hooks(setup.end_of_epoch_hook,
                                                                 _selection_hook(run, loss, retrieval)),
                                   progress=run.progress, desc=run.name, amp_dtype=run.amp_dtype,
                                   after_backward=after_backward, loss_scale=loss_scale)
    return trainer, setup, retrieval


def _selected_modules(run: _Run, trainer: Any) -> dict[str, torch.nn.Module]:
    return {"trunk": run.trunk, "embedder": run.embedder, "loss": trainer.loss_funcs["metric_loss"]}


def _selection_hook(run: _Run, loss: torch.nn.Module, retrieval: str) -> Optional[Callable]:
    """Validation after every epoch (after the loss's own hook, e.g. a database refresh)."""
    if run.selection is None:
        return None
    modules = {"trunk": run.trunk, "embedder": run.embedder, "loss": loss}
    return run.selection.make_hook(modules, run.splits.val, device=run.device, retrieval_distance=retrieval,
                                   ks=run.cfg.ks, batch_size=run.cfg.eval_batch_size)


def _training_setup(run: _Run, loss: torch.nn.Module, entry: reg.Entry, options: dict) -> TrainingSetup:
    """What the loss asks of the trainer (multi-view batches, a database refresh, ...)."""
    training_setup = entry.metadata.get("training_setup")
    if not callable(training_setup):
        if options:
            raise TypeError(f"loss {entry.name!r} has no training_setup, so it takes no loss options {sorted(options)}")
        return TrainingSetup()
    cfg, env, device, trunk, embedder = run.cfg, run.env, run.device, run.trunk, run.embedder

    def embed(x: torch.Tensor) -> torch.Tensor:
        modes = trunk.training, embedder.training
        trunk.eval(), embedder.eval()
        try:
            with torch.no_grad():
                return embedder(trunk(c_f.to_device(x, device=device)))
        finally:
            trunk.train(modes[0]), embedder.train(modes[1])

    context = TrainingContext(trunk=trunk, embedder=embedder, train_dataset=run.splits.train,
                              batch_size=cfg.batch_size, epochs=cfg.epochs, device=device, seed=cfg.seed,
                              num_workers=cfg.num_workers, embed=embed, options=dict(options),
                              progress=run.progress, rank=env.rank if env is not None else 0,
                              world_size=env.world_size if env is not None else 1)
    setup = training_setup(loss, context) or TrainingSetup()
    if not isinstance(setup, TrainingSetup):
        raise TypeError(f"{entry.name}'s training_setup returned {type(setup).__name__}, "
                        f"expected pml_plugins.TrainingSetup")
    run.resolved["training_setup"] = {"options": options, "views_per_sample": setup.views_per_sample,
                                      "replaces_dataset": setup.train_dataset is not None,
                                      "sampler": type(setup.sampler).__name__ if setup.sampler else None}
    return setup


def _sampler(run: _Run, entry: reg.Entry, needs: dict, setup: TrainingSetup,
             train_dataset: Any) -> tuple[Any, Optional[int]]:
    """The setup's own sampler, else m-per-class when asked (``--sampler`` or the loss's spec), else random."""
    cfg = run.cfg
    sampler_name = cfg.sampler
    if sampler_name == "auto":
        sampler_name = "m-per-class" if needs["sampler"] == "m_per_class" else "random"
    sampler, m = setup.sampler, None
    if sampler is None and sampler_name == "m-per-class":
        labels = run.splits.train_labels if setup.train_dataset is None else data_mod.dataset_labels(train_dataset)
        sampler, m = m_per_class_sampler(labels, cfg.batch_size, cfg.m, preferred_m(entry.metadata))
    if sampler is None and cfg.batch_size > len(train_dataset):
        raise ValueError(f"batch size {cfg.batch_size} is larger than the training split "
                         f"({len(train_dataset)} samples)")
    run.resolved["sampler"] = (type(setup.sampler).__name__ if setup.sampler is not None
                               else ("MPerClassSampler" if m else "random"))
    run.resolved["m"] = m
    return sampler, m


def _result(run: _Run, metrics: dict, trainer: Optional[EmbeddingTrainer], mem: Optional[PeakMemory]) -> RunResult:
    epoch_seconds = trainer.epoch_seconds if trainer is not None else []
    result = RunResult(name=run.name, metrics=metrics, out=run.cfg.out,
                       seconds_per_epoch=(sum(epoch_seconds) / len(epoch_seconds)) if epoch_seconds else None,
                       train_seconds=sum(epoch_seconds), peak_memory_mb=mem.peak_mb if mem is not None else None,
                       memory_kind=mem.kind if mem is not None else PeakMemory(run.device).kind)
    result.config = {**run.cfg.to_dict(), "resolved": run.resolved}
    if trainer is not None:
        result.extra = {"final_epoch_loss": trainer.last_loss, "epochs_run": len(epoch_seconds),
                        "iterations_per_epoch": trainer.iterations_per_epoch,
                        "epoch_losses": list(trainer.epoch_losses), "zero_loss_epochs": list(trainer.zero_loss_epochs)}
        if run.selection is not None:
            result.extra.update(run.selection.record())
    return result
