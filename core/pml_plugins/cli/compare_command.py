"""``pml-plugins compare``: train several losses with the same budget and print one table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..progress import show_progress
from .train_command import add_common_arguments, add_distributed_arguments, file_values, flag_values

_EPILOG = """With no arguments this is the main job: every installed plugin loss plus PML's ProxyAnchor,
SoftTriple, NormalizedSoftmax and Contrastive on the bundled digits (train classes 0-4, test on
5-9), 3 seeds each, the epoch picked on 2 held-out training classes, against the untrained model
as the floor; mean ± 95% interval per metric, losses tied with the best marked.

examples:
  pml-plugins compare
  pml-plugins compare --dataset glyphs --seeds 5 --folds 4 --tune 20 --out runs/glyphs   # the full protocol
  pml-plugins compare --losses proxy_anchor,soft_triple --epochs 20 --out runs/cmp
  pml-plugins compare --losses soft_triple,contrastive --loss-arg soft_triple.centers_per_class=4
  torchrun --nproc-per-node 2 -m pml_plugins compare --distributed   # every run with DDP; rank 0 reports
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="train several losses on the same budget; table, CSV, Markdown, plot",
        description="Train each loss with the same data, backbone, budget and seeds, pick each "
        "run's epoch on validation classes, test each selected model once; print one "
        "table (Recall@k, MAP@R, nDCG@k as mean ± 95% interval over seeds, ties with "
        "the best, time per epoch, peak memory) with the untrained model as the floor; "
        "write results.csv, runs.csv, results.md, comparison.png, every run under "
        "--out, and report.html (the comparison's offline HTML report, linking to each "
        "run's own).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--losses", help="comma-separated loss names (default: every plugin loss + PML references)")
    add_protocol_arguments(p)
    add_common_arguments(p)
    add_distributed_arguments(p)
    p.set_defaults(func=run)


PROTOCOL_KEYS = ("seeds", "folds", "val_classes", "tune", "primary")


def add_protocol_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("protocol (Musgrave et al. 2020; see docs/getting-started.md)")
    g.add_argument("--seeds", type=int, metavar="N", help="train every loss with seeds 0..N-1 (default 3)")
    g.add_argument(
        "--folds",
        type=int,
        metavar="K",
        help="K class-disjoint folds of the training classes; each run validates on one (default 1)",
    )
    g.add_argument(
        "--val-classes",
        type=float,
        metavar="FRACTION",
        help="with --folds 1: fraction of the training classes held out to pick the epoch "
        "(default 0.2, at least 2 classes; 0: no validation, the last epoch is reported)",
    )
    g.add_argument(
        "--tune",
        type=int,
        metavar="TRIALS",
        help="Optuna trials per loss over its declared search space (default 0: no tuning); "
        "the study is kept in OUT/optuna.db, so a killed run continues",
    )
    g.add_argument(
        "--primary",
        metavar="METRIC",
        help="metric for epoch selection, tuning and ties (default map_at_r; e.g. recall_at_1)",
    )


def protocol_from(args: argparse.Namespace, fvals: dict, base, *, distributed: bool = False):
    """Flags over config-file values over the defaults; checks --primary against the metrics computed."""
    from ..pipeline.protocol import Protocol

    values = {k: fvals.pop(k) for k in PROTOCOL_KEYS if k in fvals}
    values.update({k: getattr(args, k) for k in PROTOCOL_KEYS if getattr(args, k, None) is not None})
    if distributed and "val_classes" not in values and values.get("folds", 1) == 1:
        values["val_classes"] = 0.0  # DDP reports the last epoch (no per-epoch validation there)
    known = {
        "map_at_r",
        "precision_at_1",
        "r_precision",
        *[f"recall_at_{k}" for k in base.ks],
        *[f"ndcg_at_{k}" for k in base.ks],
    }
    primary = values.get("primary", "map_at_r")
    if primary not in known:
        raise ValueError(f"--primary must be one of {', '.join(sorted(known))}, got {primary!r}")
    return Protocol(**values)


def _split_loss_args(values: dict, losses: list[str], source: str) -> dict:
    """``{"proxy_anchor.margin": 0.2}`` or ``{"proxy_anchor": {"margin": 0.2}}`` -> per-loss dicts."""
    from .. import registry as reg

    per: dict = {}
    for key, value in (values or {}).items():
        if isinstance(value, dict):
            loss, args = key, value
        elif "." in key:
            loss, _, arg = key.partition(".")
            args = {arg: value}
        else:
            raise ValueError(f"{source}: in compare, loss arguments name their loss: LOSS.{key}={value!r}")
        entry = reg.get_entry("loss", loss)
        match = next((n for n in losses if reg.get_entry("loss", n).qualified_name == entry.qualified_name), None)
        if match is None:
            raise ValueError(f"{source}: arguments for {loss!r}, which is not among the compared losses")
        per.setdefault(match, {}).update(args)
    return per


def run(args: argparse.Namespace) -> int:
    from ..pipeline import compare as cmp
    from ..pipeline.config import build_config

    start = time.perf_counter()
    if args.seed is not None:
        raise ValueError("compare trains every loss with seeds 0..N-1: use --seeds N (--seed is for train)")
    fvals = file_values(args, extra_keys=("losses", "loss", *PROTOCOL_KEYS))
    if args.losses:
        losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    elif fvals.get("losses"):
        losses = list(fvals["losses"]) if not isinstance(fvals["losses"], str) else fvals["losses"].split(",")
    elif fvals.get("loss"):
        losses = [fvals["loss"]]
    else:
        losses = cmp.default_losses()
    losses = cmp.resolve_losses(losses)
    file_loss_args = fvals.pop("loss_args", None) or {}
    fvals.pop("losses", None), fvals.pop("loss", None)
    flags = flag_values(args)
    flag_loss_args = flags.pop("loss_args", None) or {}
    per_loss = _split_loss_args(file_loss_args, losses, args.config or "config")
    for loss, extra in _split_loss_args(flag_loss_args, losses, "--loss-arg").items():
        per_loss.setdefault(loss, {}).update(extra)
    flags["distributed"], flags["distributed_efficient"] = args.distributed, args.distributed_efficient
    protocol_values = {k: fvals.pop(k) for k in PROTOCOL_KEYS if k in fvals}
    base = build_config(fvals, {**flags, "loss": None})
    protocol = protocol_from(args, protocol_values, base, distributed=bool(base.distributed))
    if base.tensorboard:
        from ..report.tensorboard import require_tensorboard

        require_tensorboard()
    if base.distributed:  # one process group for all the runs (re-initialising one per run can hang)
        from ..distributed_losses import env_from_torchrun
        from ..pipeline.ddp import local_device, process_group
        from ..pipeline.train import resolve_device

        env = env_from_torchrun()
        with process_group(env, local_device(resolve_device(base.device), env)):
            return _run_compare(args, base, losses, per_loss, protocol, start, lead=env.rank == 0)
    return _run_compare(args, base, losses, per_loss, protocol, start, lead=True)


def _run_compare(
    args: argparse.Namespace, base, losses: list[str], per_loss: dict, protocol, start: float, *, lead: bool
) -> int:
    """Every rank trains; only the lead (rank 0, or the single process) evaluates, prints and writes."""
    from ..pipeline import compare as cmp

    out = Path(base.out or "pml-plugins-compare")
    base.out = str(out)
    if not lead:
        cmp.run_compare(
            base,
            losses,
            out,
            per_loss_args=per_loss,
            protocol=protocol,
            progress=False,
            log=lambda msg: None,
            lead=False,
        )
        return 0
    progress = show_progress(args.no_progress)
    print(
        f"comparing {len(losses)} losses on {base.dataset} ({base.epochs} epochs, batch {base.batch_size}, "
        f"embedding {base.embedding_size}, seeds 0-{protocol.seeds - 1}, folds {protocol.folds}, "
        f"tune {protocol.tune}): {', '.join(losses)}",
        flush=True,
    )
    rows = cmp.run_compare(
        base,
        losses,
        out,
        per_loss_args=per_loss,
        protocol=protocol,
        progress=progress,
        log=lambda msg: print(msg, flush=True),
    )
    print()
    print(cmp.format_table(rows, base.ks, protocol, base))
    failed = [r.label for r in rows if r.status == "error"]
    partial = [r.label for r in rows if r.status == "partial"]
    trained = [r for r in rows if r.status in ("ok", "partial")]
    warned = [r.label for r in rows if r.warning]
    print(
        f"\n{len(trained)} trained, {len(failed)} failed"
        + (f" ({', '.join(failed)}; see {out}/runs/*/seed*/error.txt)" if failed else "")
        + (f", {len(partial)} with failed seeds ({', '.join(partial)})" if partial else "")
        + f"; {time.perf_counter() - start:.0f} s. Wrote {out}/results.csv, runs.csv, results.md, comparison.png"
    )
    if warned:
        print(
            f"WARNING: {', '.join(warned)}: the loss was 0 for a whole epoch in some runs (nothing trained then); "
            f"see the status column and runs.csv (zero_loss_epochs)"
        )
    if not args.no_report:
        from .train_command import write_report_safely

        write_report_safely(str(out))
    return 0
