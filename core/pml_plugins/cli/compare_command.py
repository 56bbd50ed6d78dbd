"""``pml-plugins compare``: train several losses with the same budget and print one table."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..progress import show_progress
from .train_command import add_common_arguments, add_distributed_arguments, file_values, flag_values

_EPILOG = """With no arguments this is the main job: every installed plugin loss plus PML's ProxyAnchor,
SoftTriple, NormalizedSoftmax and Contrastive on the bundled digits (train classes 0-4, test on
5-9), a few seconds per loss on a CPU, against the untrained model as the floor.

examples:
  pml-plugins compare
  pml-plugins compare --losses proxy_anchor,soft_triple --epochs 20 --out runs/cmp
  pml-plugins compare --losses soft_triple,contrastive --loss-arg soft_triple.centers_per_class=4
  torchrun --nproc-per-node 2 -m pml_plugins compare --distributed   # every run with DDP; rank 0 reports
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train several losses on the same budget; table, CSV, Markdown, plot",
                       description="Train each loss with the same data, backbone, seed and budget; print one "
                                   "table (Recall@k, MAP@R, nDCG@k, time per epoch, peak memory) with the "
                                   "untrained model as the floor; write results.csv, results.md, "
                                   "comparison.png, every run under --out, and report.html (the comparison's "
                                   "offline HTML report, linking to each run's own).",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", help="comma-separated loss names (default: every plugin loss + PML references)")
    add_common_arguments(p)
    add_distributed_arguments(p)
    p.set_defaults(func=run)


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
    fvals = file_values(args, extra_keys=("losses", "loss"))
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
    base = build_config(fvals, {**flags, "loss": None})
    if base.tensorboard:
        from ..report.tensorboard import require_tensorboard

        require_tensorboard()
    if base.distributed:  # one process group for all the runs (re-initialising one per run can hang)
        from ..distributed_losses import env_from_torchrun
        from ..pipeline.ddp import local_device, process_group
        from ..pipeline.train import resolve_device

        env = env_from_torchrun()
        with process_group(env, local_device(resolve_device(base.device), env)):
            return _run_compare(args, base, losses, per_loss, start, lead=env.rank == 0)
    return _run_compare(args, base, losses, per_loss, start, lead=True)


def _run_compare(args: argparse.Namespace, base, losses: list[str], per_loss: dict, start: float, *,
                 lead: bool) -> int:
    """Every rank trains; only the lead (rank 0, or the single process) evaluates, prints and writes."""
    from ..pipeline import compare as cmp

    out = Path(base.out or "pml-plugins-compare")
    base.out = str(out)
    if not lead:
        cmp.run_compare(base, losses, out, per_loss_args=per_loss, progress=False, log=lambda msg: None, lead=False)
        return 0
    progress = show_progress(args.no_progress)
    print(f"comparing {len(losses)} losses on {base.dataset} ({base.epochs} epochs, batch {base.batch_size}, "
          f"embedding {base.embedding_size}, seed {base.seed}): {', '.join(losses)}", flush=True)
    rows = cmp.run_compare(base, losses, out, per_loss_args=per_loss, progress=progress,
                           log=lambda msg: print(msg, flush=True))
    print()
    print(cmp.format_table(rows, base.ks))
    failed = [r.name for r in rows if r.error]
    trained = [r for r in rows if not r.error and not cmp.is_floor(r)]
    print(f"\n{len(trained)} trained, {len(failed)} failed"
          + (f" ({', '.join(failed)}; see {out}/runs/*/error.txt)" if failed else "")
          + f"; {time.perf_counter() - start:.0f} s. Wrote {out}/results.csv, results.md, comparison.png")
    if not args.no_report:
        from .train_command import write_report_safely

        write_report_safely(str(out))
    return 0
