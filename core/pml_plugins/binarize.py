"""Binarised embeddings for indexing (the "bits" rows of the adaptive-margin paper, section 3,
Tables 1-3): an evaluation option of the main job (``--eval-binarize``) that any loss can use."""

from __future__ import annotations

import torch


def binarize_embeddings(embeddings: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Threshold a parameter-free LayerNorm of each embedding at 0; returns +1 / -1 codes.

    LayerNorm without affine parameters, (x - mean(x)) / sqrt(var(x) + eps) over the last
    dimension, then sign: +1 where the normalised value is > 0, else -1. (The LayerNorm is
    monotone in each row, so this is x > mean(x); it only matters that the threshold is 0 after
    it, as in the paper.) A D-dimensional code stores in D bits (``numpy.packbits`` of
    ``codes > 0``), e.g. 2048 bits = the memory of 64 float32 values.

    The codes are returned as ±1 in the embeddings' floating dtype (float32 for integer input)
    so that existing cosine / inner-product retrieval ranks by Hamming distance:
    cos(a, b) = a.b / D = 1 - 2 * hamming(a, b) / D.

    Args:
        embeddings: (..., D) tensor, typically (N, D).
        eps: LayerNorm's variance epsilon (torch's default).
    """
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor of shape (N, D), got {type(embeddings).__name__}")
    if embeddings.ndim < 1 or embeddings.shape[-1] < 1:
        raise ValueError(f"embeddings must have a non-empty last dimension, got shape {tuple(embeddings.shape)}")
    x = embeddings if embeddings.is_floating_point() else embeddings.to(torch.float32)
    with torch.no_grad():
        # float32 for half precision: the LayerNorm's variance is inaccurate in fp16
        z = torch.nn.functional.layer_norm(
            x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, x.shape[-1:], eps=eps
        )
        one = torch.ones((), dtype=x.dtype, device=x.device)
        return torch.where(z > 0, one, -one)
