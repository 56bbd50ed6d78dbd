"""``pml-plugins evaluate RUN_DIR``: the run's own evaluation, rebuilt from its folder.

The model comes from ``config.json`` + ``checkpoint.pt``, the data from the run's dataset (or
``--data``), and the metrics from the same evaluation code, distance, k values and thread count
as the run's, so a finished run's numbers come back exactly as ``metrics.json`` holds them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run_dir_argument(args: argparse.Namespace) -> Path | None:
    """The run folder given positionally or with ``--run`` (both: they must agree)."""
    given = [p for p in (getattr(args, "run_dir", None), getattr(args, "run", None)) if p is not None]
    if len(given) == 2 and Path(given[0]) != Path(given[1]):
        raise ValueError(f"two run folders given: {given[0]} and --run {given[1]}")
    return Path(given[0]) if given else None


def evaluate_run(args: argparse.Namespace, run_dir: Path) -> int:
    """Evaluate the run in ``run_dir`` (see the module docstring); prints a table or ``--json``."""
    import torch

    from ..pipeline.evaluate import evaluate
    from ..pipeline.run_dir import load_run, load_splits

    given = [args.embeddings, args.labels, args.reference, getattr(args, "query", None), getattr(args, "gallery", None)]
    if any(v is not None for v in given):
        raise ValueError("give a run folder or embeddings files (--embeddings/--labels, --query/--gallery), not both")
    if args.knn_index != "flat" or args.knn_param:
        raise ValueError(
            "evaluate RUN_DIR repeats the run's exact evaluation; --knn-index / --knn-param apply to "
            "--embeddings (write them with pml-plugins embed RUN_DIR --out emb.npy)"
        )
    device = torch.device(args.device)
    previous = torch.get_num_threads()
    run = load_run(run_dir, device=device)
    if run.threads:
        torch.set_num_threads(run.threads)  # the run's thread count: the same float sums, the same numbers
    try:
        distance = args.distance or run.retrieval_distance
        dataset, gallery = load_splits(run, args.data, "test")
        cfg = run.config
        metrics = evaluate(
            run.trunk,
            run.embedder,
            dataset,
            device=device,
            retrieval_distance=distance,
            ks=cfg.ks,
            batch_size=cfg.eval_batch_size,
            progress=not args.json,
            with_bits=cfg.eval_binarize,
            gallery=gallery,
        )
    finally:
        torch.set_num_threads(previous)
    what = f"{args.data or cfg.dataset} test split"
    if args.json:
        print(
            json.dumps(
                {"run": str(run_dir), "data": what, "distance": distance, "epoch": run.epoch, "metrics": metrics},
                indent=2,
            )
        )
        return 0
    print(
        f"{run_dir}: {cfg.loss} after {run.epoch if run.epoch is not None else '?'} epochs; {what}, "
        f"{len(dataset)} queries, {distance} distance"
    )
    width = max([len(k) for k in metrics] + [6])
    print(f"{'metric':{width}s}  {'value':>8s}  {'x100':>6s}")
    for name, value in metrics.items():
        print(f"{name:{width}s}  {value:8.4f}  {100 * value:6.2f}")
    return 0
