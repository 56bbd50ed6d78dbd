"""Classification pre-training: a linear classifier on the embeddings, trained with cross-entropy
together with the trunk and head, before the metric loss (the Group Loss paper trains "in the
classification task for 10 epochs" first, section 4.1). The classifier is dropped afterwards.

A loss asks for it with ``pretrain_epochs=N`` in its registration; ``--pretrain-epochs N``
overrides it (0 turns it off) and gives any loss the stage.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
import tqdm
from torch.utils.data import DataLoader, Dataset

from .class_texts import spec_field
from .trainer import build_optimizers


def pretrain_epochs_for(cfg_value: Optional[int], spec: Any) -> int:
    """``--pretrain-epochs`` when given, else what the loss's spec declares, else 0."""
    if cfg_value is not None:
        return int(cfg_value)
    declared = spec_field(spec, "pretrain_epochs") if spec is not None else None
    if declared is None:
        return 0
    if isinstance(declared, bool) or not isinstance(declared, int) or declared < 0:
        raise TypeError(f"the loss's pretrain_epochs must be an integer >= 0, got {declared!r}")
    return declared


def pretrain_classifier(
    trunk: torch.nn.Module,
    embedder: torch.nn.Module,
    dataset: Dataset,
    *,
    num_classes: int,
    embedding_size: int,
    epochs: int,
    batch_size: int,
    optimizer: str,
    lr: float,
    weight_decay: float,
    device: torch.device,
    seed: int,
    num_workers: int = 0,
    amp_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
) -> dict:
    """Train trunk + embedder + a new ``Linear(embedding_size, num_classes)`` with cross-entropy for
    ``epochs`` epochs (shuffled, seeded); returns what happened (for ``config.json``)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    classifier = torch.nn.Linear(embedding_size, num_classes).to(device)
    optimizers = build_optimizers(
        {"trunk": trunk, "embedder": embedder},
        classifier,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        loss_lr=lr,
    )
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        num_workers=num_workers,
        drop_last=len(dataset) > batch_size,
    )
    modes = trunk.training, embedder.training
    trunk.train(), embedder.train()
    start, losses, correct, seen = time.perf_counter(), [], 0, 0
    try:
        for epoch in range(1, epochs + 1):
            total, batches = 0.0, 0
            correct, seen = 0, 0
            for x, y in tqdm.tqdm(
                loader,
                desc=f"classification pre-training {epoch}/{epochs}",
                leave=False,
                disable=not progress,
                dynamic_ncols=True,
            ):
                x, y = x.to(device), torch.as_tensor(y).long().to(device)
                for o in optimizers.values():
                    o.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    emb = embedder(trunk(x))
                logits = classifier(emb.float())
                loss = torch.nn.functional.cross_entropy(logits, y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"classification pre-training: the loss became {float(loss)} at "
                        f"epoch {epoch} (try a lower --lr)"
                    )
                loss.backward()
                for o in optimizers.values():
                    o.step()
                total += float(loss.detach())
                batches += 1
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
            losses.append(total / max(batches, 1))
    finally:
        trunk.train(modes[0]), embedder.train(modes[1])
    return {
        "epochs": epochs,
        "epoch_losses": losses,
        "last_epoch_train_accuracy": correct / max(seen, 1),
        "seconds": time.perf_counter() - start,
        "classifier": f"Linear({embedding_size}->{num_classes}), dropped",
    }
