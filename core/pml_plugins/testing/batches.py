"""Synthetic batches for the conformance kit: label layouts, dtypes, multi-view rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

#: Dtypes the kit tries; half precisions are skipped where an op is missing on the device.
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class BatchSpec:
    """How the kit builds batches for one loss or miner."""

    embedding_size: int
    num_classes: Optional[int] = None
    num_views: int = 1
    samples_per_class: Optional[int] = None

    @property
    def label_space(self) -> int:
        """How many distinct labels batches may use."""
        return self.num_classes if self.num_classes is not None else 10


def make_labels(spec: BatchSpec, num_samples: int, layout: str, generator: torch.Generator) -> torch.Tensor:
    """Labels for ``num_samples`` samples (before view expansion).

    layouts: ``"one_class"`` (every sample the same class), ``"m_per_class"`` (classes with
    ``samples_per_class`` (default 2) samples each), ``"many_classes"`` (as many classes as the
    label space and the sampler requirement allow), ``"random"`` (i.i.d. labels).
    """
    space = spec.label_space
    if layout == "one_class":
        c = int(torch.randint(space, (1,), generator=generator))
        return torch.full((num_samples,), c, dtype=torch.long)
    if layout == "random":
        return torch.randint(space, (num_samples,), generator=generator)
    m = spec.samples_per_class or (2 if layout == "m_per_class" else 1)
    num_distinct = max(1, min(space, num_samples // m))
    classes = torch.randperm(space, generator=generator)[:num_distinct]
    labels = classes.repeat_interleave(m)
    if labels.numel() < num_samples:  # fill the remainder with the last classes
        labels = torch.cat([labels, classes[: num_samples - labels.numel()].repeat_interleave(1)])
    labels = labels[:num_samples]
    if labels.numel() < num_samples:
        labels = torch.cat([labels, labels.new_full((num_samples - labels.numel(),), int(classes[0]))])
    return labels[torch.randperm(num_samples, generator=generator)] if spec.samples_per_class is None else labels


def make_batch(
    spec: BatchSpec,
    num_samples: int,
    *,
    layout: str = "m_per_class",
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    requires_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeddings, labels)`` with ``num_samples * num_views`` rows, views consecutive."""
    g = torch.Generator().manual_seed(seed)
    labels = make_labels(spec, num_samples, layout, g)
    rows = num_samples * spec.num_views
    emb = torch.randn(rows, spec.embedding_size, generator=g) * scale
    labels = labels.repeat_interleave(spec.num_views)
    emb = emb.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return emb, labels.to(device)
