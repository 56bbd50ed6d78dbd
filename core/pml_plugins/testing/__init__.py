"""The conformance kit: run it in a plugin's own tests so its losses behave like PML built-ins.

Plain functions::

    from pml_plugins.testing import check_loss
    check_loss(lambda: MyLoss(num_classes=10, embedding_size=8), embedding_size=8, num_classes=10)

or one pytest case per check, in the spirit of scikit-learn's ``parametrize_with_checks``::

    from pml_plugins.testing import parametrize_with_checks

    @parametrize_with_checks([lambda: MyLoss(num_classes=10, embedding_size=8)],
                             embedding_size=8, num_classes=10)
    def test_conformance(check):
        check()

Both raise ``AssertionError`` naming the failed check. Requires ``hypothesis`` and ``pytest``
(the ``pml-plugins[testing]`` extra).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from .batches import BatchSpec, make_batch, make_labels
from .loss_checks import LOSS_CHECKS
from .miner_checks import MINER_CHECKS

__all__ = [
    "check_loss",
    "check_miner",
    "parametrize_with_checks",
    "loss_checks",
    "miner_checks",
    "LOSS_CHECKS",
    "MINER_CHECKS",
    "BatchSpec",
    "make_batch",
    "make_labels",
]


class _Check:
    """One check bound to one factory: a zero-argument callable with a readable id."""

    def __init__(
        self, func: Callable, factory: Callable[[], Any], spec: BatchSpec, kwargs: Mapping[str, Any], label: str
    ):
        self.func, self.factory, self.spec, self.kwargs, self.label = func, factory, spec, dict(kwargs), label
        self.name = func.__name__
        functools.update_wrapper(self, func)

    def __call__(self) -> None:
        try:
            self.func(self.factory, self.spec, **self.kwargs)
        except AssertionError as exc:
            raise AssertionError(f"{self.name} failed for {self.label}: {exc}") from exc
        except Exception as exc:  # an unexpected crash is a failure of the check too
            raise AssertionError(f"{self.name} failed for {self.label}: {type(exc).__name__}: {exc}") from exc

    def __repr__(self) -> str:
        return f"{self.label}-{self.name}"


def _label(factory: Callable[[], Any]) -> str:
    try:
        return type(factory()).__name__
    except Exception:  # broad on purpose: the factory's own failure surfaces in the checks
        return getattr(factory, "__name__", "factory")


def _bind(
    checks: Sequence[Callable],
    factory: Callable[[], Any],
    spec: BatchSpec,
    skip: Optional[Mapping[str, str]],
    extra: Mapping[str, Mapping[str, Any]],
) -> list[_Check]:
    skip = dict(skip or {})
    known = {c.__name__ for c in checks}
    unknown = set(skip) - known
    if unknown:
        raise ValueError(f"skip names unknown checks {sorted(unknown)}; checks are {sorted(known)}")
    for name, reason in skip.items():
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError(f"skip[{name!r}] must give the reason the check does not apply")
    label = _label(factory)
    bound = []
    for check in checks:
        if check.__name__ in skip:
            continue
        params = inspect.signature(check).parameters
        kwargs = {k: v for k, v in extra.get(check.__name__, {}).items() if k in params}
        bound.append(_Check(check, factory, spec, kwargs, label))
    return bound


def loss_checks(
    make_loss: Callable[[], Any],
    *,
    embedding_size: int,
    num_classes: Optional[int] = None,
    num_views: int = 1,
    samples_per_class: Optional[int] = None,
    distances: Iterable = (),
    skip: Optional[Mapping[str, str]] = None,
    max_examples: int = 20,
) -> list[_Check]:
    """The loss checks bound to ``make_loss``, each a zero-argument callable."""
    spec = BatchSpec(embedding_size, num_classes, num_views, samples_per_class)
    extra = {"check_distances": {"distances": tuple(distances)}, "check_property_based": {"max_examples": max_examples}}
    return _bind(LOSS_CHECKS, make_loss, spec, skip, extra)


def miner_checks(
    make_miner: Callable[[], Any],
    *,
    embedding_size: int,
    skip: Optional[Mapping[str, str]] = None,
    max_examples: int = 20,
) -> list[_Check]:
    """The miner checks bound to ``make_miner``, each a zero-argument callable."""
    spec = BatchSpec(embedding_size, None, 1, None)
    return _bind(MINER_CHECKS, make_miner, spec, skip, {"check_property_based": {"max_examples": max_examples}})


def check_loss(
    make_loss: Callable[[], Any],
    *,
    embedding_size: int,
    num_classes: Optional[int] = None,
    num_views: int = 1,
    samples_per_class: Optional[int] = None,
    distances: Iterable = (),
    skip: Optional[Mapping[str, str]] = None,
    max_examples: int = 20,
) -> None:
    """Run every loss check on fresh instances from ``make_loss``.

    Args:
        make_loss: zero-argument callable returning a fresh loss.
        embedding_size: columns of the embeddings the kit generates.
        num_classes: the loss's class count (labels stay in ``[0, num_classes)``); None for
            losses without class parameters (labels then come from 10 classes).
        num_views: rows per sample (the A views of a sample consecutive, equal labels).
        samples_per_class: build batches m-per-class with this m (losses that need it).
        distances: extra PML distances the loss declares compatible.
        skip: ``{"check_name": "reason"}`` for checks that do not apply.
        max_examples: hypothesis examples for the property-based check.
    Raises:
        AssertionError naming the first failed check.
    """
    for check in loss_checks(
        make_loss,
        embedding_size=embedding_size,
        num_classes=num_classes,
        num_views=num_views,
        samples_per_class=samples_per_class,
        distances=distances,
        skip=skip,
        max_examples=max_examples,
    ):
        check()


def check_miner(
    make_miner: Callable[[], Any],
    *,
    embedding_size: int,
    skip: Optional[Mapping[str, str]] = None,
    max_examples: int = 20,
) -> None:
    """Run every miner check on fresh instances from ``make_miner``; raises AssertionError naming the check."""
    for check in miner_checks(make_miner, embedding_size=embedding_size, skip=skip, max_examples=max_examples):
        check()


def parametrize_with_checks(factories: Sequence[Callable[[], Any]], *, kind: Optional[str] = None, **options: Any):
    """A ``pytest.mark.parametrize("check", ...)`` with one case per (factory, check).

    ``factories`` are zero-argument callables; ``kind`` is ``"loss"`` or ``"miner"`` (detected
    from the first instance when omitted); ``options`` go to :func:`loss_checks` /
    :func:`miner_checks`. The test function takes one argument, ``check``, and calls it.
    """
    import pytest
    from pytorch_metric_learning.miners import BaseMiner

    cases: list[_Check] = []
    for factory in factories:
        this_kind = kind or ("miner" if isinstance(factory(), BaseMiner) else "loss")
        bind = miner_checks if this_kind == "miner" else loss_checks
        cases.extend(bind(factory, **options))
    return pytest.mark.parametrize("check", cases, ids=[repr(c) for c in cases])
