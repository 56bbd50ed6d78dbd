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

import datetime
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from pytorch_metric_learning.utils import common_functions as c_f

from .. import distributed_losses
from .. import registry as reg
from ..specs import LossSpec
from ..training_protocol import TrainingContext, TrainingSetup
from . import data as data_mod
from . import ddp, protocols
from . import models as models_mod
from . import resume as resume_mod
from .builders import build_loss, build_miner, constructor_parameters
from .checkpoint import seed_all
from .class_texts import class_distances_for_run, read_class_texts
from .config import TrainConfig
from .evaluate import evaluate
from .memory import PeakMemory
from .outputs import RunResult, metrics_record, plot_metrics, write_json, write_outputs
from .pretrain import pretrain_classifier, pretrain_epochs_for
from .sampling import choose_m, m_per_class_sampler, preferred_m
from .selection import EpochSelection
from .trainer import EmbeddingTrainer, build_optimizers, build_schedulers, chain_hooks, quiet_pml_logger

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


@dataclass
class _Run:
    """What the steps of one run share (built by :func:`_run`, read and extended by each step)."""

    cfg: TrainConfig
    name: str
    device: torch.device
    progress: bool
    log: Optional[Callable[[str], None]]
    env: Optional[distributed_losses.DistributedEnv]
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
    run = _Run(
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
    tb = _start_logs(run, resumed_epoch=int(state["epoch"]) if state is not None else 0)
    try:
        if train:
            if state is None:  # a resumed run's weights (pre-trained or not) come from its checkpoint
                _pretrain(run)
            trainer, setup, retrieval = _build_trainer(run, epoch_log=_epoch_log(run, tb))
            epoch_checkpoints = bool(cfg.out) and write_checkpoint
            with mem, resume_mod.StopSignal(distributed=env is not None, log=log) as stop:
                start = _prepare_resumable(run, trainer, setup, state, stop, epoch_checkpoints, resume[2])
                if setup.before_training is not None and (state is None or setup.load_state_dict is None):
                    setup.before_training()
                if state is not None:
                    _restore(run, trainer, setup, state)
                trainer.train(num_epochs=cfg.epochs, **start)
            write_checkpoint = write_checkpoint and not epoch_checkpoints  # the last epoch's is there already
            if trainer.iterations_per_epoch == 0:
                raise ValueError(f"no full batch of {cfg.batch_size} fits in the training split")
            if selection is not None:  # the test split sees only the model of the best validation epoch
                selection.restore(_selected_modules(run, trainer))
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
        result = _result(run, metrics, trainer, mem if train else None)
        if cfg.out and run.lead:
            _save_test_embeddings(run, kept, retrieval, tb, metrics, step=int(result.extra.get("epochs_run", 0)))
            write_outputs(Path(cfg.out), result, run.trunk, run.embedder, trainer, write_checkpoint)
    finally:
        if tb is not None:
            tb.close()
    return result


def _prepare_resumable(
    run: _Run,
    trainer: EmbeddingTrainer,
    setup: TrainingSetup,
    state: Optional[dict],
    stop: resume_mod.StopSignal,
    save: bool,
    hint: Optional[str],
) -> dict:
    """Per-epoch seeding, checkpoints and signal handling for the trainer; where training starts."""
    cfg, env = run.cfg, run.env
    rank = env.rank if env is not None else 0
    loss = resume_mod.unwrap(trainer.loss_funcs["metric_loss"])
    saver = None
    if save:
        saver = resume_mod.make_saver(
            lambda: trainer,
            out=Path(cfg.out),
            keep_last=cfg.keep_last,
            env=env,
            log=run.log,
            trunk=run.trunk,
            embedder=run.embedder,
            loss=loss,
            setup=setup,
            config=cfg.to_dict(),
            resolved=run.resolved,
            selection=run.selection,
        )

    def stop_error(epoch: int, iteration: int) -> BaseException:
        text = resume_mod.interrupted_message(cfg.out if save else None, epoch, iteration, hint) if run.lead else ""
        return resume_mod.TrainingInterrupted(text, epoch, iteration)

    trainer.configure_checkpoints(
        begin_epoch=resume_mod.begin_epoch_fn(cfg.seed, lambda: trainer, rank),
        save=saver,
        should_stop=stop,
        stop_error=stop_error,
        before_step=resume_mod.test_signal_hook(),
    )
    if state is None:
        return {}
    return {
        "start_epoch": int(state["epoch"]) + 1,
        "resume_iteration": int(state.get("iteration", 0)),
        "resume_total": float((state.get("trainer") or {}).get("partial_loss_sum", 0.0)),
        "resume_rng": resume_mod.rank_rng(state, rank),
    }


def _restore(run: _Run, trainer: EmbeddingTrainer, setup: TrainingSetup, state: dict) -> None:
    source = f"checkpoint {str(Path(run.cfg.out) / 'checkpoint.pt')!r}"
    resume_mod.restore_training(
        state,
        trainer,
        trunk=run.trunk,
        embedder=run.embedder,
        loss=resume_mod.unwrap(trainer.loss_funcs["metric_loss"]),
        setup=setup,
        source=source,
        selection=run.selection,
    )
    forced = state.get("forced_differences") or []
    run.resolved["resumed_from"] = {
        "epoch": int(state["epoch"]),
        "iteration": int(state.get("iteration", 0)),
        "forced_differences": forced,
    }
    if run.lead:
        resume_mod.record_resume(Path(run.cfg.out), state, forced)
    if run.log is not None:
        steps = int(state.get("iteration", 0))
        run.log(
            f"resuming {run.name} after epoch {state['epoch']}"
            + (f" + {steps} steps" if steps else "")
            + (f" (forced despite: {'; '.join(forced)})" if forced else "")
        )


def _start_logs(run: _Run, resumed_epoch: int = 0) -> Optional[Any]:
    """The run's TensorBoard writer (``--tensorboard``, rank 0, with an output folder), else None;
    also starts a fresh ``metrics.jsonl`` (a rerun into the same folder does not append to the old);
    a resumed run keeps the lines of the epochs its checkpoint holds and drops later ones."""
    cfg = run.cfg
    if not cfg.out or not run.lead:
        return None
    from ..report.artifacts import METRICS_JSONL

    _truncate_epoch_log(Path(cfg.out) / METRICS_JSONL, resumed_epoch)
    if not cfg.tensorboard:
        return None
    from ..report.tensorboard import TENSORBOARD_DIR, TensorBoardLogger

    return TensorBoardLogger(Path(cfg.out) / TENSORBOARD_DIR)


def _truncate_epoch_log(path: Path, keep_through_epoch: int) -> None:
    """Keep only the lines of epochs ``<= keep_through_epoch`` (all gone for a fresh run)."""
    if not path.exists():
        return
    kept = []
    if keep_through_epoch > 0:
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line).get("epoch", 0)) <= keep_through_epoch:
                    kept.append(line)
            except (ValueError, AttributeError):
                continue  # a line cut by a kill mid-write
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


def _epoch_log(run: _Run, tb: Optional[Any]) -> Optional[Callable[[Any], None]]:
    """The end-of-epoch hook that appends the epoch to ``OUT/metrics.jsonl`` (and TensorBoard)."""
    if not run.cfg.out or not run.lead:
        return None
    from ..report.artifacts import append_metrics_line

    out = Path(run.cfg.out)

    def hook(trainer: Any) -> None:
        record = {
            "epoch": int(trainer.epoch),
            "loss": float(trainer.last_loss),
            "lr": dict(trainer.epoch_lr),
            "seconds": float(trainer.epoch_seconds[-1]),
        }
        # the validation hook runs before this one: its metrics of this epoch, named val_<metric>
        if run.selection is not None and run.selection.last is not None and run.selection.last[0] == record["epoch"]:
            record.update({f"val_{k}": float(v) for k, v in run.selection.last[1].items()})
        append_metrics_line(out, record)
        if tb is not None:
            tb.log_epoch(record)

    return hook


def _save_test_embeddings(run: _Run, kept: dict, retrieval: str, tb: Optional[Any], metrics: dict, step: int) -> None:
    """``OUT/test_embeddings.npz`` for the report (thumbnails for image data), and TensorBoard's
    test metrics and projector."""
    from ..report.artifacts import make_thumbnails, save_test_artifacts, thumbnail_sample

    if "embeddings" not in kept:
        return
    labels = kept["labels"].cpu().numpy()
    rows = thumbnail_sample(len(labels), seed=run.cfg.seed)
    thumbs = make_thumbnails(run.splits.test, rows)
    names = run.splits.test_classes if len(run.splits.test_classes) == int(labels.max()) + 1 else None
    save_test_artifacts(
        run.cfg.out,
        kept["embeddings"].float(),
        labels,
        thumbs,
        thumbnail_index=rows if thumbs is not None else None,
        class_names=names,
        retrieval_distance=retrieval,
    )
    if tb is not None:
        tb.log_metrics(metrics, step)
        tb.log_embeddings(
            kept["embeddings"].float().cpu().numpy(),
            labels,
            names,
            thumbs,
            rows if thumbs is not None else None,
            step=step,
            seed=run.cfg.seed,
        )


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
    if cfg.class_texts is not None:  # a recipe that names its class texts refuses to start without them
        read_class_texts(cfg.class_texts)
    run.backbone = _default_backbone(kind) if cfg.backbone == "auto" else cfg.backbone
    models_mod.parse_backbone(run.backbone)


def _build_model_and_data(run: _Run) -> None:
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


def _build_trainer(
    run: _Run, epoch_log: Optional[Callable[[Any], None]] = None
) -> tuple[EmbeddingTrainer, TrainingSetup, str]:
    """Loss, miner, the loss's training setup, sampler, optimizers and DDP wrapping -> PML trainer."""
    cfg, env, resolved = run.cfg, run.env, run.resolved
    # a loss that takes class distances gets them from class texts (written to the run folder)
    kind, _ = data_mod.parse_dataset_spec(cfg.dataset)
    loss_args, distances = class_distances_for_run(
        run.entry.spec,
        dict(cfg.loss_args),
        train_classes=run.splits.train_classes,
        dataset_kind=kind,
        class_texts=cfg.class_texts,
        out=cfg.out if run.lead else None,
    )
    if distances is not None:
        resolved["class_distances"] = distances
    loss, entry, loss_args, options = build_loss(
        run.entry.qualified_name,
        num_classes=run.splits.num_train_classes,
        embedding_size=cfg.embedding_size,
        loss_args=loss_args,
        loss_options=cfg.loss_options,
    )
    loss = loss.to(run.device)
    semantics = None
    if env is not None:  # refuse a loss that cannot run distributed before touching the data
        semantics = distributed_losses.check_distributed_support(entry, efficient=cfg.distributed_efficient)
        distributed_losses.broadcast_module(loss)
    spec = entry.spec
    retrieval = cfg.retrieval_distance or spec.retrieval_distance
    miner = build_miner(cfg.miner, cfg.miner_args)[0] if cfg.miner else None
    resolved.update(
        loss=entry.qualified_name,
        loss_class=f"{type(loss).__module__}.{type(loss).__qualname__}",
        loss_plugin=f"{entry.distribution or entry.plugin} {entry.version or ''}".strip(),
        loss_args=loss_args,
        loss_needs=entry.needs(),
    )

    setup = _training_setup(run, loss, entry, options)
    # Every loss run with the same seed draws the same batches (when it uses the same sampler):
    # building the loss consumed random numbers a different loss does not.
    set_seed(cfg.seed)
    train_dataset = setup.train_dataset if setup.train_dataset is not None else run.splits.train
    sampler, m = _sampler(run, spec, setup, train_dataset)
    local_batch = cfg.batch_size
    if env is not None:  # each rank takes its slice of the same global batches
        base = sampler if sampler is not None else ddp.GlobalRandomSampler(len(train_dataset), cfg.seed)
        sampler = ddp.RankSliceSampler(base, cfg.batch_size, env.rank, env.world_size)
        local_batch = sampler.local_batch_size
        divisor = env.world_size if cfg.distributed_efficient else env.world_size**2
        resolved["distributed"].update(
            {
                "global_batch_size": cfg.batch_size,
                "local_batch_size": local_batch,
                "efficient": cfg.distributed_efficient,
                "loss_semantics": semantics or "not declared",
                "loss_parameter_gradients": f"all-reduced sum / {divisor}",
            }
        )

    models = {"trunk": run.trunk, "embedder": run.embedder}
    has_loss_params = any(p.requires_grad for p in loss.parameters())
    loss_lr = float(cfg.loss_lr if cfg.loss_lr is not None else (spec.loss_lr or cfg.lr)) if has_loss_params else None
    optimizers = build_optimizers(
        models, loss, optimizer=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, loss_lr=loss_lr
    )
    resolved["loss_lr"] = loss_lr
    if run.log is not None:
        lr_text = f", loss parameters lr {loss_lr:g}" if loss_lr is not None else ""
        sampler_text = f"m-per-class (m={m})" if m else resolved["sampler"]
        views = f", {setup.views_per_sample} views/sample" if setup.views_per_sample != 1 else ""
        run.log(
            f"{run.name}: {type(loss).__name__} [{resolved['loss_plugin']}] on {run.splits.describe()}; "
            f"{run.model.description}; {cfg.epochs} epochs x batch {cfg.batch_size}, sampler {sampler_text}"
            f"{views}, {cfg.optimizer} lr {cfg.lr:g}{lr_text}; {run.device}; retrieval {retrieval}"
        )
    schedulers = build_schedulers(optimizers, cfg.lr_step, cfg.lr_gamma)
    metric_loss, after_backward, loss_scale = loss, None, 1.0
    if env is not None:
        models = {k: ddp.wrap_model(v, run.device) for k, v in models.items()}
        metric_loss = distributed_losses.wrap_loss(loss, entry, efficient=cfg.distributed_efficient)
        miner = distributed_losses.wrap_miner(miner, efficient=cfg.distributed_efficient) if miner is not None else None
        if has_loss_params:

            def after_backward() -> None:
                distributed_losses.average_loss_gradients(loss, efficient=cfg.distributed_efficient)

        loss_scale = 1.0 / env.world_size
        if run.log is not None:
            run.log(
                f"distributed: {env.world_size} processes ({resolved['distributed']['backend']}), global batch "
                f"{cfg.batch_size} = {env.world_size} x {local_batch}; {run.name} semantics: "
                f"{semantics or 'not declared'}"
            )
        torch.manual_seed(cfg.seed + env.rank)  # distinct augmentation streams; samplers are shared
    with quiet_pml_logger():
        trainer = EmbeddingTrainer(
            models=models,
            optimizers=optimizers,
            batch_size=local_batch,
            loss_funcs={"metric_loss": metric_loss},
            dataset=train_dataset,
            mining_funcs={"tuple_miner": miner} if miner is not None else {},
            iterations_per_epoch=cfg.iterations_per_epoch,
            data_device=run.device,
            sampler=sampler,
            collate_fn=setup.collate_fn,
            lr_schedulers=schedulers,
            dataloader_num_workers=cfg.num_workers,
            end_of_iteration_hook=chain_hooks(setup.end_of_iteration_hook),
            end_of_epoch_hook=chain_hooks(setup.end_of_epoch_hook, _selection_hook(run, loss, retrieval), epoch_log),
            progress=run.progress,
            desc=run.name,
            amp_dtype=run.amp_dtype,
            after_backward=after_backward,
            loss_scale=loss_scale,
        )
    return trainer, setup, retrieval


def _selected_modules(run: _Run, trainer: Any) -> dict[str, torch.nn.Module]:
    return {"trunk": run.trunk, "embedder": run.embedder, "loss": trainer.loss_funcs["metric_loss"]}


def _selection_hook(run: _Run, loss: torch.nn.Module, retrieval: str) -> Optional[Callable]:
    """Validation after every epoch (after the loss's own hook, e.g. a database refresh)."""
    if run.selection is None:
        return None
    modules = {"trunk": run.trunk, "embedder": run.embedder, "loss": loss}
    return run.selection.make_hook(
        modules,
        run.splits.val,
        device=run.device,
        retrieval_distance=retrieval,
        ks=run.cfg.ks,
        batch_size=run.cfg.eval_batch_size,
    )


def _training_setup(run: _Run, loss: torch.nn.Module, entry: reg.Entry, options: dict) -> TrainingSetup:
    """What the loss asks of the trainer (multi-view batches, a database refresh, ...)."""
    training_setup = entry.spec.training_setup
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

    context = TrainingContext(
        trunk=trunk,
        embedder=embedder,
        train_dataset=run.splits.train,
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        device=device,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        embed=embed,
        options=dict(options),
        progress=run.progress,
        rank=env.rank if env is not None else 0,
        world_size=env.world_size if env is not None else 1,
        train_eval_dataset=run.splits.train_eval,
    )
    setup = training_setup(loss, context) or TrainingSetup()
    if not isinstance(setup, TrainingSetup):
        raise TypeError(
            f"{entry.name}'s training_setup returned {type(setup).__name__}, expected pml_plugins.TrainingSetup"
        )
    run.resolved["training_setup"] = {
        "options": options,
        "views_per_sample": setup.views_per_sample,
        "replaces_dataset": setup.train_dataset is not None,
        "sampler": type(setup.sampler).__name__ if setup.sampler else None,
    }
    return setup


def _pretrain(run: _Run) -> None:
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


def _sampler(run: _Run, spec: LossSpec, setup: TrainingSetup, train_dataset: Any) -> tuple[Any, Optional[int]]:
    """The setup's own sampler, else m-per-class when asked (``--sampler`` or the loss's spec), else random."""
    cfg = run.cfg
    sampler_name = cfg.sampler
    if sampler_name == "auto":
        sampler_name = "m-per-class" if spec.sampler == "m_per_class" else "random"
    sampler, m = setup.sampler, None
    if sampler is None and sampler_name == "m-per-class":
        labels = run.splits.train_labels if setup.train_dataset is None else data_mod.dataset_labels(train_dataset)
        sampler, m = m_per_class_sampler(labels, cfg.batch_size, cfg.m, preferred_m(spec))
    if sampler is None and cfg.batch_size > len(train_dataset):
        raise ValueError(
            f"batch size {cfg.batch_size} is larger than the training split ({len(train_dataset)} samples)"
        )
    run.resolved["sampler"] = (
        type(setup.sampler).__name__ if setup.sampler is not None else ("MPerClassSampler" if m else "random")
    )
    run.resolved["m"] = m
    return sampler, m


def _result(run: _Run, metrics: dict, trainer: Optional[EmbeddingTrainer], mem: Optional[PeakMemory]) -> RunResult:
    epoch_seconds = trainer.epoch_seconds if trainer is not None else []
    result = RunResult(
        name=run.name,
        metrics=metrics,
        out=run.cfg.out,
        seconds_per_epoch=(sum(epoch_seconds) / len(epoch_seconds)) if epoch_seconds else None,
        train_seconds=sum(epoch_seconds),
        peak_memory_mb=mem.peak_mb if mem is not None else None,
        memory_kind=mem.kind if mem is not None else PeakMemory(run.device).kind,
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
