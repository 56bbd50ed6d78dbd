"""Input validation shared by plugin losses: clear errors instead of NaNs or deep stack traces.

Two kinds of helpers, public API for plugins (a leaf module: it imports nothing from the package):

* :func:`check_embeddings_and_labels` for a loss's ``forward`` inputs;
* scalar checks for constructor arguments -- :func:`check_int`, :func:`check_positive_int`,
  :func:`check_non_negative_int`, :func:`check_float`, :func:`check_positive_float`,
  :func:`check_non_negative_float`, :func:`check_finite_float`, :func:`check_probability`,
  :func:`check_choice`. Each takes the argument's name first and returns the value converted
  (``int`` / ``float``), so a constructor reads ``self.k = check_positive_int("k", k)``. A value of
  the wrong type (``True`` is not a number here) raises :class:`ArgumentTypeError`, one out of
  range ``ValueError``; both messages say ``"<name> must be <what>, got <value>"``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Optional

import torch

__all__ = [
    "ArgumentTypeError",
    "check_embeddings_and_labels",
    "check_int",
    "check_positive_int",
    "check_non_negative_int",
    "check_float",
    "check_positive_float",
    "check_non_negative_float",
    "check_finite_float",
    "check_probability",
    "check_choice",
]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (``num_classes=2.5``, ``margin="0.1"``).

    A ``TypeError``, and also a ``ValueError``: the plugins' own checks, which these helpers
    replace, raised one or the other for a wrong type, and callers catch either.
    """


def _what(kind: str, minimum: Any, maximum: Any, min_inclusive: bool, max_inclusive: bool) -> str:
    if minimum is not None and maximum is not None:
        return f"{kind} in {'[' if min_inclusive else '('}{minimum}, {maximum}{']' if max_inclusive else ')'}"
    if minimum is not None:
        return f"{kind} {'>=' if min_inclusive else '>'} {minimum}"
    if maximum is not None:
        return f"{kind} {'<=' if max_inclusive else '<'} {maximum}"
    return kind


def _fail(error: type, name: str, what: str, value: Any, allow_none: bool, note: Optional[str]) -> Exception:
    extra = f" ({note})" if note else ""
    return error(f"{name} must be {what}{' or None' if allow_none else ''}{extra}, got {value!r}")


def check_int(
    name: str,
    value: Any,
    *,
    minimum: Optional[int] = None,
    maximum: Optional[int] = None,
    allow_none: bool = False,
    note: Optional[str] = None,
) -> Optional[int]:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (either bound optional); ``None`` passes with ``allow_none``.

    Args:
        name: the argument's name, as the error message shows it.
        note: a few words the message adds in parentheses (e.g. ``"k of eq. 8"``).
    """
    if value is None and allow_none:
        return None
    what = (
        "a positive integer" if minimum == 1 and maximum is None else _what("an integer", minimum, maximum, True, True)
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(ArgumentTypeError, name, what, value, allow_none, note)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _fail(ValueError, name, what, value, allow_none, note)
    return int(value)


def check_positive_int(name: str, value: Any, *, allow_none: bool = False, note: Optional[str] = None) -> Optional[int]:
    """``value`` as an ``int >= 1`` ("<name> must be a positive integer, got ...")."""
    return check_int(name, value, minimum=1, allow_none=allow_none, note=note)


def check_non_negative_int(
    name: str, value: Any, *, allow_none: bool = False, note: Optional[str] = None
) -> Optional[int]:
    """``value`` as an ``int >= 0``."""
    return check_int(name, value, minimum=0, allow_none=allow_none, note=note)


def check_float(
    name: str,
    value: Any,
    *,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
    allow_none: bool = False,
    note: Optional[str] = None,
) -> Optional[float]:
    """``value`` as a finite ``float`` within the bounds given (``min_inclusive=False``: strictly above ``minimum``).

    Any real number is accepted (int, float, numpy scalars); NaN and infinities are refused.
    """
    if value is None and allow_none:
        return None
    what = _what("a finite number", minimum, maximum, min_inclusive, max_inclusive)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(ArgumentTypeError, name, what, value, allow_none, note)
    x = float(value)
    if (
        not math.isfinite(x)
        or (minimum is not None and (x < minimum if min_inclusive else x <= minimum))
        or (maximum is not None and (x > maximum if max_inclusive else x >= maximum))
    ):
        raise _fail(ValueError, name, what, value, allow_none, note)
    return x


def check_positive_float(
    name: str, value: Any, *, allow_none: bool = False, note: Optional[str] = None
) -> Optional[float]:
    """``value`` as a finite ``float > 0``."""
    return check_float(name, value, minimum=0, min_inclusive=False, allow_none=allow_none, note=note)


def check_non_negative_float(
    name: str, value: Any, *, allow_none: bool = False, note: Optional[str] = None
) -> Optional[float]:
    """``value`` as a finite ``float >= 0`` (weights of loss terms)."""
    return check_float(name, value, minimum=0, allow_none=allow_none, note=note)


def check_finite_float(
    name: str, value: Any, *, allow_none: bool = False, note: Optional[str] = None
) -> Optional[float]:
    """``value`` as a finite ``float`` (any sign)."""
    return check_float(name, value, allow_none=allow_none, note=note)


def check_probability(
    name: str, value: Any, *, allow_none: bool = False, note: Optional[str] = None
) -> Optional[float]:
    """``value`` as a ``float`` in ``[0, 1]``."""
    return check_float(name, value, minimum=0, maximum=1, allow_none=allow_none, note=note)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def check_embeddings_and_labels(
    embeddings: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    num_classes: int | None = None,
    embedding_size: int | None = None,
    labels_required: bool = True,
    check_finite: bool = True,
    embeddings_name: str = "embeddings",
    labels_name: str = "labels",
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument when inputs are malformed.

    Checks: ``embeddings`` is a floating 2-D tensor ``(batch_size, embedding_size)`` (with
    the expected ``embedding_size`` when given) and finite; ``labels`` is a 1-D integer
    tensor of the same length with values in ``[0, num_classes)`` when ``num_classes`` is given.
    """
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(
            f"{embeddings_name} must be a torch.Tensor of shape (batch_size, embedding_size), "
            f"got {type(embeddings).__name__}"
        )
    if embeddings.ndim != 2:
        raise ValueError(
            f"{embeddings_name} must be 2-D (batch_size, embedding_size), got shape {tuple(embeddings.shape)}"
        )
    if not embeddings.is_floating_point():
        raise TypeError(f"{embeddings_name} must be a floating-point tensor, got dtype {embeddings.dtype}")
    if embedding_size is not None and embeddings.shape[1] != embedding_size:
        raise ValueError(
            f"{embeddings_name} must have embedding_size={embedding_size} columns, got shape {tuple(embeddings.shape)}"
        )
    if check_finite and embeddings.numel() and not bool(torch.isfinite(embeddings).all()):
        bad = torch.nonzero(~torch.isfinite(embeddings).all(dim=1)).flatten()[:5].tolist()
        raise ValueError(f"{embeddings_name} contain NaN or Inf values (rows {bad}{', ...' if len(bad) == 5 else ''})")
    if labels is None:
        if labels_required:
            raise ValueError(f"{labels_name} are required for this loss: a 1-D integer tensor of shape (batch_size,)")
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{labels_name} must be a torch.Tensor of shape (batch_size,), got {type(labels).__name__}")
    if labels.ndim != 1:
        raise ValueError(f"{labels_name} must be 1-D (batch_size,), got shape {tuple(labels.shape)}")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"{labels_name} has {labels.shape[0]} entries but {embeddings_name} has {embeddings.shape[0]} rows; "
            "they must match"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{labels_name} must be an integer tensor (class indices), got dtype {labels.dtype}")
    if num_classes is not None and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{labels_name} must be in [0, num_classes={num_classes}), got values in [{lo}, {hi}]")
