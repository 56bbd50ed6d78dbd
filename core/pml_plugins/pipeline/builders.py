"""Losses and miners from a registry name and keyword arguments, as the main job and its config files give them.

PML objects given as text (``distance="CosineSimilarity()"``) become instances of PML's classes;
then :meth:`pml_plugins.registry.Registry.build` -- the one place that checks arguments and builds
from a name -- makes the object (unknown arguments are refused with the closest accepted name).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
from typing import Any, Optional

from .. import registry as reg
from ..arguments import constructor_parameters

__all__ = ["build_loss", "build_miner", "constructor_parameters"]


_PML_OBJECT_ARGS = {
    "distance": "distances",
    "reducer": "reducers",
    "weight_regularizer": "regularizers",
    "embedding_regularizer": "regularizers",
}


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
            raise ValueError(
                f"{key}={value!r}: pytorch_metric_learning.{module_name} has no class {name_node.id!r}.{hint}"
            )
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in (call.keywords if call else [])}
        out[key] = cls(**kwargs)
    return out


def _shown(raw: dict, arguments: dict) -> dict:
    """The arguments as ``config.json`` records them: PML objects as the text the user gave, else JSON-friendly."""
    return {
        k: raw[k]
        if k in raw and isinstance(raw[k], str)
        else (v if isinstance(v, (int, float, str, bool, list, tuple, dict, type(None))) else repr(v))
        for k, v in arguments.items()
    }


def build_loss(
    name: str,
    *,
    num_classes: int,
    embedding_size: int,
    loss_args: Optional[dict] = None,
    loss_options: Optional[dict] = None,
) -> tuple[Any, reg.Entry, dict, dict]:
    """Create the loss ``name``; returns ``(loss, entry, constructor_args, training_setup_options)``.

    ``num_classes`` / ``embedding_size`` are passed only when the constructor (or the PML base
    class it forwards ``**kwargs`` to) takes them. For a loss with a ``training_setup``, arguments
    the constructor does not take become its training options.
    """
    entry = reg.get_entry("loss", name)
    raw = dict(loss_args or {})
    offered = {"num_classes": int(num_classes), "embedding_size": int(embedding_size)}
    try:
        built = reg.registry.build(
            "loss", entry.qualified_name, _resolve_pml_objects(raw), offered=offered, with_options=True
        )
    except (ValueError, AssertionError) as exc:
        accepted = constructor_parameters(entry.obj)[0]
        tried = {**{k: v for k, v in offered.items() if k in accepted}, **raw}
        raise ValueError(f"loss {entry.name!r} rejected its arguments {_shown(raw, tried)}: {exc}") from None
    options = {**(loss_options or {}), **built.options}
    return built.obj, entry, _shown(raw, built.arguments), options


def build_miner(name: str, miner_args: Optional[dict] = None) -> tuple[Any, reg.Entry]:
    """Create the miner ``name`` with ``miner_args`` (checked by the same rules as a loss's)."""
    entry = reg.get_entry("miner", name)
    args = dict(miner_args or {})
    try:
        return reg.registry.build("miner", entry.qualified_name, _resolve_pml_objects(args)).obj, entry
    except (ValueError, AssertionError) as exc:
        raise ValueError(f"miner {entry.name!r} rejected its arguments {args}: {exc}") from None
