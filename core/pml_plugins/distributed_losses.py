"""Losses under DDP: PML's distributed wrappers made exact for every loss, and each loss's declared semantics.

(This module was ``pml_plugins.distributed``; the old name still imports, with a ``DeprecationWarning``.
The main job's DDP plumbing -- process group, rank-sliced samplers, DDP models -- is
:mod:`pml_plugins.pipeline.ddp`.)

PML's ``DistributedLossWrapper(efficient=False)`` all-gathers the embeddings of every rank
(gradients flow only into the local rows), computes the loss on the gathered batch and
returns it multiplied by the world size W. After DDP averages the model's gradients over the
ranks, the model gradient equals the single-process gradient on the gathered batch; but a
loss's own parameters (proxies, anchors, classifiers) are not in DDP, and each rank holds
W times their single-process gradient. PML also gathers in the order ``[this rank, the
others]``, so each rank sees the batch in another order: order-dependent losses (the Group
Loss picks anchors in batch order) compute a different value on each rank, and even
order-free losses sum in another order, so ranks drift apart in the last bits.

This module fixes both, once, for every loss:

* :class:`DistributedLossWrapper` / :class:`DistributedMinerWrapper` are drop-in subclasses of
  PML's that gather in **global rank order** (rank 0's rows first): every rank sees exactly the
  batch a single process would see;
* :func:`average_loss_gradients` all-reduces the loss parameters' gradients and undoes PML's
  factor W, so they equal the single-process gradients and are identical on every rank.

Losses declare their semantics in their spec (``LossSpec.distributed``, see
:class:`pml_plugins.LossSpec` and :data:`DISTRIBUTED_SEMANTICS`); :func:`wrap_loss` refuses a
loss that cannot run distributed, or efficient mode for a loss that does not support it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from pytorch_metric_learning.utils import distributed as pml_dist

#: values of ``LossSpec.distributed``, with their meaning
DISTRIBUTED_SEMANTICS = {
    "gradient_equivalent": "each rank's gradients (model after DDP averaging, loss parameters after "
    "average_loss_gradients) equal the single-process gradients on the gathered global batch",
    "batch_dependent": "runs distributed and ranks stay in sync, but the value differs from one process on the "
    "global batch (the registration's distributed_note says how)",
    "unsupported": "cannot run distributed; the trainer refuses it",
}

#: environment variables torchrun sets for every process
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int


def env_from_torchrun(environ: Optional[Mapping[str, str]] = None) -> DistributedEnv:
    """Read ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and check ``MASTER_ADDR``/``MASTER_PORT``).

    Raises:
        ValueError: a variable is missing or malformed (the process was not started by torchrun).
    """
    environ = os.environ if environ is None else environ
    missing = [k for k in TORCHRUN_ENV if not environ.get(k)]
    if missing:
        raise ValueError(
            f"--distributed needs the environment torchrun sets (missing {', '.join(missing)}): launch with "
            f"`torchrun --nproc-per-node N -m pml_plugins train ... --distributed` (or python -m torch.distributed.run)"
        )
    try:
        rank, world, local = (int(environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise ValueError(
            f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
            f"{[environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')]}"
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return DistributedEnv(rank=rank, world_size=world, local_rank=local)


def is_distributed() -> bool:
    """A process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def gather_in_rank_order(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` (same shape on every rank) into ``cat([rank 0, rank 1, ...])``.

    The local slot is ``x`` itself, so gradients flow into the local rows only; the other
    ranks' rows are constants. Every rank gets the same rows in the same order.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def _gather_optional(x: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    if x is None:
        return None
    return gather_in_rank_order(x.to(device))


class DistributedLossWrapper(pml_dist.DistributedLossWrapper):
    """PML's ``DistributedLossWrapper`` whose non-efficient mode gathers in global rank order.

    With ``efficient=False`` every rank computes the loss on exactly the batch one process
    would see (rank 0's rows first), times the world size as PML does (DDP's averaging then
    gives the model the single-process gradient). Call :func:`average_loss_gradients` on the
    loss after ``backward()``. ``efficient=True`` is PML's efficient mode, unchanged.
    """

    def forward_regular_loss(self, emb, labels, indices_tuple, ref_emb, ref_labels, world_size):
        if self.efficient or world_size <= 1:
            return super().forward_regular_loss(emb, labels, indices_tuple, ref_emb, ref_labels, world_size)
        all_emb = gather_in_rank_order(emb)
        all_labels = _gather_optional(labels, emb.device)
        all_ref = _gather_optional(ref_emb, emb.device)
        all_ref_labels = _gather_optional(ref_labels, emb.device)
        return self.loss(all_emb, all_labels, indices_tuple, all_ref, all_ref_labels) * world_size


class DistributedMinerWrapper(pml_dist.DistributedMinerWrapper):
    """PML's ``DistributedMinerWrapper``; non-efficient mode mines the rank-ordered gathered batch,
    so its indices match :class:`DistributedLossWrapper`'s batch."""

    def forward(self, emb, labels, ref_emb=None, ref_labels=None):
        if self.efficient or world_size() <= 1:
            return super().forward(emb, labels, ref_emb, ref_labels)
        return self.miner(
            gather_in_rank_order(emb),
            _gather_optional(labels, emb.device),
            _gather_optional(ref_emb, emb.device),
            _gather_optional(ref_labels, emb.device),
        )


def loss_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters of a loss (or of the loss inside a wrapper)."""
    return [p for p in module.parameters() if p.requires_grad]


@torch.no_grad()
def average_loss_gradients(module: torch.nn.Module, *, efficient: bool = False) -> None:
    """Make the gradients of a loss's own parameters right, and identical on every rank.

    Call after ``backward()`` through a distributed loss wrapper, before the optimizer step.
    The gradients are all-reduced (summed) and divided by ``W**2`` (``efficient=False``: every
    rank holds W times the full-batch gradient) or by ``W`` (``efficient=True``: each rank holds
    W times the gradient of its own queries' loss, so the result is their sum, the objective
    DDP's model averaging optimises). A no-op without a process group or with one process.
    """
    if not is_distributed():
        return
    size = dist.get_world_size()
    if size == 1:
        return
    params = loss_parameters(module)
    if not params:
        return
    # every parameter takes part (zeros for a missing gradient), so the collective has the same
    # size on every rank even when a parameter got no gradient on some rank
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= size if efficient else size * size
    offset = 0
    for p in params:
        part = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is not None:
            p.grad.copy_(part)
        elif bool(part.any()):  # another rank had a gradient: the result is the same everywhere
            p.grad = part.clone()


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (no-op without a process group)."""
    if not is_distributed():
        return
    for t in [*module.parameters(), *module.buffers()]:
        if t.numel():
            dist.broadcast(t.data, src=src)


def distributed_semantics(entry: Any) -> Optional[str]:
    """The ``distributed`` value a registry entry declares (None when it declares nothing)."""
    value = entry.spec.distributed
    if value is not None and value not in DISTRIBUTED_SEMANTICS:
        raise ValueError(
            f"loss {entry.name!r} declares distributed={value!r}; expected one of {sorted(DISTRIBUTED_SEMANTICS)}"
        )
    return value


def check_distributed_support(entry: Any, *, efficient: bool = False) -> Optional[str]:
    """Raise ``ValueError`` naming the loss when it cannot run as asked; return its semantics.

    Args:
        entry: the loss's registry entry (:func:`pml_plugins.get_entry`).
        efficient: PML's efficient mode is asked for; it needs ``distributed_efficient=True``.
    """
    semantics = distributed_semantics(entry)
    note = entry.spec.distributed_note
    if semantics == "unsupported":
        raise ValueError(
            f"loss {entry.name!r} ({entry.obj.__name__}) cannot be trained distributed"
            + (f": {note}" if note else " (its registration says distributed='unsupported')")
        )
    if efficient and not entry.spec.distributed_efficient:
        raise ValueError(
            f"loss {entry.name!r} ({entry.obj.__name__}) does not support PML's efficient distributed mode "
            f"(it would receive the gathered batch as ref_emb); train without --distributed-efficient"
        )
    return semantics


def wrap_loss(loss: Any, entry: Any = None, *, efficient: bool = False) -> DistributedLossWrapper:
    """Wrap ``loss`` for distributed training after checking its registration (when given)."""
    if entry is not None:
        check_distributed_support(entry, efficient=efficient)
    return DistributedLossWrapper(loss, efficient=efficient)


def wrap_miner(miner: Any, *, efficient: bool = False) -> DistributedMinerWrapper:
    return DistributedMinerWrapper(miner, efficient=efficient)
