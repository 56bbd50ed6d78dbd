"""Conformance checks for loss plugins: each check is ``check_x(make_loss, spec)``.

A check raises ``AssertionError`` (with the check's name) when the loss does not behave like a
pytorch-metric-learning built-in, and returns normally otherwise. Checks that do not apply to
a loss (e.g. ``indices_tuple`` equalities for a loss that rejects tuples) pass silently.
"""

from __future__ import annotations

import io
from typing import Any, Callable

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import AvgNonZeroReducer, DoNothingReducer, MeanReducer, SumReducer
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .batches import ALL_DTYPES, BatchSpec, make_batch
from .common import (
    assert_clear_error,
    assert_finite_backward,
    call_or_rejected,
    half_precision_unsupported,
    run_trainer_step,
    single_process_group,
)

LossFactory = Callable[[], BaseMetricLossFunction]
_TOL = {torch.float16: 5e-2, torch.bfloat16: 1.5e-1, torch.float32: 1e-4, torch.float64: 1e-8}


def _loss(make_loss: LossFactory) -> BaseMetricLossFunction:
    torch.manual_seed(0)
    return make_loss()


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert torch.allclose(a, b, rtol=tol, atol=tol), f"{what}: {a.item():.8g} != {b.item():.8g}"


def _value(loss, *args, seed: int = 0, **kwargs) -> torch.Tensor:
    torch.manual_seed(seed)  # losses with internal sampling give the same draw
    return loss(*args, **kwargs)


def check_is_pml_loss(make_loss: LossFactory, spec: BatchSpec) -> None:
    """The loss is a ``BaseMetricLossFunction`` (so PML reducers, distances, wrappers apply)."""
    loss = _loss(make_loss)
    assert isinstance(loss, BaseMetricLossFunction), (
        f"{type(loss).__name__} must subclass pytorch_metric_learning.losses.BaseMetricLossFunction"
    )
    assert callable(getattr(loss, "compute_loss", None)), "the loss must implement compute_loss"
    assert isinstance(loss.sub_loss_names(), list) and loss.sub_loss_names(), (
        "sub_loss_names() must be a non-empty list"
    )


def check_forward_backward(make_loss: LossFactory, spec: BatchSpec) -> None:
    """Scalar, finite loss and finite gradients for several batch sizes and label layouts."""
    for num_samples in (2, 8, 32):
        for layout in ("one_class", "m_per_class", "many_classes"):
            loss = _loss(make_loss)
            emb, labels = make_batch(spec, num_samples, layout=layout, seed=num_samples)
            out = _value(loss, emb, labels)
            assert isinstance(out, torch.Tensor) and out.ndim == 0, (
                f"loss must return a 0-dim tensor, got {type(out).__name__} {getattr(out, 'shape', '')} "
                f"(batch of {num_samples} samples, layout {layout})"
            )
            assert_finite_backward(out, emb, loss, f"{num_samples} samples, layout {layout}")


def check_dtypes(make_loss: LossFactory, spec: BatchSpec) -> None:
    """float16 / bfloat16 / float32 / float64 embeddings give finite values and gradients."""
    reference = None
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        loss = _loss(make_loss)
        emb, labels = make_batch(spec, 8, dtype=dtype, seed=1)
        try:
            out = _value(loss, emb, labels)
        except (RuntimeError, NotImplementedError) as exc:
            if dtype in (torch.float16, torch.bfloat16) and half_precision_unsupported(exc):
                continue  # the op does not exist for this dtype on this device
            raise AssertionError(f"{dtype} embeddings failed: {type(exc).__name__}: {exc}") from exc
        assert_finite_backward(out, emb, loss, f"dtype {dtype}")
        assert emb.grad.dtype == dtype, f"gradient dtype {emb.grad.dtype} != embeddings dtype {dtype}"
        if reference is None:
            reference = out.detach()
        else:
            _close(
                out.detach().float(),
                reference.float(),
                f"{dtype} value vs float64",
                tol=_TOL[dtype] * max(1.0, abs(float(reference))),
            )


def _loss_dict(make_loss: LossFactory, emb: torch.Tensor, labels: torch.Tensor) -> dict:
    loss = _loss(make_loss)
    loss.reducer = DoNothingReducer()  # bypasses MultipleReducers on purpose: the raw loss dict
    out = _value(loss, emb, labels)
    assert isinstance(out, dict), "with DoNothingReducer the loss must return PML's loss dict"
    return out


def check_reducers(make_loss: LossFactory, spec: BatchSpec) -> None:
    """PML reducers apply: Mean/Sum/AvgNonZero give finite scalars; DoNothing gives the sub-loss dict."""
    emb, labels = make_batch(spec, 8, seed=2)
    for reducer in (MeanReducer(), SumReducer(), AvgNonZeroReducer()):
        loss = _loss(make_loss)
        loss.set_reducer(reducer)  # as the reducer= constructor argument does (wraps multi sub-losses)
        e = emb.detach().clone().requires_grad_(True)
        out = _value(loss, e, labels)
        assert out.ndim == 0, f"with {type(reducer).__name__} the loss must be a scalar"
        assert_finite_backward(out, e, loss, type(reducer).__name__)
    out = _loss_dict(make_loss, emb, labels)
    assert set(out) == set(loss.sub_loss_names()), (
        f"loss dict keys {sorted(out)} != sub_loss_names() {sorted(loss.sub_loss_names())}"
    )
    for name, sub in out.items():
        assert {"losses", "indices", "reduction_type"} <= set(sub), (
            f"sub-loss {name!r} must have losses, indices, reduction_type"
        )
        assert sub["reduction_type"] in {"element", "pos_pair", "neg_pair", "triplet", "already_reduced"}, (
            f"sub-loss {name!r} has unknown reduction_type {sub['reduction_type']!r}"
        )


def check_distances(make_loss: LossFactory, spec: BatchSpec, distances: tuple = ()) -> None:
    """The distances the loss declares compatible give finite values and gradients."""
    emb, labels = make_batch(spec, 8, seed=3)
    for distance in distances:
        loss = _loss(make_loss)
        loss.distance = distance
        e = emb.detach().clone().requires_grad_(True)
        assert_finite_backward(_value(loss, e, labels), e, loss, f"distance {type(distance).__name__}")


def check_ref_emb(make_loss: LossFactory, spec: BatchSpec) -> None:
    """``ref_emb``/``ref_labels`` are used (finite) or rejected with a clear ValueError; passing
    the batch itself as reference changes nothing (PML's generic check)."""
    loss = _loss(make_loss)
    emb, labels = make_batch(spec, 8, seed=4)
    ref, ref_labels = make_batch(spec, 6, seed=5, requires_grad=False)
    out = call_or_rejected(lambda: _value(loss, emb, labels, ref_emb=ref, ref_labels=ref_labels), "ref_emb")
    if out is not None:
        assert_finite_backward(out, emb, loss, "with ref_emb")
    loss = _loss(make_loss)
    plain = _value(loss, emb, labels)
    same = _value(loss, emb, labels, ref_emb=emb, ref_labels=labels)
    _close(same.detach(), plain.detach(), "loss(emb, labels, ref_emb=emb, ref_labels=labels) != loss(emb, labels)")


def _all_tuples(labels: torch.Tensor) -> dict[str, tuple]:
    return {"pairs": lmu.get_all_pairs_indices(labels), "triplets": lmu.get_all_triplets_indices(labels)}


def check_indices_tuple(make_loss: LossFactory, spec: BatchSpec) -> None:
    """Tuples from a PML miner are used or rejected with a clear ValueError. For losses that use
    them (PML's generic checks): all tuples == labels alone; tuples alone (no labels) == with
    labels; ``ref_emb=embeddings`` changes nothing; no valid tuple -> zero loss and a backward."""
    emb, labels = make_batch(spec, 8, layout="m_per_class", seed=6)
    accepted = {}
    for kind, tup in _all_tuples(labels).items():
        loss = _loss(make_loss)
        out = call_or_rejected(lambda: _value(loss, emb, labels, tup), "indices_tuple")
        if out is not None:
            assert_finite_backward(out, emb, loss, f"indices_tuple of {kind}")
            emb.grad = None
            accepted[kind] = (tup, out.detach())
    if not accepted:
        return
    reduction_types = {sub["reduction_type"] for sub in _loss_dict(make_loss, emb, labels).values()}
    tuple_based = bool(reduction_types & {"pos_pair", "neg_pair", "triplet"})
    loss = _loss(make_loss)
    plain = _value(loss, emb, labels).detach()
    assert any(torch.allclose(v.double(), plain.double(), rtol=1e-4, atol=1e-5) for _, v in accepted.values()), (
        f"loss(emb, labels, all {'/'.join(accepted)}) = {[float(v) for _, v in accepted.values()]} "
        f"!= loss(emb, labels) = {float(plain)}: the default tuples should equal all tuples"
    )
    for kind, (tup, with_labels) in accepted.items():
        alone = call_or_rejected(lambda: _value(loss, emb, None, tup), "labels")
        if alone is not None:
            _close(alone.detach(), with_labels, f"loss(emb, indices_tuple={kind}) != loss(emb, labels, indices_tuple)")
        same = _value(loss, emb, labels, tup, ref_emb=emb, ref_labels=labels)
        _close(
            same.detach(), with_labels, f"loss(emb, labels, {kind}, ref_emb=emb, ref_labels=labels) != without ref_emb"
        )
        empty = tuple(torch.empty(0, dtype=torch.long) for _ in tup)
        e = emb.detach().clone().requires_grad_(True)
        value = _value(loss, e, labels, empty)
        if tuple_based:  # PML: a batch without valid tuples gives zero loss and a working backward
            assert float(value) == 0.0, f"an empty {kind} indices_tuple must give zero loss, got {float(value)}"
        assert_finite_backward(value, e, loss, f"empty {kind} indices_tuple")


def check_state_dict(make_loss: LossFactory, spec: BatchSpec) -> None:
    """Parameters and buffers survive state_dict -> torch.save -> torch.load(weights_only=True)."""
    source = _loss(make_loss)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # differ from a fresh instance's init
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    target = make_loss()
    target.load_state_dict(loaded)
    for (name, a), (_, b) in zip(sorted(source.state_dict().items()), sorted(target.state_dict().items())):
        assert torch.equal(a, b), f"state_dict entry {name!r} changed in the round trip"
    emb, labels = make_batch(spec, 8, seed=7, requires_grad=False)
    _close(_value(target, emb, labels), _value(source, emb, labels), "loss after load_state_dict")


def check_trainer_step(make_loss: LossFactory, spec: BatchSpec) -> None:
    """One optimisation step inside PML's MetricLossOnly trainer updates model and loss parameters."""
    run_trainer_step(_loss(make_loss), spec, miner=None)


def check_distributed_wrapper(make_loss: LossFactory, spec: BatchSpec) -> None:
    """``DistributedLossWrapper`` (single process, gloo) gives the unwrapped value."""
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    emb, labels = make_batch(spec, 8, seed=8)
    with single_process_group():
        loss = _loss(make_loss)
        plain = _value(loss, emb, labels)
        wrapped = _value(DistributedLossWrapper(loss), emb, labels)
        _close(wrapped.detach(), plain.detach(), "DistributedLossWrapper(loss) value")
        assert_finite_backward(wrapped, emb, loss, "DistributedLossWrapper")


def check_devices(make_loss: LossFactory, spec: BatchSpec) -> None:
    """The loss moves with ``.to(device)`` and computes there (CPU always, CUDA when present)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    values = []
    for device in devices:
        loss = _loss(make_loss).to(device)
        emb, labels = make_batch(spec, 8, seed=9, device=device)
        out = _value(loss, emb, labels)
        assert out.device.type == device, f"loss on {device} returned a tensor on {out.device}"
        assert_finite_backward(out, emb, loss, f"device {device}")
        values.append(out.detach().cpu())
    for v in values[1:]:
        _close(v, values[0], "CUDA vs CPU value", tol=1e-3)


def check_bad_input(make_loss: LossFactory, spec: BatchSpec) -> None:
    """Malformed input raises ValueError/TypeError with a message, never NaN or a deep error."""
    loss = _loss(make_loss)
    emb, labels = make_batch(spec, 8, seed=10, requires_grad=False)
    rows = emb.shape[0]
    cases: dict[str, Callable[[], Any]] = {
        "labels shorter than embeddings": lambda: loss(emb, labels[:-1]),
        "1-D embeddings": lambda: loss(emb[0], labels[:1]),
        "3-D embeddings": lambda: loss(emb.unsqueeze(0), labels),
        "NaN embeddings": lambda: loss(torch.where(torch.arange(rows)[:, None] == 1, torch.nan, emb), labels),
        "Inf embeddings": lambda: loss(torch.where(torch.arange(rows)[:, None] == 0, torch.inf, emb), labels),
        "2-D labels": lambda: loss(emb, labels[:, None]),
    }
    if spec.num_classes is not None:
        cases["labels >= num_classes"] = lambda: loss(emb, torch.full_like(labels, spec.num_classes))
        cases["negative labels"] = lambda: loss(emb, torch.full_like(labels, -1))
        cases["wrong embedding_size"] = lambda: loss(torch.randn(rows, spec.embedding_size + 1), labels)
    for what, call in cases.items():
        assert_clear_error(call, what)


def check_property_based(make_loss: LossFactory, spec: BatchSpec, max_examples: int = 20) -> None:
    """hypothesis: random batch sizes, label layouts, scales and dtypes give finite values and grads."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        num_samples=st.integers(min_value=2, max_value=24),
        layout=st.sampled_from(["one_class", "m_per_class", "many_classes", "random"]),
        dtype=st.sampled_from(ALL_DTYPES),
        log_scale=st.floats(min_value=-2.0, max_value=1.0),
        seed=st.integers(min_value=0, max_value=2**16),
    )
    def run(num_samples: int, layout: str, dtype: torch.dtype, log_scale: float, seed: int) -> None:
        if spec.samples_per_class and layout in ("random", "many_classes"):
            layout = "m_per_class"  # the loss declared it needs m-per-class batches
        loss = _loss(make_loss)
        emb, labels = make_batch(spec, num_samples, layout=layout, dtype=dtype, scale=10.0**log_scale, seed=seed)
        try:
            out = _value(loss, emb, labels)
        except (RuntimeError, NotImplementedError) as exc:
            if dtype in (torch.float16, torch.bfloat16) and half_precision_unsupported(exc):
                return
            raise
        assert_finite_backward(out, emb, loss, f"{num_samples} samples, {layout}, {dtype}, scale 1e{log_scale:.2f}")

    run()


#: Every loss check, in the order the kit runs them.
LOSS_CHECKS = (
    check_is_pml_loss,
    check_forward_backward,
    check_dtypes,
    check_reducers,
    check_distances,
    check_ref_emb,
    check_indices_tuple,
    check_state_dict,
    check_trainer_step,
    check_distributed_wrapper,
    check_devices,
    check_bad_input,
    check_property_based,
)
