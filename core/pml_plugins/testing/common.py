"""Helpers shared by the loss and miner checks."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Callable, Iterator, Optional

import torch

from .batches import BatchSpec, make_labels

_HALF_MESSAGES = ("not implemented for 'half'", "not implemented for 'bfloat16'", '"half"', "'half'", "bfloat16")


def half_precision_unsupported(exc: BaseException) -> bool:
    """Whether ``exc`` says an op does not exist for a half-precision dtype on this device."""
    text = str(exc).lower()
    return "not implemented for" in text and any(m in text for m in _HALF_MESSAGES)


def assert_finite_backward(out: torch.Tensor, emb: torch.Tensor, loss: torch.nn.Module, where: str) -> None:
    """``out`` is finite, backward runs, and every gradient it produces is finite."""
    assert torch.isfinite(out).all(), f"non-finite loss {out.detach()} ({where})"
    for p in loss.parameters():
        p.grad = None
    if emb.grad is not None:
        emb.grad = None
    if out.requires_grad:
        out.backward()
    if emb.grad is not None:
        assert torch.isfinite(emb.grad).all(), f"non-finite gradient w.r.t. embeddings ({where})"
    for name, p in loss.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"non-finite gradient of loss parameter {name!r} ({where})"


def call_or_rejected(call: Callable[[], Any], keyword: str) -> Optional[Any]:
    """Run ``call``; return None when it rejects the feature with a ValueError naming ``keyword``."""
    try:
        return call()
    except ValueError as exc:
        if keyword.lower() in str(exc).lower() or "not supported" in str(exc).lower():
            return None
        raise AssertionError(f"{keyword}: raised ValueError that does not say what is unsupported: {exc}") from exc
    except (TypeError, NotImplementedError) as exc:
        if keyword.lower() in str(exc).lower():
            return None
        raise AssertionError(f"{keyword}: {type(exc).__name__}: {exc} (reject it with PML's clear ValueError)") from exc


def assert_clear_error(call: Callable[[], Any], what: str) -> None:
    """``call`` must raise ValueError or TypeError with a non-empty message."""
    try:
        result = call()
    except (ValueError, TypeError) as exc:
        assert str(exc).strip(), f"{what}: {type(exc).__name__} without a message"
        return
    except Exception as exc:  # broad on purpose: the point is to report what was raised instead
        raise AssertionError(f"{what}: expected a clear ValueError/TypeError, got {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"{what}: expected ValueError/TypeError, but the loss returned {result!r}")


class _Views(torch.utils.data.Dataset):
    """Items of ``(A views x features, label)``; a collate function flattens them to B*A rows."""

    def __init__(self, data: torch.Tensor, labels: torch.Tensor):
        self.data, self.labels = data, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.data[i], self.labels[i]


def _flatten_views(batch):
    data = torch.stack([b[0] for b in batch])
    labels = torch.stack([b[1] for b in batch])
    views = data.shape[1]
    return data.reshape(-1, data.shape[-1]), labels.repeat_interleave(views)


def run_trainer_step(loss: torch.nn.Module, spec: BatchSpec, miner: Optional[torch.nn.Module] = None) -> None:
    """Train one iteration with PML's MetricLossOnly; assert model (and loss) parameters moved."""
    from pytorch_metric_learning import samplers, trainers

    torch.manual_seed(0)
    in_dim, num_samples, batch = 12, 48, 16
    g = torch.Generator().manual_seed(0)
    m = spec.samples_per_class or 4
    labels = make_labels(BatchSpec(spec.embedding_size, spec.num_classes, 1, m), num_samples, "m_per_class", g)
    if spec.num_views > 1:
        data = torch.randn(num_samples, spec.num_views, in_dim, generator=g)
        dataset: torch.utils.data.Dataset = _Views(data, labels)
        collate = _flatten_views
    else:
        dataset = torch.utils.data.TensorDataset(torch.randn(num_samples, in_dim, generator=g), labels)
        collate = None
    trunk = torch.nn.Linear(in_dim, 16)
    embedder = torch.nn.Linear(16, spec.embedding_size)
    optimizers = {
        "trunk_optimizer": torch.optim.SGD(trunk.parameters(), lr=0.1),
        "embedder_optimizer": torch.optim.SGD(embedder.parameters(), lr=0.1),
    }
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    if loss_params:
        optimizers["metric_loss_optimizer"] = torch.optim.SGD(loss_params, lr=0.1)
    before = [p.detach().clone() for p in (*trunk.parameters(), *embedder.parameters())]
    loss_before = [p.detach().clone() for p in loss_params]
    sampler = samplers.MPerClassSampler(labels, m=m, batch_size=batch, length_before_new_iter=batch)
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers=optimizers,
        batch_size=batch,
        loss_funcs={"metric_loss": loss},
        mining_funcs={"tuple_miner": miner} if miner is not None else {},
        dataset=dataset,
        sampler=sampler,
        collate_fn=collate,
        iterations_per_epoch=1,
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
    )
    trainer.train(num_epochs=1)
    moved = any(not torch.equal(b, p) for b, p in zip(before, (*trunk.parameters(), *embedder.parameters())))
    assert moved, "one MetricLossOnly step did not change the model: does the loss have a gradient?"
    for name, p in (*trunk.named_parameters(), *embedder.named_parameters()):
        assert torch.isfinite(p).all(), f"model parameter {name} is not finite after a trainer step"
    if loss_params:
        assert any(not torch.equal(b, p) for b, p in zip(loss_before, loss_params)), (
            "one MetricLossOnly step with metric_loss_optimizer did not change the loss parameters"
        )
        assert all(torch.isfinite(p).all() for p in loss_params), "loss parameters not finite after a trainer step"


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A one-process gloo group (reusing one the caller already initialised)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
