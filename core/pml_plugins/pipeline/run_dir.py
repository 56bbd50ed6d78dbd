"""A finished (or checkpointed) run folder, read back: its config, its model with the trained
weights, its data and its retrieval distance, for ``evaluate RUN_DIR`` and ``embed RUN_DIR``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from . import data as data_mod
from . import models as models_mod
from .checkpoint import load_checkpoint, load_module_state
from .config import TrainConfig, config_fields


@dataclass
class LoadedRun:
    """What :func:`load_run` rebuilt."""

    path: Path
    config: TrainConfig
    #: the ``resolved`` part of config.json (backbone, retrieval distance, versions, ...)
    resolved: dict
    trunk: torch.nn.Module
    embedder: torch.nn.Module
    #: the model's image transforms (timm backbones), for loading another dataset the same way
    transforms: Optional[data_mod.ImageTransforms]
    retrieval_distance: str
    #: epochs completed when the checkpoint was written (None for a checkpoint without it)
    epoch: Optional[int]
    #: torch CPU threads the run used (embedding with the same count reproduces its numbers)
    threads: Optional[int]


def read_run_config(run_dir: Path) -> tuple[TrainConfig, dict]:
    """``RUN_DIR/config.json`` -> ``(TrainConfig, resolved)``; clear errors for a missing folder/file."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
    if not run_dir.is_dir():
        raise ValueError(
            f"{str(run_dir)!r} is not a run folder (give the folder train --out wrote, "
            f"with config.json and checkpoint.pt)"
        )
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"run folder {str(run_dir)!r} has no config.json (is it a pml-plugins train --out folder?)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    resolved = data.get("resolved") or {}
    fields = set(config_fields())
    values = {k: v for k, v in data.items() if k in fields}
    try:
        cfg = TrainConfig(**values)
    except TypeError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return cfg, resolved


def load_run(run_dir: Path, *, device: Optional[torch.device] = None) -> LoadedRun:
    """Rebuild the run's trunk and embedder from its config and load ``checkpoint.pt`` into them
    (on ``device``, default the CPU)."""
    run_dir = Path(run_dir)
    device = device if device is not None else torch.device("cpu")
    cfg, resolved = read_run_config(run_dir)
    state = load_checkpoint(run_dir)  # every failure: one clear ValueError
    backbone = resolved.get("backbone") or (
        "identity" if data_mod.parse_dataset_spec(cfg.dataset)[0] == "embeddings" else "cnn"
    )
    # the checkpoint holds every weight: no pretrained file is needed (nor read) to rebuild the model
    model = models_mod.build_model(
        backbone,
        embedding_size=cfg.embedding_size,
        input_shape=data_mod.feature_shape(cfg.dataset),
        image_size=cfg.image_size,
        pooling=cfg.pooling,
        head_norm=cfg.head_norm,
        pretrained=None,
        head=cfg.head,
    )
    source = f"checkpoint {str(run_dir / 'checkpoint.pt')!r}"
    load_module_state(model.trunk, state["trunk"], "trunk", source)
    load_module_state(model.embedder, state["embedder"], "embedding head", source)
    trunk, embedder = model.trunk.to(device).eval(), model.embedder.to(device).eval()
    distance = resolved.get("retrieval_distance") or cfg.retrieval_distance or "cosine"
    epoch = state.get("epoch")
    threads = resolved.get("threads")
    return LoadedRun(
        path=run_dir,
        config=cfg,
        resolved=resolved,
        trunk=trunk,
        embedder=embedder,
        transforms=model.transforms,
        retrieval_distance=str(distance),
        epoch=int(epoch) if epoch is not None else None,
        threads=int(threads) if isinstance(threads, int) else None,
    )


def load_split(run: LoadedRun, data: Optional[str] = None, split: str = "test") -> Any:
    """The dataset to embed: ``split`` ("test", "train" or "all") of ``data`` (a ``--dataset``
    spec) or, by default, of the run's own dataset, loaded with the run's transforms (and, for the
    run's own data, its ``--query/--gallery`` protocol: "test" is then the query set)."""
    return load_splits(run, data, split)[0]


def load_splits(run: LoadedRun, data: Optional[str] = None, split: str = "test") -> tuple[Any, Optional[Any]]:
    """``(dataset, gallery)``: :func:`load_split` and the gallery the test queries are searched in
    (None: the test split is searched in itself, leave-one-out)."""
    from . import protocols

    if split not in ("test", "train", "all"):
        raise ValueError(f"split must be test, train or all, got {split!r}")
    cfg = run.config
    splits = data_mod.load_data(data or cfg.dataset, run.transforms)
    if data is None:  # the run's own evaluation protocol (query/gallery files); few-shot only thins training
        splits, _ = protocols.apply_protocols(
            splits, query=cfg.query, gallery=cfg.gallery, seed=cfg.seed, transforms=run.transforms
        )
    if split == "all":
        return torch.utils.data.ConcatDataset([splits.train, splits.test]), None
    if split == "train":
        return splits.train, None
    return splits.test, splits.gallery


@torch.no_grad()
def embed_dataset(
    run: LoadedRun, dataset: Any, *, batch_size: int = 256, device: Optional[torch.device] = None, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeddings, labels)`` of every item of ``dataset`` (eval mode, no grad, in order)."""
    device = device if device is not None else torch.device("cpu")
    import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    chunks, labels = [], []
    for batch in tqdm.tqdm(loader, desc="embedding", leave=False, disable=not progress, dynamic_ncols=True):
        x, y = batch[0], batch[1]
        chunks.append(run.embedder(run.trunk(x.to(device))).float().cpu())
        labels.append(torch.as_tensor(y))
    if not chunks:
        raise ValueError("the dataset to embed is empty")
    return torch.cat(chunks), torch.cat(labels)


__all__ = ["LoadedRun", "read_run_config", "load_run", "load_split", "load_splits", "embed_dataset"]
