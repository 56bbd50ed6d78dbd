"""``pml-plugins evaluate``: every retrieval metric from saved embeddings, no training needed,
or (``evaluate RUN_DIR``) a training run's own evaluation from its folder."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from ..knn import INDEX_PARAMS, INDEXES, METRICS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="compute every retrieval metric (PML's, nDCG@k, Recall@k, plugin metrics) from saved embeddings",
        description="Compute retrieval metrics with pml_plugins.AccuracyCalculator from .npy (or .pt) files. "
        "Without --reference, each query is searched among all the others (leave-one-out). "
        "With a run folder (pml-plugins evaluate RUN_DIR), rebuild the trained model from its "
        "config.json and checkpoint.pt and evaluate its test split (or --data) with the run's distance: "
        "the run's metrics.json numbers, exactly.",
    )
    p.add_argument("run_dir", nargs="?", type=Path, metavar="RUN_DIR", help="a train --out folder (or use --run)")
    p.add_argument("--run", type=Path, metavar="RUN_DIR", help="a train --out folder: evaluate its model")
    p.add_argument(
        "--data",
        metavar="DATASET",
        help="with a run: evaluate this dataset's test split (a --dataset spec of train) instead of the run's",
    )
    p.add_argument("--embeddings", type=Path, help="query embeddings, (N, D) .npy or .pt")
    p.add_argument("--labels", type=Path, help="query labels, (N,) or (N, C) .npy or .pt")
    p.add_argument(
        "--query",
        type=Path,
        help="query set as one .npz (embeddings or features, labels); with "
        "--gallery instead of --embeddings/--labels/--reference",
    )
    p.add_argument(
        "--gallery",
        type=Path,
        help="gallery set as one .npz; queries are searched in it with ref_includes_query=False (In-Shop's protocol)",
    )
    p.add_argument("--reference", type=Path, help="reference embeddings (default: the queries themselves)")
    p.add_argument("--reference-labels", type=Path, help="reference labels (required with --reference)")
    p.add_argument(
        "--ref-includes-query",
        action="store_true",
        help="the first N reference rows are the queries (their self-matches are skipped)",
    )
    p.add_argument("--label-column", type=int, help="use this column of 2-D labels (default: compare whole rows)")
    p.add_argument(
        "--distance",
        choices=METRICS,
        default=None,
        help="kNN ranking (default: the run's distance with RUN_DIR, else euclidean as PML's calculator)",
    )
    p.add_argument(
        "--ndcg-ks", type=int, nargs="*", default=None, metavar="K", help="k of nDCG@k (default 2 4 8 10 100)"
    )
    p.add_argument(
        "--recall-ks", type=int, nargs="*", default=None, metavar="K", help="k of Recall@k (default 1 2 4 8)"
    )
    p.add_argument("--k", default=None, help="PML's k: an int, max_bin_count or all (default: max_bin_count)")
    p.add_argument("--include", nargs="*", default=(), metavar="METRIC", help="only these metrics")
    p.add_argument("--exclude", nargs="*", default=(), metavar="METRIC", help="skip these metrics (e.g. NMI AMI)")
    p.add_argument("--avg-of-avgs", action="store_true", help="average per class first")
    p.add_argument("--no-plugin-metrics", action="store_true", help="skip metrics registered by plugins")
    p.add_argument(
        "--knn-index",
        choices=INDEXES,
        default="flat",
        help="kNN index: flat (exact, default), or FAISS's approximate ivf / hnsw / pq "
        "(pq: 4-bit product-quantization fast scan of every reference, re-ranked exactly)",
    )
    p.add_argument(
        "--knn-param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="approximate-index parameter, repeatable: ivf "
        + ", ".join(INDEX_PARAMS["ivf"])
        + "; hnsw "
        + ", ".join(INDEX_PARAMS["hnsw"])
        + "; pq "
        + ", ".join(INDEX_PARAMS["pq"])
        + " (e.g. --knn-param nlist=4096 --knn-param nprobe=32)",
    )
    p.add_argument(
        "--knn-device",
        default=None,
        help="where the kNN search runs (default: --device); cuda puts FAISS on the GPU(s) when it has GPU support",
    )
    p.add_argument(
        "--knn-shard",
        choices=("auto", "yes", "no"),
        default="auto",
        help="with several GPUs, split the FAISS index over them (auto: yes)",
    )
    p.add_argument("--device", default="cpu", help="torch device for the metrics (default: cpu)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _load(path: Path, what: str) -> Any:
    import numpy as np
    import torch

    if not path.exists():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    if path.suffix in (".pt", ".pth"):
        from ..pipeline.checkpoint import safe_torch_load

        obj = safe_torch_load(path, f"{what} file {str(path)!r}")  # one-line errors, never unpickles
        if isinstance(obj, dict) and "trunk" in obj and "embedder" in obj:
            raise ValueError(
                f"{what} file {str(path)!r} is a training checkpoint, not embeddings: use "
                f"pml-plugins evaluate {path.parent} (the run folder) or pml-plugins embed {path.parent}"
            )
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"{what} file {str(path)!r} must hold one tensor, got {type(obj).__name__}")
        return obj
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"cannot read {what} file {str(path)!r} as .npy: {exc}") from exc
    if isinstance(arr, np.lib.npyio.NpzFile):
        raise ValueError(f"{what} file {str(path)!r} is an .npz archive; save one array with np.save")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _load_pair(path: Path, what: str, column: int | None) -> tuple[Any, Any]:
    """(embeddings, labels) from one .npz holding ``embeddings`` (or ``features``) and ``labels``."""
    import numpy as np
    import torch

    if not path.exists():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    try:
        npz = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"cannot read {what} file {str(path)!r} as .npz: {exc}") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{what} file {str(path)!r} must be an .npz with arrays 'embeddings' and 'labels'")
    with npz:
        key = "embeddings" if "embeddings" in npz.files else ("features" if "features" in npz.files else None)
        if key is None or "labels" not in npz.files:
            raise ValueError(
                f"{what} {str(path)!r}: expected arrays 'embeddings' (or 'features') and 'labels', "
                f"found {sorted(npz.files)}"
            )
        emb, labels = torch.from_numpy(np.ascontiguousarray(npz[key])), torch.from_numpy(np.asarray(npz["labels"]))
    if emb.ndim != 2 or len(emb) != len(labels):
        raise ValueError(
            f"{what} {str(path)!r}: embeddings must be (N, D) with N labels, got {tuple(emb.shape)} "
            f"and {tuple(labels.shape)}"
        )
    return emb, _labels(labels, column, what)


def _labels(t: Any, column: int | None, what: str) -> Any:
    if column is not None:
        if t.ndim != 2 or not 0 <= column < t.shape[1]:
            raise ValueError(
                f"--label-column {column} needs 2-D {what} with more than {column} columns, got shape {tuple(t.shape)}"
            )
        t = t[:, column]
    if t.is_floating_point() and bool((t == t.round()).all()):
        t = t.long()  # labels saved as floats: compare them as the integers they are
    return t


def _knn_params(index: str, items: list[str]) -> dict[str, Any]:
    """``--knn-param NAME=VALUE`` items, checked against ``--knn-index`` (errors name the option)."""
    from ..knn import check_index_params
    from .knn_params import parse_index_params

    try:
        return check_index_params(index, parse_index_params(items))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--knn-param: {exc}") from None


def _parse_k(value: str | None) -> int | str | None:
    if value is None or value in ("max_bin_count", "all"):
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--k must be an int, 'max_bin_count' or 'all', got {value!r}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from ..knn import KNN
    from ..metrics import DEFAULT_NDCG_KS, DEFAULT_RECALL_KS, AccuracyCalculator
    from .run_evaluate import evaluate_run, run_dir_argument

    run_dir = run_dir_argument(args)
    if run_dir is not None:
        return evaluate_run(args, run_dir)
    if args.data is not None:
        raise ValueError("--data goes with a run folder (evaluate RUN_DIR --data ...)")
    if (args.query is None) != (args.gallery is None):
        raise ValueError("--query and --gallery go together")
    if args.query is not None and any(v is not None for v in (args.embeddings, args.labels, args.reference)):
        raise ValueError("--query/--gallery replace --embeddings, --labels and --reference; give one or the other")
    if args.query is None and (args.embeddings is None or args.labels is None):
        raise ValueError(
            "give a run folder (evaluate RUN_DIR), both --embeddings and --labels, or --query and --gallery"
        )
    args.distance = args.distance or "euclidean"
    if (args.reference is None) != (args.reference_labels is None):
        raise ValueError("--reference and --reference-labels go together")
    knn_func = KNN(
        metric=args.distance,
        index=args.knn_index,
        index_params=_knn_params(args.knn_index, args.knn_param),
        device=args.knn_device or args.device,
        shard={"auto": None, "yes": True, "no": False}[args.knn_shard],
    )
    if args.query is not None:
        query, query_labels = _load_pair(args.query, "--query", args.label_column)
        reference, reference_labels = _load_pair(args.gallery, "--gallery", args.label_column)
        ref_includes_query = False
    else:
        query = _load(args.embeddings, "--embeddings")
        query_labels = _labels(_load(args.labels, "--labels"), args.label_column, "--labels")
        if args.reference is not None:
            reference = _load(args.reference, "--reference")
            reference_labels = _labels(
                _load(args.reference_labels, "--reference-labels"), args.label_column, "--reference-labels"
            )
            ref_includes_query = args.ref_includes_query
        else:
            reference, reference_labels, ref_includes_query = None, None, True
    calculator = AccuracyCalculator(
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        avg_of_avgs=args.avg_of_avgs,
        k=_parse_k(args.k),
        device=torch.device(args.device),
        knn_func=knn_func,
        ndcg_ks=DEFAULT_NDCG_KS if args.ndcg_ks is None else args.ndcg_ks,
        recall_ks=DEFAULT_RECALL_KS if args.recall_ks is None else args.recall_ks,
        plugin_metrics=not args.no_plugin_metrics,
    )
    start = time.perf_counter()
    results = calculator.get_accuracy(query, query_labels, reference, reference_labels, ref_includes_query)
    seconds = time.perf_counter() - start
    num_reference = len(query) if reference is None else len(reference)
    knn = {"index": args.knn_index, **knn_func.index_params}
    if args.json:
        print(
            json.dumps(
                {
                    "metrics": {k: _jsonable(v) for k, v in results.items()},
                    "num_queries": len(query),
                    "num_references": num_reference,
                    "ref_includes_query": ref_includes_query,
                    "distance": args.distance,
                    "knn": knn,
                    "avg_of_avgs": args.avg_of_avgs,
                    "seconds": round(seconds, 3),
                },
                indent=2,
            )
        )
        return 0
    knn_text = " ".join(f"{k}={v}" for k, v in knn.items())
    print(
        f"{len(query)} queries, {num_reference} references, {args.distance} distance, kNN {knn_text}, {seconds:.2f} s"
    )
    width = max([len(k) for k in results] + [6])
    print(f"{'metric':{width}s}  {'value':>8s}  {'x100':>6s}")
    for name, value in results.items():
        if isinstance(value, (int, float)):
            print(f"{name:{width}s}  {value:8.4f}  {100 * value:6.2f}")
        else:
            print(f"{name:{width}s}  {value}")
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value
