"""``pml-plugins info NAME``: class, signature with defaults, summary, paper, training needs."""
from __future__ import annotations

import argparse
import inspect

from .. import registry as reg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a loss, miner or metric: signature, summary, paper, needs")
    p.add_argument("name", help="short name, alias or plugin:name")
    p.add_argument("--kind", choices=["loss", "miner", "metric"], help="look only in this kind")
    p.set_defaults(func=run)


_DISTRIBUTED_KEYS = ("distributed", "distributed_note", "distributed_efficient")


def _print_distributed(entry: reg.Entry) -> None:
    """The loss's DDP semantics (``distributed`` metadata; see docs/distributed-training.md)."""
    from ..distributed import DISTRIBUTED_SEMANTICS

    value = entry.metadata.get("distributed")
    if value is None:
        print("  distributed not declared (runs under --distributed; gradient equivalence not verified)")
    else:
        print(f"  distributed {value}: {DISTRIBUTED_SEMANTICS.get(value, 'unknown value')}")
    if entry.metadata.get("distributed_note"):
        print(f"             {entry.metadata['distributed_note']}")
    efficient = "supported" if entry.metadata.get("distributed_efficient") else "not supported"
    print(f"             PML efficient mode (--distributed-efficient): {efficient}")


def _print_search_space(entry: reg.Entry) -> None:
    """What ``compare --tune`` searches for this loss (see pml_plugins.search_space)."""
    from ..search_space import entry_search_space

    try:
        space = entry_search_space(entry)
    except ValueError as exc:
        print(f"  tune       invalid search_space declaration: {exc}")
        return
    if not space:
        print("  tune       no search space declared (compare --tune trains it with its defaults)")
        return
    print(f"  tune       search space for compare --tune ({len(space)} parameter{'s' if len(space) != 1 else ''}):")
    for name, param in space.items():
        print(f"               {name:18s} {param.describe()}")


def run(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(reg.KINDS)
    found, last_error = [], None
    for kind in kinds:
        try:
            found.append(reg.get_entry(kind, args.name))
        except reg.UnknownNameError as exc:
            last_error = last_error or exc
    if not found:
        raise last_error  # type: ignore[misc]
    for entry in found:
        obj = entry.obj
        print(f"{entry.kind} {entry.name}  ({entry.qualified_name})")
        print(f"  object     {obj.__module__}.{obj.__qualname__}")
        if inspect.isclass(obj):
            print(f"  signature  {obj.__name__}{reg.describe_signature(obj)}")
        else:
            print(f"  signature  {obj.__name__}{inspect.signature(obj)}")
        print(f"  plugin     {entry.plugin} [{entry.distribution or 'in-process'} {entry.version or ''}]".rstrip())
        if entry.aliases:
            print(f"  aliases    {', '.join(entry.aliases)}")
        for key in ("summary", "paper", "tags"):
            if key in entry.metadata:
                value = entry.metadata[key]
                print(f"  {key:10s} {', '.join(value) if isinstance(value, (tuple, list)) else value}")
        if entry.kind == "loss":
            needs = entry.needs()
            parts = []
            if needs["sampler"]:
                sampler = needs["sampler"].replace("_", "-")
                # "an m-per-class sampler": a vowel, or a letter whose name starts with one, then "-"
                vowel_sound = sampler[:1] in "aeiou" or (sampler[1:2] == "-" and sampler[0] in "fhlmnrsx")
                parts.append(f"{'an' if vowel_sound else 'a'} {sampler} sampler")
            if needs["multi_view"]:
                parts.append("multi-view batches")
            if needs["database_refresh"]:
                parts.append("a database refresh during training")
            if needs["loss_optimizer"]:
                lr = f" (lr {needs['loss_lr']})" if needs["loss_lr"] else ""
                parts.append(f"an optimizer for its own parameters{lr}")
            print(f"  needs      {'; '.join(parts) if parts else 'nothing beyond embeddings and labels'}")
            print(f"  retrieval  {needs['retrieval_distance']}")
            _print_search_space(entry)
            _print_distributed(entry)
        shown = {"summary", "paper", "tags", "search_space", *_DISTRIBUTED_KEYS} | set(entry.needs())
        extra = {k: v for k, v in entry.metadata.items() if k not in shown}
        for k, v in extra.items():
            print(f"  {k:10s} {v}")
    return 0
