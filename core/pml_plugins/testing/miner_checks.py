"""Conformance checks for miner plugins: each check is ``check_x(make_miner, spec)``."""

from __future__ import annotations

from typing import Callable

import torch
from pytorch_metric_learning.losses import ContrastiveLoss, TripletMarginLoss
from pytorch_metric_learning.miners import BaseMiner

from .batches import ALL_DTYPES, BatchSpec, make_batch
from .common import assert_clear_error, call_or_rejected, half_precision_unsupported, run_trainer_step

MinerFactory = Callable[[], BaseMiner]


def _miner(make_miner: MinerFactory) -> BaseMiner:
    torch.manual_seed(0)
    return make_miner()


def _assert_valid_tuple(out, labels: torch.Tensor, ref_labels: torch.Tensor, where: str) -> None:
    assert isinstance(out, tuple) and len(out) in (3, 4), (
        f"a miner returns a 3-tuple (triplets) or 4-tuple (pairs), got {type(out).__name__} ({where})"
    )
    for t in out:
        assert isinstance(t, torch.Tensor) and t.ndim == 1 and not t.is_floating_point(), (
            f"tuple entries must be 1-D integer tensors ({where})"
        )
    n, n_ref = labels.shape[0], ref_labels.shape[0]
    if len(out) == 4:
        a1, p, a2, neg = out
        assert a1.shape == p.shape and a2.shape == neg.shape, (
            f"pair tuples: a1/p and a2/n must have equal lengths ({where})"
        )
        anchors, refs = (a1, a2), (p, neg)
        assert bool((labels[a1] == ref_labels[p]).all()), f"mined positive pairs have different labels ({where})"
        assert bool((labels[a2] != ref_labels[neg]).all()), f"mined negative pairs share a label ({where})"
    else:
        a, p, neg = out
        assert a.shape == p.shape == neg.shape, f"triplet tuples: a, p, n must have equal lengths ({where})"
        anchors, refs = (a,), (p, neg)
        assert bool((labels[a] == ref_labels[p]).all()), f"mined triplets: anchor and positive labels differ ({where})"
        assert bool((labels[a] != ref_labels[neg]).all()), (
            f"mined triplets: anchor and negative share a label ({where})"
        )
    for t in anchors:
        assert t.numel() == 0 or (0 <= int(t.min()) and int(t.max()) < n), f"anchor index out of range ({where})"
    for t in refs:
        assert t.numel() == 0 or (0 <= int(t.min()) and int(t.max()) < n_ref), f"reference index out of range ({where})"


def check_is_pml_miner(make_miner: MinerFactory, spec: BatchSpec) -> None:
    """The miner is a ``BaseMiner`` subclass (so PML trainers and wrappers accept it)."""
    miner = _miner(make_miner)
    assert isinstance(miner, BaseMiner), (
        f"{type(miner).__name__} must subclass pytorch_metric_learning.miners.BaseMiner"
    )


def check_output(make_miner: MinerFactory, spec: BatchSpec) -> None:
    """Valid PML tuples (lengths, index ranges, label consistency) for several batches."""
    for num_samples in (2, 8, 32):
        for layout in ("one_class", "m_per_class", "many_classes"):
            emb, labels = make_batch(spec, num_samples, layout=layout, seed=num_samples, requires_grad=False)
            _assert_valid_tuple(_miner(make_miner)(emb, labels), labels, labels, f"{num_samples} samples, {layout}")


def check_ref_emb(make_miner: MinerFactory, spec: BatchSpec) -> None:
    """With ``ref_emb``/``ref_labels`` the tuple indexes the reference set (or ref is rejected clearly)."""
    emb, labels = make_batch(spec, 8, seed=4, requires_grad=False)
    ref, ref_labels = make_batch(spec, 12, seed=5, requires_grad=False)
    out = call_or_rejected(lambda: _miner(make_miner)(emb, labels, ref, ref_labels), "ref_emb")
    if out is not None:
        _assert_valid_tuple(out, labels, ref_labels, "with ref_emb")


def check_dtypes(make_miner: MinerFactory, spec: BatchSpec) -> None:
    """float16 / bfloat16 / float32 / float64 embeddings give valid tuples."""
    for dtype in ALL_DTYPES:
        emb, labels = make_batch(spec, 8, dtype=dtype, seed=1, requires_grad=False)
        try:
            out = _miner(make_miner)(emb, labels)
        except (RuntimeError, NotImplementedError) as exc:
            if dtype in (torch.float16, torch.bfloat16) and half_precision_unsupported(exc):
                continue
            raise AssertionError(f"{dtype} embeddings failed: {exc}") from exc
        _assert_valid_tuple(out, labels, labels, f"dtype {dtype}")


def check_with_pml_loss(make_miner: MinerFactory, spec: BatchSpec) -> None:
    """PML's ContrastiveLoss / TripletMarginLoss consume the tuple: finite value and gradients."""
    emb, labels = make_batch(spec, 8, seed=2)
    out = _miner(make_miner)(emb, labels)
    loss = ContrastiveLoss() if len(out) == 4 else TripletMarginLoss()
    value = loss(emb, labels, out)
    assert torch.isfinite(value), "non-finite PML loss on the mined tuple"
    value.backward()
    assert torch.isfinite(emb.grad).all(), "non-finite gradient through the mined tuple"


def check_trainer_step(make_miner: MinerFactory, spec: BatchSpec) -> None:
    """One PML MetricLossOnly step with the miner as ``tuple_miner``."""
    emb, labels = make_batch(spec, 8, seed=3, requires_grad=False)
    kind = len(_miner(make_miner)(emb, labels))
    run_trainer_step(ContrastiveLoss() if kind == 4 else TripletMarginLoss(), spec, miner=_miner(make_miner))


def check_bad_input(make_miner: MinerFactory, spec: BatchSpec) -> None:
    """Mismatched lengths and 2-D labels raise ValueError/TypeError."""
    miner = _miner(make_miner)
    emb, labels = make_batch(spec, 8, seed=10, requires_grad=False)
    assert_clear_error(lambda: miner(emb, labels[:-1]), "labels shorter than embeddings")
    assert_clear_error(lambda: miner(emb, labels[:, None]), "2-D labels")


def check_property_based(make_miner: MinerFactory, spec: BatchSpec, max_examples: int = 20) -> None:
    """hypothesis: random batches, layouts, scales and dtypes give valid tuples."""
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
        num_samples=st.integers(min_value=1, max_value=24),
        layout=st.sampled_from(["one_class", "m_per_class", "many_classes", "random"]),
        dtype=st.sampled_from(ALL_DTYPES),
        log_scale=st.floats(min_value=-2.0, max_value=2.0),
        seed=st.integers(min_value=0, max_value=2**16),
    )
    def run(num_samples, layout, dtype, log_scale, seed):
        emb, labels = make_batch(
            spec, num_samples, layout=layout, dtype=dtype, scale=10.0**log_scale, seed=seed, requires_grad=False
        )
        try:
            out = _miner(make_miner)(emb, labels)
        except (RuntimeError, NotImplementedError) as exc:
            if dtype in (torch.float16, torch.bfloat16) and half_precision_unsupported(exc):
                return
            raise
        _assert_valid_tuple(out, labels, labels, f"{num_samples} samples, {layout}, {dtype}")

    run()


MINER_CHECKS = (
    check_is_pml_miner,
    check_output,
    check_ref_emb,
    check_dtypes,
    check_with_pml_loss,
    check_trainer_step,
    check_bad_input,
    check_property_based,
)
