"""From a built run to PML's trainer: the loss and miner, the loss's training setup, the sampler,
optimizers and schedulers, per-epoch validation, and DDP wrapping."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from pytorch_metric_learning.utils import common_functions as c_f

from .. import distributed_losses
from .. import registry as reg
from ..specs import LossSpec
from ..training_protocol import TrainingContext, TrainingSetup
from . import data as data_mod
from . import ddp
from .builders import build_loss, build_miner
from .checkpoint import seed_all
from .class_texts import class_distances_for_run
from .run_state import RunState
from .sampling import m_per_class_sampler, preferred_m
from .trainer import EmbeddingTrainer, build_optimizers, build_schedulers, chain_hooks, quiet_pml_logger


def build_trainer(
    run: RunState, epoch_log: Optional[Callable[[Any], None]] = None
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

    setup = training_setup_for(run, loss, entry, options)
    # Every loss run with the same seed draws the same batches (when it uses the same sampler):
    # building the loss consumed random numbers a different loss does not.
    seed_all(cfg.seed)
    train_dataset = setup.train_dataset if setup.train_dataset is not None else run.splits.train
    sampler, m = choose_sampler(run, spec, setup, train_dataset)
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
            end_of_epoch_hook=chain_hooks(setup.end_of_epoch_hook, selection_hook(run, loss, retrieval), epoch_log),
            progress=run.progress,
            desc=run.name,
            amp_dtype=run.amp_dtype,
            after_backward=after_backward,
            loss_scale=loss_scale,
        )
    return trainer, setup, retrieval


def selected_modules(run: RunState, trainer: Any) -> dict[str, torch.nn.Module]:
    return {"trunk": run.trunk, "embedder": run.embedder, "loss": trainer.loss_funcs["metric_loss"]}


def selection_hook(run: RunState, loss: torch.nn.Module, retrieval: str) -> Optional[Callable]:
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


def training_setup_for(run: RunState, loss: torch.nn.Module, entry: reg.Entry, options: dict) -> TrainingSetup:
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


def choose_sampler(
    run: RunState, spec: LossSpec, setup: TrainingSetup, train_dataset: Any
) -> tuple[Any, Optional[int]]:
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
