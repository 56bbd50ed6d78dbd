"""Losses and miners from a registry name and keyword arguments, as the main job and its config files give them.

PML objects given as text (``distance="CosineSimilarity()"``) become instances of PML's classes;
unknown arguments are refused with the closest accepted name.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import inspect
from typing import Any, Optional

import torch

from .. import registry as reg


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


_PML_OBJECT_ARGS = {"distance": "distances", "reducer": "reducers", "weight_regularizer": "regularizers",
                    "embedding_regularizer": "regularizers"}


def _resolve_pml_objects(args: dict) -> dict:
    """``distance="CosineSimilarity()"`` -> an instance of PML's class (literal keyword arguments only)."""
    out = dict(args)
    for key, module_name in _PML_OBJECT_ARGS.items():
        value = out.get(key)
        if not isinstance(value, str):
            continue
        module = importlib.import_module(f"pytorch_metric_learning.{module_name}")
        try:
            expr = ast.parse(value.strip(), mode="eval").body
        except SyntaxError:
            raise ValueError(f"{key}={value!r}: expected a PML class name such as 'CosineSimilarity()'") from None
        call = expr if isinstance(expr, ast.Call) else None
        name_node = call.func if call else expr
        if not isinstance(name_node, ast.Name) or (call and call.args):
            raise ValueError(f"{key}={value!r}: expected ClassName or ClassName(key=value, ...)")
        cls = getattr(module, name_node.id, None)
        if not inspect.isclass(cls):
            options = [n for n in dir(module) if inspect.isclass(getattr(module, n))]
            close = difflib.get_close_matches(name_node.id, options, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{key}={value!r}: pytorch_metric_learning.{module_name} has no class {name_node.id!r}.{hint}")
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in (call.keywords if call else [])}
        out[key] = cls(**kwargs)
    return out


def build_loss(name: str, *, num_classes: int, embedding_size: int, loss_args: Optional[dict] = None,
               loss_options: Optional[dict] = None) -> tuple[Any, reg.Entry, dict, dict]:
    """Create the loss ``name``; returns ``(loss, entry, constructor_args, training_setup_options)``.

    ``num_classes`` / ``embedding_size`` are passed only when the constructor (or the PML base
    class it forwards ``**kwargs`` to) takes them. For a loss with a ``training_setup``, arguments
    the constructor does not take become its training options.
    """
    entry = reg.get_entry("loss", name)
    cls = entry.obj
    accepted, open_ended = constructor_parameters(cls)
    kwargs = dict(loss_args or {})
    options = dict(loss_options or {})
    has_setup = callable(entry.metadata.get("training_setup"))
    unknown = [k for k in kwargs if k not in accepted]
    if unknown and has_setup:
        options.update({k: kwargs.pop(k) for k in unknown})
    elif unknown and not open_ended:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, accepted, n=1, cutoff=0.6)
            hints.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
        raise TypeError(f"loss {entry.name!r} ({cls.__name__}) takes no argument {', '.join(hints)}; "
                        f"it takes: {', '.join(accepted) or 'nothing'}")
    if "num_classes" in accepted and "num_classes" not in kwargs:
        kwargs["num_classes"] = int(num_classes)
    if "embedding_size" in accepted and "embedding_size" not in kwargs:
        kwargs["embedding_size"] = int(embedding_size)
    shown = {k: (v if isinstance(v, (int, float, str, bool, list, tuple, dict, type(None))) else repr(v))
             for k, v in kwargs.items()}
    try:
        loss = reg.create_loss(entry.qualified_name, **_resolve_pml_objects(kwargs))
    except (ValueError, AssertionError) as exc:
        raise ValueError(f"loss {entry.name!r} rejected its arguments {shown}: {exc}") from None
    return loss, entry, shown, options


def build_miner(name: str, miner_args: Optional[dict] = None) -> tuple[Any, reg.Entry]:
    entry = reg.get_entry("miner", name)
    accepted, open_ended = constructor_parameters(entry.obj)
    args = dict(miner_args or {})
    unknown = [k for k in args if k not in accepted]
    if unknown and not open_ended:
        raise TypeError(f"miner {entry.name!r} ({entry.obj.__name__}) takes no argument {unknown}; "
                        f"it takes: {', '.join(accepted) or 'nothing'}")
    try:
        return reg.create_miner(entry.qualified_name, **_resolve_pml_objects(args)), entry
    except (ValueError, AssertionError) as exc:
        raise ValueError(f"miner {entry.name!r} rejected its arguments {args}: {exc}") from None

