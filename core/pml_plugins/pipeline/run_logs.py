"""What a run logs while it trains and after it is tested: ``metrics.jsonl`` (one line per epoch, with
validation metrics when the run validates), TensorBoard events, and ``test_embeddings.npz`` for the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

from .outputs import write_text_atomic
from .run_state import RunState


def start_logs(run: RunState, resumed_epoch: int = 0) -> Optional[Any]:
    """The run's TensorBoard writer (``--tensorboard``, rank 0, with an output folder), else None;
    also starts a fresh ``metrics.jsonl`` (a rerun into the same folder does not append to the old);
    a resumed run keeps the lines of the epochs its checkpoint holds and drops later ones."""
    cfg = run.cfg
    if not cfg.out or not run.lead:
        return None
    from ..report.artifacts import METRICS_JSONL

    truncate_epoch_log(Path(cfg.out) / METRICS_JSONL, resumed_epoch)
    if not cfg.tensorboard:
        return None
    from ..report.tensorboard import TENSORBOARD_DIR, TensorBoardLogger

    return TensorBoardLogger(Path(cfg.out) / TENSORBOARD_DIR)


def truncate_epoch_log(path: Path, keep_through_epoch: int) -> None:
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
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def epoch_log_hook(run: RunState, tb: Optional[Any]) -> Optional[Callable[[Any], None]]:
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


def save_test_embeddings(
    run: RunState, kept: dict, retrieval: str, tb: Optional[Any], metrics: dict, step: int
) -> None:
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
