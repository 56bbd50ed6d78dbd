"""Hyper-parameter search spaces that losses declare for ``pml-plugins compare --tune``.

A loss declares its space when it registers, in the field ``search_space`` of its
:class:`~pml_plugins.LossSpec` (the keyword ``search_space=`` of plugin API 1.0): a dict from
a constructor argument (or ``loss_lr``, the learning rate of the loss's own parameters) to

- ``(low, high)``: a float, uniform in [low, high];
- ``(low, high, "log")``: a float, log-uniform (scales, temperatures, learning rates);
- ``(low, high, "int")`` / ``(low, high, "int", "log")``: an integer;
- ``{"choices": [a, b, ...]}``: one of the listed literals;
- a :class:`SearchParam`.

For example::

    register(MyLoss, name="my_loss", spec=pml_plugins.LossSpec(
        loss_optimizer=True,
        search_space={"margin": (0.0, 0.5), "scale": (4.0, 64.0, "log"),
                      "proxies_per_class": (1, 8, "int"), "loss_lr": (1e-4, 1e-1, "log")}))

``pml-plugins info NAME`` shows the space; :func:`suggest` draws one setting from an Optuna trial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

#: the LossSpec field (and API 1.0 metadata key) holding a loss's space
METADATA_KEY = "search_space"
#: a space key that is not a constructor argument: the loss parameters' learning rate
LOSS_LR = "loss_lr"


@dataclass(frozen=True)
class SearchParam:
    """One tuned hyper-parameter: a float or int range (optionally log-scaled) or a list of choices."""

    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    integer: bool = False
    choices: Optional[tuple] = None

    def __post_init__(self) -> None:
        if self.choices is not None:
            if not self.choices:
                raise ValueError("choices must list at least one value")
            return
        for name in ("low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not self.low < self.high:
            raise ValueError(f"low must be < high, got low={self.low!r}, high={self.high!r}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scaled range needs low > 0, got low={self.low!r}")
        if self.integer and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"an integer range needs integer bounds, got [{self.low!r}, {self.high!r}]")

    def describe(self) -> str:
        """``"[0.01, 1] log"``, ``"{1..8} int"``, ``"one of a, b"``."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.integer:
            return f"{{{int(self.low)}..{int(self.high)}}} int" + (" log" if self.log else "")
        return f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


def parse_param(name: str, value: Any) -> SearchParam:
    """One declared entry -> :class:`SearchParam`; a bad declaration raises ValueError naming it."""
    if isinstance(value, SearchParam):
        return value
    try:
        if isinstance(value, Mapping):
            if "choices" in value:
                extra = set(value) - {"choices"}
                if extra:
                    raise ValueError(f"a choices entry takes only 'choices', got also {sorted(extra)}")
                return SearchParam(choices=tuple(value["choices"]))
            extra = set(value) - {"low", "high", "log", "int"}
            if extra:
                raise ValueError(f"unknown keys {sorted(extra)}; use low, high, log, int or choices")
            return SearchParam(
                low=value.get("low"),
                high=value.get("high"),
                log=bool(value.get("log", False)),
                integer=bool(value.get("int", False)),
            )
        if isinstance(value, (tuple, list)) and len(value) >= 2:
            flags = [str(f).lower() for f in value[2:]]
            bad = [f for f in flags if f not in ("log", "int")]
            if bad:
                raise ValueError(f"unknown flags {bad}; use 'log' and/or 'int'")
            return SearchParam(low=value[0], high=value[1], log="log" in flags, integer="int" in flags)
    except ValueError as exc:
        raise ValueError(f"search space entry {name!r}: {exc}") from None
    raise ValueError(
        f"search space entry {name!r}: expected (low, high[, 'log'][, 'int']), "
        f"{{'choices': [...]}} or a SearchParam, got {value!r}"
    )


def parse_search_space(space: Optional[Mapping[str, Any]]) -> dict[str, SearchParam]:
    """A declared space -> ``{name: SearchParam}`` (empty for None)."""
    if space is None:
        return {}
    if not isinstance(space, Mapping):
        raise ValueError(f"{METADATA_KEY} must be a dict of name -> range, got {type(space).__name__}")
    out = {}
    for name, value in space.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"search space names must be argument names, got {name!r}")
        out[name] = parse_param(name, value)
    return out


def entry_search_space(entry: Any) -> dict[str, SearchParam]:
    """The parsed space a registry entry declares (``entry.spec.search_space``)."""
    return parse_search_space(getattr(getattr(entry, "spec", None), METADATA_KEY, None))


def suggest(trial: Any, space: Mapping[str, SearchParam]) -> dict[str, Any]:
    """Draw one setting from an Optuna ``trial`` (``suggest_float`` / ``suggest_int`` /
    ``suggest_categorical``), in the space's order."""
    out: dict[str, Any] = {}
    for name, p in space.items():
        if p.choices is not None:
            out[name] = trial.suggest_categorical(name, list(p.choices))
        elif p.integer:
            out[name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
        else:
            out[name] = trial.suggest_float(name, float(p.low), float(p.high), log=p.log)
    return out


def describe_space(space: Mapping[str, SearchParam]) -> str:
    """``"margin [0, 0.5]; loss_lr [0.0001, 0.1] log"``; ``"none declared"`` when empty."""
    return "; ".join(f"{name} {p.describe()}" for name, p in space.items()) or "none declared"
