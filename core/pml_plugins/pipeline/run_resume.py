"""The resumable part of a run: per-epoch seeding, checkpoints, signals, and restoring a checkpoint's state."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..training_protocol import TrainingSetup
from . import resume as resume_mod
from .run_state import RunState
from .trainer import EmbeddingTrainer


def prepare_resumable(
    run: RunState,
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


def restore_run(run: RunState, trainer: EmbeddingTrainer, setup: TrainingSetup, state: dict) -> None:
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
