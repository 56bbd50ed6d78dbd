"""``pml-plugins info NAME``: class, signature with defaults, summary, paper, training needs."""

from __future__ import annotations

import argparse
import inspect

from .. import registry as reg
from ..specs import LossSpec, MetricSpec


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a loss, miner or metric: signature, summary, paper, needs")
    p.add_argument("name", help="short name, alias or plugin:name")
    p.add_argument("--kind", choices=["loss", "miner", "metric"], help="look only in this kind")
    p.set_defaults(func=run)


def _print_distributed(entry: reg.Entry) -> None:
    """The loss's DDP semantics (``LossSpec.distributed``; see docs/distributed-training.md)."""
    from ..distributed_losses import DISTRIBUTED_SEMANTICS

    spec = entry.spec
    if spec.distributed is None:
        print("  distributed not declared (runs under --distributed; gradient equivalence not verified)")
    else:
        print(f"  distributed {spec.distributed}: {DISTRIBUTED_SEMANTICS.get(spec.distributed, 'unknown value')}")
    if spec.distributed_note:
        print(f"             {spec.distributed_note}")
    efficient = "supported" if spec.distributed_efficient else "not supported"
    print(f"             PML efficient mode (--distributed-efficient): {efficient}")


def _print_loss_needs(spec: LossSpec) -> None:
    parts = []
    if spec.sampler:
        sampler = spec.sampler.replace("_", "-")
        # "an m-per-class sampler": a vowel, or a letter whose name starts with one, then "-"
        vowel_sound = sampler[:1] in "aeiou" or (sampler[1:2] == "-" and sampler[0] in "fhlmnrsx")
        m = f", m={spec.samples_per_class}" if spec.samples_per_class else ""
        parts.append(f"{'an' if vowel_sound else 'a'} {sampler} sampler{m}")
    if spec.multi_view:
        parts.append("multi-view batches")
    if spec.database_refresh:
        parts.append("a database refresh during training")
    if spec.loss_optimizer:
        lr = f" (lr {spec.loss_lr})" if spec.loss_lr else ""
        parts.append(f"an optimizer for its own parameters{lr}")
    print(f"  needs      {'; '.join(parts) if parts else 'nothing beyond embeddings and labels'}")
    if spec.loss_lr_note:
        print(f"  loss lr    {spec.loss_lr_note}")
    print(f"  retrieval  {spec.retrieval_distance}")
    if spec.training_setup is not None:
        print(
            f"  training   {getattr(spec.training_setup, '__module__', '?')}."
            f"{getattr(spec.training_setup, '__qualname__', spec.training_setup)!s} sets up the trainer"
        )
    if not spec.supports_ref_emb:
        print("  ref_emb    not supported (CrossBatchMemory / SelfSupervisedLoss refuse it)")
    if spec.pretrain_epochs:
        print(f"  pretrain   {spec.pretrain_epochs} epochs of classification pre-training first (--pretrain-epochs)")
    if spec.needs_class_distances:
        model = f" with {spec.class_text_model}" if spec.class_text_model else ""
        print(f"  distances  class distances from one text per class{model} (--class-texts FILE)")


def _print_search_space(entry: reg.Entry) -> None:
    """What ``compare --tune`` searches for this loss (see pml_plugins.search_space)."""
    from ..search_space import entry_search_space

    space = entry_search_space(entry)
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
        spec = entry.spec
        for key, value in (
            ("summary", spec.summary),
            ("paper", spec.paper),
            ("tags", ", ".join(spec.tags)),
            ("origin", getattr(spec, "origin", None)),
        ):
            if value:
                print(f"  {key:10s} {value}")
        if isinstance(spec, LossSpec):
            _print_loss_needs(spec)
            _print_search_space(entry)
            _print_distributed(entry)
        elif isinstance(spec, MetricSpec):
            k = spec.k if spec.k is not None else "PML's k"
            print(f"  needs      kNN: {spec.requires_knn} (k: {k}); clustering: {spec.requires_clustering}")
    return 0
