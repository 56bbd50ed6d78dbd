"""The Group Loss building blocks as plain differentiable functions (Elezi et al., ECCV 2020).

Each step of Algorithm 1 is public so that it can be checked on its own:

* :func:`pearson_similarity` -- the similarity matrix ``W`` (eq. 1, negatives clamped, app. G);
* :func:`anchor_mask` / :func:`initial_assignment` -- the prior ``X(0)`` with one-hot anchors
  (section 3.2, temperature scaling of appendix C);
* :func:`replicator_dynamics` -- the refinement ``X(t) -> X(t+1)`` (eq. 2-6);
* :func:`group_nll` -- the per-sample negative log-likelihood of ``X(T)`` (section 3.4).

Shapes: ``n`` samples, ``C`` classes. Memory is O(n^2 + n C): nothing of size n x n x C is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: added inside ``log`` of the refined probabilities, as the authors' code does (log(x + 1e-12))
LOG_EPS = 1e-12


def support_eps(dtype: torch.dtype) -> float:
    """Below this total support ``sum_l x_il pi_il`` a row counts as having no support and is left
    unchanged by :func:`replicator_dynamics`. ``sqrt(finfo.tiny)`` (about 1e-19 in float32) keeps the
    gradient of the normalisation, bounded by ``1 / support``, far from overflow."""
    return float(torch.finfo(dtype).tiny) ** 0.5


def pearson_similarity(embeddings: torch.Tensor, zero_diagonal: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """ReLU'd Pearson correlation between the rows of ``embeddings`` (n, d) -> W (n, n).

    Eq. (1): w_ij = Cov[f_i, f_j] / sqrt(Var[f_i] Var[f_j]), i.e. each embedding is centred over its
    features and the centred vectors are compared by cosine. Negative correlations are set to 0
    (appendix G, "clamping"). The diagonal is 1 (as the authors' released code has it) unless
    ``zero_diagonal`` (the paper's w_ii = 0). A constant embedding (zero variance) has zero
    correlation with every other sample; ``eps`` guards its zero norm.
    """
    centred = embeddings - embeddings.mean(dim=1, keepdim=True)  # eq. (1): standardise per embedding
    unit = F.normalize(centred, p=2, dim=1, eps=eps)
    w = F.relu(unit @ unit.t())  # appendix G: clamp negative similarities
    eye = torch.eye(w.shape[0], dtype=torch.bool, device=w.device)
    # the self-correlation is constant (1), so the diagonal carries no gradient either way
    return w.masked_fill(eye, 0.0 if zero_diagonal else 1.0)


def class_ranks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rank, counts)``: each sample's position among the samples of its class in batch order
    (0 for the first), and the number of samples of each class present in the batch.
    Vectorised with a stable sort (no loop over samples or classes)."""
    n = labels.shape[0]
    sorted_labels, order = torch.sort(labels, stable=True)
    _, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(n, device=labels.device) - torch.repeat_interleave(starts, counts)
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank, counts


def anchor_mask(labels: torch.Tensor, num_anchors: int) -> torch.Tensor:
    """Boolean mask of the anchors: per class, its first ``num_anchors`` samples in batch order
    (section 3.2; the sampler's shuffle makes them random)."""
    if labels.shape[0] == 0 or num_anchors <= 0:
        return torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
    return class_ranks(labels)[0] < num_anchors


def initial_assignment(prior: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """X(0): the rows of ``prior`` (n, C), with anchors replaced by one-hot rows of their label
    (section 3.2). ``prior`` is typically softmax(logits / temperature) (appendix C, eq. 9)."""
    one_hot = F.one_hot(labels, prior.shape[1]).to(prior.dtype)
    return torch.where(anchors.unsqueeze(1), one_hot, prior)


def replicator_dynamics(prior: torch.Tensor, W: torch.Tensor, num_iterations: int = 1) -> torch.Tensor:
    """Refine the row-stochastic assignment ``prior`` = X(0) (n, C) with similarities ``W`` (n, n)
    for ``num_iterations`` steps; returns X(T). Fully differentiable.

    Per step: Pi = W X (eq. 2-3); X <- (X * Pi) / ((X * Pi) 1) (eq. 4-6). One-hot rows (anchors)
    stay one-hot. A row whose total support (X * Pi) 1 is below :func:`support_eps` -- e.g. with
    a zero diagonal and no positively correlated neighbour -- is left unchanged instead of
    dividing by zero.
    """
    if num_iterations < 0:
        raise ValueError(f"num_iterations must be >= 0, got {num_iterations}")
    x = prior
    floor = support_eps(x.dtype)
    for _ in range(num_iterations):  # loop over iterations T only; each step is two matrix ops
        weighted = x * (W @ x)  # X(t) ⊙ Π(t), eq. (2)-(3)
        q = weighted.sum(dim=1, keepdim=True)  # diag of Q(t), eq. (6)
        has_support = q > floor
        x = torch.where(has_support, weighted / q.clamp_min(floor), x)  # eq. (4)/(5)
    return x


def group_nll(refined: torch.Tensor, labels: torch.Tensor, eps: float = LOG_EPS) -> torch.Tensor:
    """Per-sample -log(x_{i, y_i}(T) + eps) (section 3.4, Algorithm 1 line 7); average it over the
    batch (anchors included) for the paper's loss."""
    return -torch.log(refined.gather(1, labels.unsqueeze(1)).squeeze(1) + eps)
