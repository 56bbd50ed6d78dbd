"""Timing and peak memory of one loss forward + backward, shared by the loss benchmarks.

Imported by the ``bench_*.py`` scripts of this folder (``python benchmarks/bench_mpa.py`` puts
the folder on ``sys.path``).
"""

from __future__ import annotations

import statistics
import time

import torch


def sync(device: str) -> None:
    """Wait for queued CUDA work, so wall-clock times cover it."""
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(loss_fn: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> None:
    """One forward + backward, the loss's parameter gradients and ``x.grad`` cleared first."""
    for p in loss_fn.parameters():
        p.grad = None
    x.grad = None
    loss_fn(x, labels).backward()


def median_step_seconds(
    loss_fn: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, repeats: int, device: str, warmup: int = 2
) -> float:
    """Median wall-clock seconds of :func:`train_step` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        train_step(loss_fn, x, labels)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        train_step(loss_fn, x, labels)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_step_bytes(loss_fn: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, device: str) -> int:
    """Peak memory one :func:`train_step` adds: ``max_memory_allocated`` on CUDA; on CPU an
    estimate from torch.profiler's per-op allocations."""
    for p in loss_fn.parameters():
        p.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(loss_fn, x, labels)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(loss_fn, x, labels)
    # each op's own allocations minus frees (children excluded), in start order: an estimate
    # of the high-water mark at op granularity
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    held = peak = 0
    for _, delta in events:
        held += delta
        peak = max(peak, held)
    return peak
