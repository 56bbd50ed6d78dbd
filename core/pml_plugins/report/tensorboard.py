"""TensorBoard event files (``torch.utils.tensorboard``; needs the ``tensorboard`` package, in
the ``train`` extra): scalars per epoch, the final metrics, and the test embeddings with their
class names and thumbnails for TensorBoard's projector. Open with
``tensorboard --logdir OUT/tensorboard``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .artifacts import load_test_artifacts, read_metrics_jsonl

TENSORBOARD_DIR = "tensorboard"
#: most test embeddings given to the projector (a seeded sample beyond that)
MAX_PROJECTOR_POINTS = 5_000


def require_tensorboard() -> None:
    """A clear ``ValueError`` for ``--tensorboard`` without the tensorboard package (checked before training)."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError(
            "--tensorboard needs the tensorboard package: pip install tensorboard (or pip install 'pml-plugins[train]')"
        )


class TensorBoardLogger:
    """Writes one run's events under ``logdir``; call :meth:`log_epoch` per epoch, then
    :meth:`log_metrics` and :meth:`log_embeddings` after evaluation, then :meth:`close`."""

    def __init__(self, logdir: Any):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch raises this when the tensorboard package is missing
            raise ImportError(
                "--tensorboard needs the tensorboard package: pip install tensorboard (or pml-plugins[train])"
            ) from exc
        self.logdir = Path(logdir)
        self.writer = SummaryWriter(log_dir=str(self.logdir))

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """Scalars of one ``metrics.jsonl`` record, at step ``record["epoch"]``."""
        step = int(record.get("epoch", 0))
        for key, value in record.items():
            if key == "epoch":
                continue
            if isinstance(value, Mapping):  # lr: one curve per optimizer
                for name, v in value.items():
                    self._scalar(f"{key}/{name}", v, step)
            else:
                self._scalar(f"train/{key}" if not key.startswith("val") else f"validation/{key}", value, step)
        self.writer.flush()

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """The final test metrics, under ``test/``."""
        for key, value in metrics.items():
            self._scalar(f"test/{key}", value, step)
        self.writer.flush()

    def log_embeddings(
        self,
        embeddings: Any,
        labels: Sequence[int],
        class_names: Optional[Sequence[str]] = None,
        thumbnails: Optional[np.ndarray] = None,
        thumbnail_index: Optional[np.ndarray] = None,
        *,
        step: int = 0,
        seed: int = 0,
    ) -> None:
        """The test embeddings for the projector, labelled by class name, with thumbnails where
        the data has images (only the rows that have one are given, then)."""
        import torch

        emb = np.asarray(embeddings, dtype=np.float32)
        labels = np.asarray(labels)
        rows = np.arange(len(emb))
        if thumbnails is not None:
            rows = np.arange(len(emb)) if thumbnail_index is None else np.asarray(thumbnail_index)
        if len(rows) > MAX_PROJECTOR_POINTS:
            keep = np.sort(np.random.default_rng(seed).choice(len(rows), MAX_PROJECTOR_POINTS, replace=False))
        else:
            keep = np.arange(len(rows))
        rows = rows[keep]
        names = [str(class_names[c]) if class_names is not None else str(c) for c in labels[rows]]
        label_img = None
        if thumbnails is not None:
            t = torch.as_tensor(np.asarray(thumbnails)[keep]).float() / 255.0
            label_img = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)  # (M, C, h, w)
        self.writer.add_embedding(
            torch.as_tensor(emb[rows]), metadata=names, label_img=label_img, global_step=step, tag="test_embeddings"
        )
        self.writer.flush()

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            self.writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        self.writer.close()


def write_tensorboard(run_dir: Any, logdir: Optional[Any] = None) -> Path:
    """TensorBoard events of a finished run folder, from its metrics.jsonl, metrics.json and
    test_embeddings.npz; written to ``logdir`` (default ``RUN_DIR/tensorboard``)."""
    import json

    run_dir = Path(run_dir)
    logdir = Path(logdir) if logdir is not None else run_dir / TENSORBOARD_DIR
    records = read_metrics_jsonl(run_dir)
    logger = TensorBoardLogger(logdir)
    try:
        for record in records:
            logger.log_epoch(record)
        step = int(records[-1].get("epoch", len(records))) if records else 0
        if (run_dir / "metrics.json").is_file():
            logger.log_metrics(json.loads((run_dir / "metrics.json").read_text()).get("metrics") or {}, step)
        data = load_test_artifacts(run_dir)
        if data is not None:
            logger.log_embeddings(
                data["embeddings"],
                data["labels"],
                data["class_names"],
                data.get("thumbnails"),
                data.get("thumbnail_index"),
                step=step,
            )
    finally:
        logger.close()
    return logdir
