"""Numerical kernels of the CAM loss: safe norms and the chunked anchor repeller (eq. 2).

The repeller sums over all t^2 ordered anchor pairs. It is computed block by block (rows
of the upper triangle) with a custom autograd function that forms each block's gradient
right away, so memory stays O(chunk * t + t * n) instead of the O(t^2) that autograd would
keep for backward (and never a t x t x n tensor).
"""

from __future__ import annotations

from typing import Optional

import torch

#: Elements of one (rows x t) block of the repeller on CPU (2x on GPUs); bounds working memory.
DEFAULT_BLOCK_ELEMENTS = 1 << 22
#: Pairs with ||a_i - a_j||^2 <= NEAR_RATIO * (||a_i||^2 + ||a_j||^2) (centred anchors) lose
#: precision in the Gram-matrix formula (cancellation); they are recomputed from differences.
NEAR_RATIO = 0.1


def safe_norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """||x|| along ``dim``: exactly 0 with a zero (finite) gradient at x = 0.

    ``torch.linalg.norm`` has a NaN gradient at the origin; the double ``where`` keeps the
    unused branch's gradient finite.
    """
    sq = (x * x).sum(dim)
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def _accumulator(x: torch.Tensor) -> torch.Tensor:
    """A 0-dim float64 accumulator (float32 where the device has no float64, e.g. MPS)."""
    return x.new_zeros((), dtype=torch.float32 if x.device.type == "mps" else torch.float64)


def _near_pairs(
    anchors: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    two_m: float,
    grad: Optional[torch.Tensor],
    max_pairs: int,
) -> torch.Tensor:
    """Eq. 2 summed over the pairs (rows[k], cols[k]) from exact differences (bounded pieces)."""
    total = _accumulator(anchors)
    for s in range(0, rows.numel(), max_pairs):  # pieces of bounded memory, not a loop over classes
        r, c = rows[s : s + max_pairs], cols[s : s + max_pairs]
        diff = anchors[r] - anchors[c]
        dist = safe_norm(diff)
        hinge = (two_m - dist).clamp_min(0)
        total += (hinge * hinge).sum(dtype=total.dtype)
        if grad is not None:
            # d/dc_r of hinge^2 = -2 hinge (c_r - c_c) / dist; zero when the anchors coincide
            w = torch.where(
                dist > 0, hinge / torch.where(dist > 0, dist, torch.ones_like(dist)), torch.zeros_like(dist)
            )
            g = -2.0 * w[:, None] * diff
            grad.index_add_(0, r, g)
            grad.index_add_(0, c, -g)
    return total


def default_block_elements(device: torch.device) -> int:
    """Block size for the repeller: cache-sized on CPU, larger on GPUs (fewer kernel launches)."""
    return DEFAULT_BLOCK_ELEMENTS if device.type == "cpu" else 2 * DEFAULT_BLOCK_ELEMENTS


def repeller_sum(
    anchors: torch.Tensor, margin: float, need_grad: bool, block_elements: Optional[int] = None
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """sum_{i<j} max(0, 2m - ||c_i - c_j||)^2 and, if ``need_grad``, its gradient w.r.t. ``anchors``.

    This equals eq. 2 (1/2 times the sum over ordered pairs). Far pairs use the Gram-matrix
    formula on centred anchors (distances are translation invariant, so centring changes
    nothing but reduces cancellation); near pairs are recomputed from exact differences.
    Working memory: a few (rows x t) blocks of ``block_elements`` elements (about 6 measured).
    """
    t = anchors.shape[0]
    two_m = 2.0 * float(margin)
    block_elements = block_elements or default_block_elements(anchors.device)
    grad = torch.zeros_like(anchors) if need_grad else None
    total = _accumulator(anchors)
    if t < 2:
        return total.to(anchors.dtype), grad
    centred = anchors - anchors.mean(dim=0, keepdim=True)
    sq = (centred * centred).sum(1)
    tiny = torch.finfo(anchors.dtype).tiny
    rows_per_block = max(1, min(t, block_elements // t))
    max_pairs = max(1, block_elements // max(1, anchors.shape[1]))
    for start in range(0, t, rows_per_block):  # blocks of rows: bounded memory, O(t^2 n) total
        stop = min(start + rows_per_block, t)
        k = stop - start
        a_rows, a_cols = centred[start:stop], centred[start:]  # columns j >= start: upper triangle
        sq_rows, sq_cols = sq[start:stop, None], sq[None, start:]
        d2 = torch.addmm(sq_cols, a_rows, a_cols.T, alpha=-2.0).add_(sq_rows)  # ||a_i - a_j||^2
        # cancellation-prone pairs (close relative to their norms) go to the exact path
        near = (d2 - NEAR_RATIO * sq_rows) <= NEAR_RATIO * sq_cols
        near[:, :k].triu_(1)  # each unordered pair once, no self pairs
        dist = d2.clamp_min_(tiny).sqrt_()
        hinge = (two_m - dist).clamp_min_(0).masked_fill_(near, 0)
        hinge[:, :k].triu_(1)
        total += (hinge * hinge).sum(dtype=total.dtype)
        if grad is not None:
            w = hinge.div_(dist)  # h_ij / d_ij, zero outside the far upper-triangle pairs
            # sum_j w_ij (c_i - c_j) for rows, and the mirrored term for columns
            grad[start:stop] -= 2.0 * (w.sum(1)[:, None] * a_rows - w @ a_cols)
            grad[start:] -= 2.0 * (w.sum(0)[:, None] * a_cols - w.T @ a_rows)
        r, c = near.nonzero(as_tuple=True)
        if r.numel():
            total += _near_pairs(anchors, r + start, c + start, two_m, grad, max_pairs)
    return total.to(anchors.dtype), grad


class _Repeller(torch.autograd.Function):
    """Eq. 2 with a gradient formed during forward block by block (once differentiable)."""

    @staticmethod
    def forward(ctx, anchors: torch.Tensor, margin: float, block_elements: Optional[int]) -> torch.Tensor:  # type: ignore[override]
        value, grad = repeller_sum(anchors, margin, need_grad=True, block_elements=block_elements)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None


def repeller_loss(anchors: torch.Tensor, margin: float, block_elements: Optional[int] = None) -> torch.Tensor:
    """L_R(C) = 1/2 sum_{y != y'} max(0, 2m - ||c_y - c_y'||)^2 (eq. 2), a 0-dim tensor.

    Computed in ``anchors``' dtype with autocast disabled (the Gram matrix must not drop to
    float16); differentiable w.r.t. ``anchors`` with finite gradients when anchors coincide.
    """
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        if anchors.requires_grad and torch.is_grad_enabled():
            return _Repeller.apply(anchors, float(margin), block_elements)
        with torch.no_grad():
            return repeller_sum(anchors, margin, need_grad=False, block_elements=block_elements)[0]


def min_norm_loss(anchors: torch.Tensor, min_norm: float) -> torch.Tensor:
    """L_N(C) = 1/2 sum_y max(0, p - ||c_y||)^2 (eq. 3), finite gradient at the origin."""
    hinge = (float(min_norm) - safe_norm(anchors)).clamp_min(0)
    return 0.5 * (hinge * hinge).sum()


def attractor_losses(embeddings: torch.Tensor, anchors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_A(x_i, C) = 1/2 ||e_i - c_{y_i}||^2 per sample (eq. 1), shape (batch_size,)."""
    diff = embeddings - anchors[labels]
    return 0.5 * (diff * diff).sum(1)


def negative_distances(embeddings: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """-||e_i - c_y|| for every sample and class, shape (batch_size, num_classes).

    Uses the difference-based ``cdist`` (no Gram-matrix cancellation), whose gradient at a
    zero distance is 0, not NaN.
    """
    return -torch.cdist(embeddings, anchors, compute_mode="donot_use_mm_for_euclid_dist")
