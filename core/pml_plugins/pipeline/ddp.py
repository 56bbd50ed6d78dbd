"""The main job under torchrun: process group, rank-sliced global batches, DDP models.

``--batch-size`` stays the **global** batch: one sampler (m-per-class, random, or the loss's
own) draws the same global batches as a single process would, rank 0's order is broadcast
each epoch, and rank r takes the r-th of W equal, disjoint, contiguous slices of every
global batch (so an m-per-class batch keeps each class's m samples together whenever the
local batch is a multiple of m). The loss wrapper gathers the slices back in rank order.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ..distributed_losses import DistributedEnv


class GlobalRandomSampler(Sampler[int]):
    """A fresh random permutation of ``range(n)`` each epoch, from ``seed`` + the epoch count."""

    def __init__(self, n: int, seed: int = 0):
        if n < 1:
            raise ValueError(f"GlobalRandomSampler needs at least one sample, got n={n}")
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        """The next permutation is that of ``epoch`` (0-based): a resumed run draws what it would have."""
        self.epoch = int(epoch)


class RankSliceSampler(Sampler[int]):
    """This rank's slice of every global batch drawn by ``base`` (the same on every rank).

    Rank 0's index list is broadcast each epoch, so the slices are disjoint even if the ranks'
    random states differ. Incomplete last global batches are dropped, so every rank runs the
    same number of iterations.
    """

    def __init__(self, base: Sized, global_batch_size: int, rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if global_batch_size % world_size:
            raise ValueError(
                f"the batch size {global_batch_size} (global, over all ranks) must be divisible by the "
                f"number of processes {world_size}"
            )
        self.base, self.global_batch_size, self.rank, self.world_size = base, global_batch_size, rank, world_size
        self.local_batch_size = global_batch_size // world_size

    def __iter__(self) -> Iterator[int]:
        indices = [int(i) for i in self.base]  # type: ignore[attr-defined]
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            box = [indices]
            dist.broadcast_object_list(box, src=0)
            indices = box[0]
        lo = self.rank * self.local_batch_size
        for start in range(0, len(indices) - self.global_batch_size + 1, self.global_batch_size):
            yield from indices[start + lo : start + lo + self.local_batch_size]

    def __len__(self) -> int:
        return (len(self.base) // self.global_batch_size) * self.local_batch_size


@contextlib.contextmanager
def process_group(env: DistributedEnv, device: torch.device) -> Iterator[str]:
    """Initialise the default process group from torchrun's environment (``env://``).

    Backend: nccl for CUDA devices, gloo otherwise. Yields the backend name; tears down the
    group it created. A group that is already initialised (``compare --distributed`` holds one
    for all its runs: re-initialising under torchrun after a teardown can hang) is used as it
    is and left alone.
    """
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed; --distributed is unavailable")
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise ValueError(
                f"the initialised process group (rank {dist.get_rank()} of {dist.get_world_size()}) "
                f"does not match torchrun's RANK={env.rank}, WORLD_SIZE={env.world_size}"
            )
        yield str(dist.get_backend())
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size)
    try:
        yield backend
        # rank 0 may still be evaluating and writing: leave together (a rank tearing down gloo
        # while a peer is still connected can abort with "terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def local_device(device: torch.device, env: DistributedEnv) -> torch.device:
    """One GPU per process: ``cuda:LOCAL_RANK`` when the run is on CUDA, else the device as is."""
    if device.type != "cuda":
        return device
    if env.local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK={env.local_rank} but torch sees {torch.cuda.device_count()} CUDA devices: "
            f"use --nproc-per-node <= the number of GPUs"
        )
    return torch.device("cuda", env.local_rank)


def wrap_model(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around a module with trainable parameters (a parameter-free module stays as is).

    On CUDA, BatchNorm layers become ``SyncBatchNorm`` (in place, same parameters), so batch
    statistics are those of the global batch. On CPU torch has no SyncBatchNorm: each rank
    normalises with its local batch's statistics, and DDP copies rank 0's running statistics.
    """
    if not any(p.requires_grad for p in module.parameters()):
        return module
    if device.type == "cuda":
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ids: Optional[list] = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
