"""Which keyword arguments a registered class takes: the one rule set for building from a name.

PML's losses forward ``**kwargs`` to their base classes (``reducer``, ``distance``,
``weight_regularizer``, ...), so the arguments a loss takes are those of every ``__init__`` up
its MRO until one stops forwarding. :func:`resolve_arguments` applies the rules once, for
:meth:`pml_plugins.registry.Registry.create` and through it for the main job and the conformance
kit: an unknown argument is a ``TypeError`` that names the closest one and shows the signature;
a missing required one likewise. A leaf module: it imports nothing from the package.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Mapping, Optional

import torch

__all__ = ["signature_parameters", "constructor_parameters", "describe_signature", "resolve_arguments"]


def signature_parameters(obj: Any) -> Mapping[str, inspect.Parameter]:
    """``inspect.signature(obj).parameters``, or ``{}`` when there is no signature."""
    try:
        return inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return {}


def constructor_parameters(cls: type) -> tuple[list[str], bool]:
    """Keyword arguments a class accepts, following ``**kwargs`` up the MRO as PML forwards them.

    Returns ``(names, open_ended)``; ``open_ended`` when the chain ends in an unknown ``**kwargs``.
    """
    names: list[str] = []
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object or klass is torch.nn.Module:
            return names, False
        try:
            params = inspect.signature(init).parameters
        except (TypeError, ValueError):
            return names, True
        forwards = False
        for n, p in params.items():
            if n == "self":
                continue
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                forwards = True
            elif n not in names:
                names.append(n)
        if not forwards:
            return names, False
    return names, True


def describe_signature(cls: type) -> str:
    """The constructor signature, including the PML base-class keywords it forwards."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return "(...)"
    text = str(sig)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        extra = []
        for base in inspect.getmro(cls)[1:]:
            init = base.__dict__.get("__init__")
            if init is None:
                continue
            for n, p in signature_parameters(init).items():
                if (
                    n != "self"
                    and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                    and n not in sig.parameters
                    and n not in extra
                ):
                    extra.append(n)
        if extra:
            text += f"  [forwarded to the PML base class: {', '.join(extra)}]"
    return text


def resolve_arguments(
    kind: str,
    name: str,
    cls: type,
    arguments: Optional[Mapping[str, Any]] = None,
    *,
    offered: Optional[Mapping[str, Any]] = None,
    keep_unknown: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``arguments`` into ``(constructor keyword arguments, the rest)`` or raise ``TypeError``.

    Args:
        kind, name: how the error messages name the class (``loss 'proxy_anchor'``).
        cls: the class to build.
        arguments: the caller's keyword arguments.
        offered: values passed only when the constructor takes them and ``arguments`` does not
            give them (e.g. ``num_classes`` / ``embedding_size`` known from the data).
        keep_unknown: return arguments the constructor does not take as the rest (a loss with a
            ``training_setup`` takes them as options) instead of raising.
    """
    kwargs = dict(arguments or {})
    accepted, open_ended = constructor_parameters(cls)
    rest: dict[str, Any] = {}
    unknown = [] if open_ended else [k for k in kwargs if k not in accepted]
    if unknown and keep_unknown:
        rest = {k: kwargs.pop(k) for k in unknown}
    elif unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, accepted, n=1, cutoff=0.6)
            hints.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
        raise TypeError(
            f"{kind} {name!r} ({cls.__name__}) takes no argument {', '.join(hints)}; it takes: "
            f"{', '.join(accepted) or 'nothing'}; signature: {cls.__name__}{describe_signature(cls)}"
        )
    for key, value in (offered or {}).items():
        if key not in kwargs and key in accepted:
            kwargs[key] = value
    params = signature_parameters(cls)
    missing = [
        n
        for n, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and n not in kwargs
    ]
    if missing:
        raise TypeError(
            f"{cls.__name__} needs argument(s) {missing}; signature: {cls.__name__}{describe_signature(cls)}"
        )
    return kwargs, rest
