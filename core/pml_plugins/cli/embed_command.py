"""``pml-plugins embed RUN_DIR --out emb.npy``: a trained run's embeddings, for other tools."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="write a trained run's embeddings (and labels) as .npy files",
        description="Rebuild the model of a train --out folder from its config.json and "
        "checkpoint.pt, embed a dataset split and write the embeddings (N, D) to --out "
        "and their labels (N,) next to them (NAME.labels.npy).",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a train --out folder")
    p.add_argument("--data", metavar="DATASET", help="a --dataset spec of train (default: the run's dataset)")
    p.add_argument(
        "--split",
        choices=("test", "train", "all"),
        default="test",
        help="which split to embed (default test: the unseen classes; all: train then test)",
    )
    p.add_argument("--out", required=True, type=Path, metavar="FILE.npy", help="embeddings file to write")
    p.add_argument(
        "--normalize",
        action="store_true",
        help="L2-normalise the rows (what cosine retrieval ranks; default: as the model outputs them)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def labels_path(out: Path) -> Path:
    """``emb.npy`` -> ``emb.labels.npy``."""
    return out.with_name(
        out.name[: -len(".npy")] + ".labels.npy" if out.name.endswith(".npy") else out.name + ".labels.npy"
    )


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..pipeline.run_dir import embed_dataset, load_run, load_split

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.out.suffix != ".npy":
        raise ValueError(f"--out must be a .npy file, got {str(args.out)!r}")
    device = torch.device(args.device)
    run_ = load_run(args.run_dir, device=device)
    previous = torch.get_num_threads()
    if run_.threads:
        torch.set_num_threads(run_.threads)
    try:
        dataset = load_split(run_, args.data, args.split)
        progress = not args.no_progress and sys.stderr.isatty()
        embeddings, labels = embed_dataset(run_, dataset, batch_size=args.batch_size, device=device, progress=progress)
    finally:
        torch.set_num_threads(previous)
    if args.normalize:
        embeddings = torch.nn.functional.normalize(embeddings, dim=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for path, array in ((args.out, embeddings.numpy()), (labels_path(args.out), labels.numpy())):
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, array)
        os.replace(tmp, path)
    print(
        f"wrote {args.out} {tuple(embeddings.shape)} and {labels_path(args.out)} ({args.split} split of "
        f"{args.data or run_.config.dataset}; the run's retrieval distance: {run_.retrieval_distance})"
    )
    return 0
