"""Batch composition: how many samples per class an m-per-class batch takes."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from pytorch_metric_learning.samplers import MPerClassSampler

from ..specs import LossSpec


def choose_m(batch_size: int, num_classes: int, m: Optional[int], preferred: int = 4) -> int:
    """Samples per class for an m-per-class batch; an explicit ``m`` is checked, not changed."""

    def fits(k: int) -> bool:
        return batch_size % k == 0 and k * num_classes >= batch_size

    if m is not None:
        if batch_size % m:
            ok = [d for d in range(1, batch_size + 1) if batch_size % d == 0 and d * num_classes >= batch_size]
            raise ValueError(
                f"batch size {batch_size} is incompatible with the m-per-class sampler: m={m} must "
                f"divide it (m values that fit: {ok[:6]})"
            )
        if m * num_classes < batch_size:
            raise ValueError(
                f"batch size {batch_size} is incompatible with the m-per-class sampler: m={m} x "
                f"{num_classes} training classes gives at most {m * num_classes} samples per batch; "
                f"use --batch-size <= {m * num_classes} or a larger --m"
            )
        return m
    if fits(preferred):
        return preferred
    for k in range(preferred, batch_size + 1):
        if fits(k):
            return k
    for k in range(preferred - 1, 0, -1):
        if fits(k):
            return k
    raise ValueError(f"batch size {batch_size} cannot be built m-per-class from {num_classes} classes")


def preferred_m(spec: LossSpec, default: int = 4) -> int:
    """Samples per class a loss asks for in its spec (``LossSpec.samples_per_class``; ``default`` when it does not)."""
    return spec.samples_per_class or default


def m_per_class_sampler(
    labels: Sequence[int], batch_size: int, m: Optional[int], preferred: int
) -> tuple[MPerClassSampler, int]:
    """PML's ``MPerClassSampler`` over ``labels`` with ``m`` chosen (or checked) by :func:`choose_m`."""
    m = choose_m(batch_size, len(np.unique(labels)), m, preferred)
    length = max(len(labels), batch_size)
    return MPerClassSampler(labels, m, batch_size=batch_size, length_before_new_iter=length), m
