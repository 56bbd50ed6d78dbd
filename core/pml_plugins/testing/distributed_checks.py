"""Distributed checks: registered losses under DDP (gloo, CPU) against one process on the global batch.

:func:`distributed_report` spawns ``world_size`` processes with ``torch.multiprocessing`` (one
torch thread each), and for every loss name

* wraps a linear model in DDP and the loss in :class:`pml_plugins.distributed_losses.DistributedLossWrapper`,
  runs one step on rank slices of a global batch and compares, on every rank, the loss value and
  the gradients of the model and of the loss's own parameters (after
  :func:`~pml_plugins.distributed_losses.average_loss_gradients`) with one process on the whole batch;
* measures what PML's own wrapper gives on the same step (the factor on the loss parameters'
  gradients, and the value error its ``[this rank, others]`` gather order causes);
* trains a few SGD steps both ways and measures how far parameters (model + loss) are apart
  across ranks and from the single-process run;
* for a loss whose registration says ``distributed="unsupported"``, records whether
  :func:`~pml_plugins.distributed_losses.wrap_loss` refused it.

The report holds measurements (maxima over ranks); the caller asserts on them.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback
from typing import Any, Optional, Sequence

import torch

#: the global batch: 4 classes x 4 samples, 2 consecutive rows per class per rank, so classes
#: span ranks and consecutive pairs (multi-view queries with 2 views) share a label
NUM_CLASSES, EMBEDDING_SIZE, IN_FEATURES = 4, 8, 6
LABELS = torch.arange(NUM_CLASSES).repeat_interleave(2).repeat(2)


def make_check_loss(entry: Any, num_classes: int = NUM_CLASSES, embedding_size: int = EMBEDDING_SIZE) -> Any:
    """A small instance of a registered loss: its ``conformance_factory``, else its constructor
    with ``num_classes`` / ``embedding_size`` where it takes them."""
    factory = entry.spec.conformance_factory
    if callable(factory):
        return factory(num_classes, embedding_size)
    from .. import registry as reg

    offered = {"num_classes": int(num_classes), "embedding_size": int(embedding_size)}
    return reg.registry.build("loss", entry.qualified_name, offered=offered).obj


def _batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(len(LABELS), IN_FEATURES, generator=g, dtype=dtype), LABELS.clone()


def _fresh(entry: Any, dtype: torch.dtype, miner_name: Optional[str], database: bool = False) -> tuple:
    from .. import registry as reg

    torch.manual_seed(0)
    model = torch.nn.Linear(IN_FEATURES, EMBEDDING_SIZE).to(dtype)
    loss = make_check_loss(entry).to(dtype)
    if database:  # a loss that holds a database of embeddings (``set_database``, e.g. DMCAC's)
        g = torch.Generator().manual_seed(99)
        loss.set_database(torch.randn(24, EMBEDDING_SIZE, generator=g), torch.arange(24) % NUM_CLASSES)
    miner = reg.create_miner(miner_name) if miner_name else None
    return model, loss, miner


def _forward(model, loss, miner, x, y, wrapper=None, miner_wrapper=None):
    torch.manual_seed(7)  # losses that draw random numbers draw the same ones everywhere
    emb = model(x)
    if wrapper is None:
        return loss(emb, y, miner(emb, y) if miner is not None else None)
    indices = miner_wrapper(emb, y) if miner_wrapper is not None else None
    return wrapper(emb, y, indices)


def _grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def _max_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max([float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()] or [0.0])


def _flat(*modules: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for m in modules for p in m.parameters()] or [torch.zeros(0)])


def _check_one(
    entry: Any, rank: int, world: int, dtype: torch.dtype, miner_name: Optional[str], steps: int, database: bool = False
) -> dict:
    import torch.distributed as dist
    from pytorch_metric_learning.utils import distributed as pml_dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .. import distributed_losses as pd

    semantics = pd.distributed_semantics(entry)
    out: dict = {"semantics": semantics}
    if semantics == "unsupported":
        try:
            pd.wrap_loss(make_check_loss(entry), entry)
            out["refused"] = False
        except ValueError as exc:
            out["refused"], out["message"] = True, str(exc)
        return out
    n = len(LABELS) // world
    sl = slice(rank * n, (rank + 1) * n)
    x, y = _batch(0, dtype)

    model, loss, miner = _fresh(entry, dtype, miner_name, database)  # one process, whole batch
    single = _forward(model, loss, miner, x, y)
    single.backward()
    ref_model, ref_loss = _grads(model), _grads(loss)

    model, loss, miner = _fresh(entry, dtype, miner_name, database)  # this rank's slice, core wrappers
    ddp = DDP(model)
    value = _forward(
        ddp, loss, miner, x[sl], y[sl], pd.wrap_loss(loss, entry), pd.wrap_miner(miner) if miner is not None else None
    )
    value.backward()
    raw = _grads(loss)
    pd.average_loss_gradients(loss)
    out["value_err"] = abs(float(value.detach()) / world - float(single.detach()))
    out["model_grad_err"] = _max_diff(_grads(model), ref_model)
    out["loss_grad_err"] = _max_diff(_grads(loss), ref_loss)
    scale = max([float(g.abs().max()) for g in ref_loss if g.numel()] or [0.0])
    out["loss_grad_scale"] = scale
    if scale > 0:  # the factor the wrapper (PML's x world_size) leaves on the loss parameters' gradients
        num = sum(float((r * g).sum()) for r, g in zip(raw, ref_loss))
        out["raw_loss_grad_factor"] = num / sum(float((g * g).sum()) for g in ref_loss)

    model, loss, miner = _fresh(entry, dtype, miner_name, database)  # PML's own wrappers, for the record
    ddp = DDP(model)
    pml_value = _forward(
        ddp,
        loss,
        miner,
        x[sl],
        y[sl],
        pml_dist.DistributedLossWrapper(loss),
        pml_dist.DistributedMinerWrapper(miner) if miner is not None else None,
    )
    out["pml_order_value_err"] = abs(float(pml_value.detach()) / world - float(single.detach()))

    finals = []
    for distributed in (False, True):  # a few SGD steps, model and loss parameters
        model, loss, miner = _fresh(entry, dtype, miner_name, database)
        params = [p for m in (model, loss) for p in m.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.05)
        net = DDP(model) if distributed else model
        wrapper = pd.wrap_loss(loss, entry) if distributed else None
        miner_wrapper = pd.wrap_miner(miner) if (distributed and miner is not None) else None
        for step in range(steps):
            xb, yb = _batch(step + 1, dtype)
            if distributed:
                xb, yb = xb[sl], yb[sl]
            opt.zero_grad()
            _forward(net, loss, miner, xb, yb, wrapper, miner_wrapper).backward()
            if distributed:
                pd.average_loss_gradients(loss)
            opt.step()
        finals.append(_flat(model, loss))
    out["train_vs_single"] = float((finals[0] - finals[1]).abs().max()) if finals[0].numel() else 0.0
    everyone = [torch.empty_like(finals[1]) for _ in range(world)]
    dist.all_gather(everyone, finals[1])
    out["rank_param_diff"] = max(float((t - everyone[0]).abs().max()) for t in everyone) if finals[1].numel() else 0.0
    return out


def _worker(rank: int, world: int, init_file: str, cases: list, out_dir: str, dtype_name: str, steps: int) -> None:
    import torch.distributed as dist

    from .. import registry as reg

    torch.set_num_threads(1)
    # a short timeout: a loss that fails on one rank only must not hang the other for 30 minutes
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    dtype = getattr(torch, dtype_name)
    results = {}
    try:
        for name, miner_name, database in cases:
            key = f"{name}+{miner_name}" if miner_name else (f"{name}+database" if database else name)
            try:
                results[key] = _check_one(reg.get_entry("loss", name), rank, world, dtype, miner_name, steps, database)
            except Exception:  # recorded: the caller's assertion shows it
                results[key] = {"error": traceback.format_exc()}
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _merge(per_rank: list[dict]) -> dict:
    report: dict = {}
    for key in per_rank[0]:
        rows = [r.get(key, {"error": "missing on a rank"}) for r in per_rank]
        merged = dict(rows[0])
        for row in rows[1:]:
            for k, v in row.items():
                if isinstance(v, float) and isinstance(merged.get(k), float):
                    merged[k] = max(merged[k], v, key=abs)
                elif k == "error":
                    merged[k] = v
        report[key] = merged
    return report


def distributed_report(
    names: Sequence[str],
    *,
    miner_cases: Sequence[tuple[str, str]] = (),
    database_cases: Sequence[str] = (),
    world_size: int = 2,
    dtype: torch.dtype = torch.float64,
    steps: int = 3,
) -> dict[str, dict]:
    """Run the checks in ``world_size`` spawned gloo processes; returns ``{key: measurements}``
    (maxima over ranks; a failure is recorded under ``"error"`` with its traceback).

    Args:
        names: loss names; key = the name.
        miner_cases: ``(loss, miner)`` pairs, the miner wrapped too; key ``"loss+miner"``.
        database_cases: losses with a ``set_database(embeddings, labels)`` method, checked with
            the same fixed database on every rank; key ``"loss+database"``.
        world_size: processes (>= 2, dividing the 16-row check batch).
        dtype: of the model, loss and batch (float64 makes differences ~1e-15).
        steps: SGD steps of the training comparison.
    """
    if world_size < 2:
        raise ValueError(f"world_size must be >= 2 to check anything distributed, got {world_size}")
    if len(LABELS) % world_size:
        raise ValueError(f"the check batch of {len(LABELS)} rows does not split over {world_size} processes")
    import torch.multiprocessing as mp

    cases = (
        [(n, None, False) for n in names]
        + [(loss, miner, False) for loss, miner in miner_cases]
        + [(n, None, True) for n in database_cases]
    )
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _worker,
            args=(world_size, os.path.join(tmp, "store"), cases, tmp, str(dtype).split(".")[-1], steps),
            nprocs=world_size,
            join=True,
        )
        per_rank = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
    return _merge(per_rank)
