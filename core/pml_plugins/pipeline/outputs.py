"""What a run leaves in its folder: ``metrics.json``, ``config.json``, ``checkpoint.pt``, ``metrics.png``.

Every file is written atomically (temporary file + ``os.replace``), so an interrupted run never
leaves a half-written one; ``metrics.json`` is written last and marks a finished run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .. import distributed_losses


@dataclass
class RunResult:
    """What a run produced (also written to ``OUT/metrics.json`` and ``OUT/config.json``)."""

    name: str
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    out: Optional[str] = None
    seconds_per_epoch: Optional[float] = None
    train_seconds: float = 0.0
    peak_memory_mb: Optional[float] = None
    memory_kind: str = ""
    error: Optional[str] = None
    #: final epoch loss, epochs run, iterations per epoch
    extra: dict = field(default_factory=dict)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and ``os.replace``: a reader (or a run killed
    mid-write) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically, so an interrupted run never leaves a half-written file."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    return repr(obj)


def metrics_record(result: RunResult) -> dict:
    return {
        "name": result.name,
        "metrics": result.metrics,
        "seconds_per_epoch": result.seconds_per_epoch,
        "train_seconds": result.train_seconds,
        "peak_memory_mb": result.peak_memory_mb,
        "memory_kind": result.memory_kind,
        **result.extra,
    }


def write_outputs(out: Path, result: RunResult, trunk, embedder, trainer, write_checkpoint: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if write_checkpoint:
        loss = trainer.loss_funcs["metric_loss"] if trainer is not None else None
        if isinstance(loss, distributed_losses.DistributedLossWrapper):
            loss = loss.loss
        state = {
            "trunk": trunk.state_dict(),
            "embedder": embedder.state_dict(),
            "loss": loss.state_dict() if loss is not None else None,
        }
        tmp = out / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, out / "checkpoint.pt")
    plot_metrics(result.metrics, out / "metrics.png", title=result.name)
    write_json(out / "config.json", result.config)
    write_json(out / "metrics.json", metrics_record(result))  # last: its presence marks a finished run


def plot_metrics(metrics: dict, path: Path, title: str = "") -> None:
    """Recall@k and nDCG@k against k."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for prefix, label in (("recall_at_", "Recall@k"), ("ndcg_at_", "nDCG@k")):
        pts = sorted(
            (int(k[len(prefix) :]), v)
            for k, v in metrics.items()
            if k.startswith(prefix) and k[len(prefix) :].isdigit()
        )
        if pts:
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
