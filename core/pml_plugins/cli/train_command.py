"""``pml-plugins train``: train one loss with PML's MetricLossOnly, evaluate, write the results."""

from __future__ import annotations

import argparse
from typing import Any

from ..progress import show_progress

_EPILOG = """examples:
  pml-plugins train --loss proxy_anchor                       # the digits default, a few seconds
  pml-plugins train --loss soft_triple --loss-arg centers_per_class=4 --epochs 20 --out runs/st
  pml-plugins train --loss contrastive --miner multi_similarity --sampler m-per-class --m 8
  pml-plugins train --config examples/configs/mpa.toml         # a paper recipe (needs the data)
  pml-plugins train --config runs/st/config.json              # rerun a finished run
  torchrun --nproc-per-node 2 -m pml_plugins train --loss cam --distributed   # DDP, 2 processes
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one loss, evaluate it, write metrics/config/checkpoint/plot/report",
        description="Train an embedding model with any registered loss (PML's MetricLossOnly "
        "trainer), evaluate it on the unseen test classes, and write metrics.json, "
        "metrics.jsonl (per epoch), config.json, checkpoint.pt, metrics.png, "
        "test_embeddings.npz and the offline HTML report report.html under --out.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--loss", help="loss name (pml-plugins list), alias or plugin:name (default proxy_anchor)")
    p.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help="train with seeds 0..N-1 (runs in OUT/seed<k>/; mean ± 95%% interval in OUT/results.csv); "
        "default: one run with --seed",
    )
    p.add_argument(
        "--resume",
        metavar="OUT",
        help="continue the run in OUT from its latest checkpoint, with its settings (see docs/long-runs.md)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --resume: continue even if the given settings differ "
        "from the checkpoint's (recorded in OUT/resumed.json)",
    )
    add_common_arguments(p)
    add_distributed_arguments(p)
    p.set_defaults(func=run)


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    """``--distributed`` / ``--distributed-efficient`` (train and compare)."""
    g = p.add_argument_group("distributed (under torchrun; see docs/distributed-training.md)")
    g.add_argument(
        "--distributed",
        action="store_true",
        default=None,
        help="DDP over the torchrun processes (gloo on CPU, nccl on CUDA); --batch-size is the global batch",
    )
    g.add_argument(
        "--distributed-efficient",
        action="store_true",
        default=None,
        help="PML's efficient mode (only for losses whose registration allows it)",
    )


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by train and compare. Every default is None: a config file fills the rest."""
    p.add_argument("--config", metavar="FILE", help="TOML, YAML or JSON file with the same options (flags override it)")
    p.add_argument(
        "--loss-arg",
        action="append",
        metavar="KEY=VALUE",
        help="loss constructor argument, a Python literal (repeatable); compare: LOSS.KEY=VALUE",
    )
    p.add_argument(
        "--loss-option",
        action="append",
        metavar="KEY=VALUE",
        help="option for a loss's training_setup (e.g. views=6 for multi-view losses)",
    )
    p.add_argument("--miner", help="miner name (pml-plugins list --kind miner)")
    p.add_argument("--miner-arg", action="append", metavar="KEY=VALUE", help="miner constructor argument")
    g = p.add_argument_group("data and model")
    g.add_argument(
        "--dataset",
        help="digits (default) | digits:raw | imagefolder:PATH | cub:PATH | cars:PATH | sop:PATH | embeddings:PATH.npz",
    )
    g.add_argument("--backbone", help="auto (default) | cnn | mlp | identity | timm:NAME")
    g.add_argument("--embedding-size", type=int, help="embedding dimension (default 64)")
    g.add_argument("--pooling", choices=["avg", "gem"], help="feature-map pooling in the head (default avg)")
    g.add_argument(
        "--head-norm", choices=["none", "l2", "layernorm", "layernorm+l2"], help="after the head's linear layer"
    )
    g.add_argument(
        "--pretrained",
        nargs="?",
        const="cache",
        metavar="PATH",
        help="timm: local weights file, or no value for already-cached weights (never downloads)",
    )
    g.add_argument("--image-size", type=int, help="input size for image datasets (default: the backbone's)")
    g.add_argument(
        "--head",
        choices=["linear", "none"],
        help="embedding head: linear (default) or none (the trunk's pooled features / CLS token; "
        "needs --embedding-size equal to the trunk's width)",
    )
    g.add_argument(
        "--class-texts",
        metavar="FILE",
        help="class -> text (JSON object, or CSV class,text) for losses that take class distances "
        "(default: ImageFolder folder names, the digit names for digits)",
    )
    g.add_argument(
        "--samples-per-class",
        type=int,
        metavar="N",
        help="few-shot training: N samples of each training class, drawn with --seed",
    )
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="epochs (default 8; 0 evaluates the untrained model)")
    g.add_argument("--batch-size", type=int, help="samples per batch (default 64)")
    g.add_argument("--iterations-per-epoch", type=int, help="default: one pass over the training split")
    g.add_argument("--sampler", choices=["auto", "random", "m-per-class"], help="auto: what the loss declares")
    g.add_argument("--m", type=int, help="samples per class for the m-per-class sampler")
    g.add_argument("--optimizer", choices=["adam", "adamw", "sgd", "rmsprop"], help="default adam")
    g.add_argument("--lr", type=float, help="trunk and head learning rate (default 1e-3)")
    g.add_argument(
        "--loss-lr",
        type=float,
        help="learning rate of the loss's own parameters (default: the loss's registered loss_lr)",
    )
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--lr-step", type=int, metavar="EPOCHS", help="multiply learning rates by --lr-gamma every EPOCHS")
    g.add_argument("--lr-gamma", type=float)
    g.add_argument(
        "--pretrain-epochs",
        type=int,
        metavar="N",
        help="epochs of classification pre-training (linear classifier + cross-entropy) before the "
        "metric loss (default: what the loss declares, else 0)",
    )
    g.add_argument("--seed", type=int, help="default 0; same seed on CPU gives the same metrics")
    g.add_argument("--device", help="auto (default) | cpu | cuda[:N]")
    g.add_argument("--amp", choices=["auto", "on", "off"], help="mixed precision (auto: on for CUDA)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default 1 for the built-in backbones)")
    g.add_argument("--num-workers", type=int, help="data-loader worker processes (default 0)")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--retrieval-distance", choices=["cosine", "euclidean"], help="default: what the loss declares")
    g.add_argument("--ks", help="k values for Recall@k / nDCG@k (default 1,2,4,8)")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument(
        "--query",
        metavar="PATH",
        help="query set (ImageFolder folder or .npz features+labels), "
        "searched in --gallery instead of the test split in itself",
    )
    g.add_argument("--gallery", metavar="PATH", help="gallery set for --query (same kind as --query)")
    g.add_argument(
        "--eval-binarize",
        action="store_true",
        default=None,
        help="also evaluate binarised embeddings (LayerNorm + sign, ranked by Hamming distance): "
        "bits_* metrics, the 'bits' rows of the adaptive-margin paper",
    )
    g.add_argument("--out", metavar="DIR", help="output folder")
    g.add_argument(
        "--keep-last",
        type=int,
        metavar="N",
        help="checkpoints kept: OUT/checkpoint.pt (the latest, written after every epoch) and, for N > 1, "
        "the N latest epochs as OUT/checkpoint-epochNNNN.pt (default 1: the latest only)",
    )
    g.add_argument(
        "--no-report",
        action="store_true",
        help="do not write the offline HTML report (report.html; see pml-plugins report)",
    )
    g.add_argument(
        "--tensorboard",
        action="store_true",
        default=None,
        help="also write TensorBoard events (per-epoch scalars, test metrics, test embeddings for the "
        "projector) to OUT/tensorboard; needs the tensorboard package",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


_FLAG_FIELDS = (
    "miner",
    "dataset",
    "backbone",
    "embedding_size",
    "pooling",
    "head_norm",
    "pretrained",
    "image_size",
    "epochs",
    "batch_size",
    "iterations_per_epoch",
    "sampler",
    "m",
    "optimizer",
    "lr",
    "loss_lr",
    "weight_decay",
    "lr_step",
    "lr_gamma",
    "seed",
    "device",
    "amp",
    "threads",
    "num_workers",
    "retrieval_distance",
    "eval_batch_size",
    "eval_binarize",
    "out",
    "keep_last",
    "tensorboard",
    "head",
    "class_texts",
    "samples_per_class",
    "pretrain_epochs",
    "query",
    "gallery",
)


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    from ..pipeline.config import parse_key_values

    values = {k: getattr(args, k) for k in _FLAG_FIELDS}
    values["loss_args"] = parse_key_values(args.loss_arg, "--loss-arg") if args.loss_arg else None
    values["loss_options"] = parse_key_values(args.loss_option, "--loss-option") if args.loss_option else None
    values["miner_args"] = parse_key_values(args.miner_arg, "--miner-arg") if args.miner_arg else None
    if args.ks:
        try:
            values["ks"] = [int(k) for k in args.ks.split(",") if k.strip()]
        except ValueError:
            raise ValueError(f"--ks must be comma-separated integers, got {args.ks!r}") from None
    return values


def file_values(args: argparse.Namespace, extra_keys: tuple = ()) -> dict[str, Any]:
    from ..pipeline.config import check_keys, config_fields, load_config_file

    if not args.config:
        return {}
    data = load_config_file(args.config)
    check_keys(data, [*config_fields(), *extra_keys], args.config)
    return data


def print_metrics(metrics: dict, ks) -> None:
    parts = [f"R@{k} {100 * metrics[f'recall_at_{k}']:.1f}" for k in ks if f"recall_at_{k}" in metrics]
    parts.append(f"MAP@R {100 * metrics['map_at_r']:.1f}")
    parts += [f"nDCG@{k} {100 * metrics[f'ndcg_at_{k}']:.1f}" for k in ks if f"ndcg_at_{k}" in metrics]
    parts += [
        f"{label} {100 * metrics[key]:.1f}"
        for key, label in (("mean_average_precision", "mAP"), ("NMI", "NMI"))
        if key in metrics
    ]
    print("  ".join(parts))
    if "bits_map_at_r" in metrics:
        bits = [f"R@{k} {100 * metrics[f'bits_recall_at_{k}']:.1f}" for k in ks if f"bits_recall_at_{k}" in metrics]
        print("bits: " + "  ".join([*bits, f"MAP@R {100 * metrics['bits_map_at_r']:.1f}"]))


def run(args: argparse.Namespace) -> int:
    from ..pipeline.config import build_config
    from ..pipeline.train import run_training

    fvals = file_values(args)
    flags = flag_values(args)
    flags["loss"] = args.loss
    flags["distributed"], flags["distributed_efficient"] = args.distributed, args.distributed_efficient
    if args.force and not args.resume:
        raise ValueError("--force goes with --resume OUT")
    if args.resume:
        fvals = {**resumed_settings(args.resume, flags.get("out")), **fvals}
        flags["out"] = args.resume
    cfg = build_config(fvals, flags)
    if cfg.tensorboard:
        from ..report.tensorboard import require_tensorboard

        require_tensorboard()
    if cfg.out is None:
        cfg.out = f"pml-plugins-runs/{(cfg.loss or 'untrained').replace(':', '_')}"
    progress = show_progress(args.no_progress)
    if args.seeds is not None:
        if args.resume:
            raise ValueError("--seeds starts new runs; --resume continues one (resume each OUT/seed<k> on its own)")
        return _run_seeds(cfg, args.seeds, progress)
    result = run_training(
        cfg, progress=progress, log=lambda msg: print(msg, flush=True), resume=bool(args.resume), force=args.force
    )
    if result.config.get("resolved", {}).get("distributed", {}).get("rank", 0) != 0:
        return 0  # only rank 0 evaluates and writes
    print(
        f"{result.name}: trained {cfg.epochs} epochs"
        + (f", {result.seconds_per_epoch:.2f} s/epoch" if result.seconds_per_epoch else "")
    )
    print_metrics(result.metrics, cfg.ks)
    written = "metrics.json, metrics.jsonl, config.json, checkpoint.pt, metrics.png, test_embeddings.npz"
    print(
        f"wrote {cfg.out}/{written}"
        + (f", tensorboard/ (tensorboard --logdir {cfg.out}/tensorboard)" if cfg.tensorboard else "")
    )
    if not args.no_report:
        write_report_safely(cfg.out)
    return 0


def _run_seeds(cfg, seeds: int, progress: bool) -> int:
    """``train --seeds N``: the run with seeds 0..N-1, each in ``OUT/seed<k>``; mean ± 95% interval."""
    import dataclasses
    from pathlib import Path

    from ..pipeline import compare as cmp
    from ..pipeline.protocol import LossSummary, Protocol, execute, summarize
    from ..pipeline.stats import format_mean_ci

    if cfg.distributed:
        raise ValueError("--seeds runs one process per seed; use it without --distributed")
    protocol = Protocol(seeds=seeds, val_classes=0.0)
    out = Path(cfg.out)
    row = LossSummary(label=cfg.loss or "untrained", loss=cfg.loss)
    for seed in range(seeds):
        run_cfg = dataclasses.replace(cfg, seed=seed, out=str(out / f"seed{seed}"))
        record = execute(run_cfg, row.label, loss=cfg.loss, seed=seed, fold=None, held_out=None, progress=progress)
        row.runs.append(record)
        if not record.ok:
            print(f"seed {seed}: FAILED ({record.result.error})", flush=True)
            continue
        print(f"seed {seed}: ", end="")
        print_metrics(record.result.metrics, cfg.ks)
        if record.zero_loss_epochs:
            print(
                f"WARNING: seed {seed}: the loss was 0 for every iteration of epoch(s) "
                f"{', '.join(map(str, record.zero_loss_epochs))}: nothing was trained then",
                flush=True,
            )
    summarize([row], protocol)
    cmp.write_results([row], out, cfg, protocol)
    parts = [
        f"{cmp.metric_label(k)} {format_mean_ci(row.means[k], row.ci95[k])}"
        for k in ("recall_at_1", "map_at_r")
        if k in row.means
    ]
    print(f"{row.label} over {row.n_seeds} seed(s), mean ± 95% t-interval: {'  '.join(parts)}")
    print(f"wrote {out}/seed<k>/ (one run each), {out}/runs.csv, results.csv, results.md")
    return 0 if row.status == "ok" else 1


def resumed_settings(out: str, flag_out: Any = None) -> dict[str, Any]:
    """The settings stored in ``OUT/checkpoint.pt`` (what ``--resume OUT`` continues with)."""
    from pathlib import Path

    from ..pipeline.checkpoint import is_resumable, load_checkpoint
    from ..pipeline.config import config_fields

    if flag_out is not None and flag_out != out:
        raise ValueError(f"--resume {out} continues the run in {out}; --out {flag_out} is another folder")
    if not Path(out).is_dir():
        raise FileNotFoundError(f"--resume: run folder {out!r} does not exist")
    state = load_checkpoint(out, mmap=True)
    if not is_resumable(state):
        raise ValueError(
            f"{out}/checkpoint.pt holds final weights only (written by an older pml-plugins): it cannot be resumed"
        )
    fields = set(config_fields())
    return {k: v for k, v in (state.get("config") or {}).items() if k in fields and k != "out"}


def write_report_safely(directory: str) -> None:
    """The report at the end of train / compare; a failure is reported but leaves the run's files be."""
    import sys
    import time

    from ..report import write_report

    start = time.perf_counter()
    try:
        path = write_report(directory)
    except Exception as exc:  # the run itself succeeded and is on disk
        print(
            f"warning: could not write the HTML report ({type(exc).__name__}: {exc}); "
            f"try: pml-plugins report {directory}",
            file=sys.stderr,
        )
        return
    print(f"report: {path} ({time.perf_counter() - start:.1f} s; opens offline in any browser)")
