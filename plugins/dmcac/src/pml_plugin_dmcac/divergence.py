"""Pairwise Jensen-Shannon divergences between views and the Frobenius loss (eq. 11-13).

Everything here works on the last two dimensions ``(..., A, T)``: A distributions (one per view)
over T retrieved database rows, so a whole batch of queries is handled without loops.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

#: Added under the square root of eq. 13 so its gradient stays finite when all views agree.
FROB_EPS = 1e-12
_LN2 = math.log(2.0)


def _check_probs(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor of shape (..., A, T)")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (..., A, T) (A views x T database rows), got {tuple(x.shape)}")


def pairwise_js_divergence_from_log(log_probs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """JS divergences of the lower triangle ``i > j`` from log-probabilities (eq. 11-12).

    Args:
        log_probs: ``(..., A, T)`` log-probabilities of A distributions over T items (finite;
            masked items may hold any finite value).
        mask: optional ``(..., T)`` or ``(..., A, T)`` bool, False for padding columns (their
            probability must be 0; they are excluded from the sums, which is 0 log 0 = 0).
    Returns:
        ``(..., A*(A-1)/2)`` divergences in nats, pairs ordered as ``torch.tril_indices(A, A, -1)``.
    """
    num_views = log_probs.shape[-2]
    rows, cols = torch.tril_indices(num_views, num_views, offset=-1, device=log_probs.device)
    log_p, log_q = log_probs[..., rows, :], log_probs[..., cols, :]
    # log M = log((P + Q) / 2) in log space: finite wherever P or Q is, even where both are 0
    log_m = torch.logaddexp(log_p, log_q) - _LN2
    # eq. 11-12: JS = (KL(P||M) + KL(Q||M)) / 2 with natural log; exp(log p) is 0 for p = 0
    terms = 0.5 * (log_p.exp() * (log_p - log_m) + log_q.exp() * (log_q - log_m))
    if mask is not None:
        if mask.ndim == log_probs.ndim - 1:
            mask = mask.unsqueeze(-2)
        mask = mask.expand(log_probs.shape)[..., rows, :] & mask.expand(log_probs.shape)[..., cols, :]
        terms = torch.where(mask, terms, torch.zeros((), dtype=terms.dtype, device=terms.device))
    return terms.sum(-1).clamp_min(0)  # JS >= 0; rounding can give -1e-9


def _log_from_probs(probs: torch.Tensor) -> torch.Tensor:
    # 0 log 0 = 0: zero entries get a finite stand-in for log 0, multiplied by p = 0 later
    tiny = torch.finfo(probs.dtype).tiny
    return torch.where(probs > 0, probs.clamp_min(tiny).log(), torch.full_like(probs, math.log(tiny)))


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """JS(P, Q) of eq. 11-12 over the last dimension (natural log, 0 log 0 = 0).

    ``js_divergence(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]))`` is 0.215762.
    """
    _check_probs("p", p.unsqueeze(-2))
    pair = torch.stack(torch.broadcast_tensors(q, p), dim=-2)  # rows (q, p): the one pair i=1 > j=0
    return pairwise_js_divergence_from_log(_log_from_probs(pair))[..., 0]


def pairwise_js_divergence(probs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The symmetric JS divergence matrix ``L`` of eq. 11 (natural log, 0 log 0 = 0).

    Args:
        probs: ``(..., A, T)``: each row a probability distribution (e.g. P' of eq. 10).
        mask: optional ``(..., T)`` bool, False for columns to ignore.
    Returns:
        ``(..., A, A)`` with ``L[i, j] = JS(P_i, P_j)``, zero diagonal.

    Example (the issue's check value)::

        >>> P = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
        >>> pairwise_js_divergence(P)[1, 0]   # 0.215762...
    """
    _check_probs("probs", probs)
    num_views = probs.shape[-2]
    js = pairwise_js_divergence_from_log(_log_from_probs(probs), mask)
    out = probs.new_zeros(*probs.shape[:-2], num_views, num_views)
    rows, cols = torch.tril_indices(num_views, num_views, offset=-1, device=probs.device)
    out[..., rows, cols] = js
    out[..., cols, rows] = js
    return out


def frobenius_from_js(js_pairs: torch.Tensor, eps: float = FROB_EPS) -> torch.Tensor:
    """Eq. 13 from the lower-triangle divergences ``(..., A*(A-1)/2)``: ``sqrt(sum L_ij^2 + eps)``."""
    return torch.sqrt(js_pairs.pow(2).sum(-1) + eps)


def frobenius_js_loss(probs: torch.Tensor, mask: Optional[torch.Tensor] = None, eps: float = FROB_EPS) -> torch.Tensor:
    """L_frob of eq. 13: ``sqrt(sum_{i>j} JS(P_i, P_j)^2 + eps)`` for each leading index.

    Args:
        probs: ``(..., A, T)`` distributions of the A views over the T retrieved rows.
        mask: optional ``(..., T)`` bool, False for padding columns.
        eps: added under the square root (keeps the gradient finite when all views agree).
    Returns:
        ``(...)``: one L_frob per query. For the issue's three distributions
        ``(0.5, 0.5), (1, 0), (0.5, 0.5)``: ``sqrt(2 * 0.215762^2) = 0.305133``.
    """
    _check_probs("probs", probs)
    return frobenius_from_js(pairwise_js_divergence_from_log(_log_from_probs(probs), mask), eps)
