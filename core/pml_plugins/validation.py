"""Input validation shared by plugin losses: clear errors instead of NaNs or deep stack traces."""
from __future__ import annotations

import torch


def check_embeddings_and_labels(
    embeddings: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    num_classes: int | None = None,
    embedding_size: int | None = None,
    labels_required: bool = True,
    check_finite: bool = True,
    embeddings_name: str = "embeddings",
    labels_name: str = "labels",
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument when inputs are malformed.

    Checks: ``embeddings`` is a floating 2-D tensor ``(batch_size, embedding_size)`` (with
    the expected ``embedding_size`` when given) and finite; ``labels`` is a 1-D integer
    tensor of the same length with values in ``[0, num_classes)`` when ``num_classes`` is given.
    """
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"{embeddings_name} must be a torch.Tensor of shape (batch_size, embedding_size), got {type(embeddings).__name__}")
    if embeddings.ndim != 2:
        raise ValueError(f"{embeddings_name} must be 2-D (batch_size, embedding_size), got shape {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise TypeError(f"{embeddings_name} must be a floating-point tensor, got dtype {embeddings.dtype}")
    if embedding_size is not None and embeddings.shape[1] != embedding_size:
        raise ValueError(
            f"{embeddings_name} must have embedding_size={embedding_size} columns, got shape {tuple(embeddings.shape)}"
        )
    if check_finite and embeddings.numel() and not bool(torch.isfinite(embeddings).all()):
        bad = torch.nonzero(~torch.isfinite(embeddings).all(dim=1)).flatten()[:5].tolist()
        raise ValueError(f"{embeddings_name} contain NaN or Inf values (rows {bad}{', ...' if len(bad) == 5 else ''})")
    if labels is None:
        if labels_required:
            raise ValueError(f"{labels_name} are required for this loss: a 1-D integer tensor of shape (batch_size,)")
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{labels_name} must be a torch.Tensor of shape (batch_size,), got {type(labels).__name__}")
    if labels.ndim != 1:
        raise ValueError(f"{labels_name} must be 1-D (batch_size,), got shape {tuple(labels.shape)}")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"{labels_name} has {labels.shape[0]} entries but {embeddings_name} has {embeddings.shape[0]} rows; they must match"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{labels_name} must be an integer tensor (class indices), got dtype {labels.dtype}")
    if num_classes is not None and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{labels_name} must be in [0, num_classes={num_classes}), got values in [{lo}, {hi}]")
