"""Benchmark: pml_plugins.AccuracyCalculator vs PML 2.9's AccuracyCalculator at Stanford Online Products scale.

Synthetic data shaped like SOP's test split: 60,502 L2-normalised 512-d embeddings in 11,316
classes of 2 to ~14 items (mean 5.35), leave-one-out retrieval (reference = query). Both
calculators run in one process, side by side:

* PML: its default metrics (precision_at_1, r_precision, MAP@R, MAP, MRR) with
  ``k="max_bin_count"`` -- its own default ``k=None`` asks FAISS for a full 60,502 x 60,502
  ranking (~44 GB), which this machine cannot hold;
* ours with ``k="max_bin_count"``: the same metrics plus nDCG@{2,4,8,10,100} and Recall@{1,2,4,8}
  (one search of max(100, R) neighbours), compared value for value with PML;
* ours with the default ``k=None``: PML's full-ranking MAP and MRR, computed in bounded memory
  (``pml_plugins.ranking``: a blocked pass over all references, no N x N ranking), the other
  metrics from the same search of max(100, R) neighbours. PML's own default (``k=None``) would
  hold the full ranking: N x (N - 1) float32 distances + int64 indices, ~44 GB here (29 GB of
  them the distances and indices FAISS returns), so it is not run.

Each run reports its peak resident memory above what the process held before it (sampled
every 20 ms from /proc/self/statm).

NMI/AMI are left out of both (``--with-clustering`` adds them): they run the same FAISS k-means
(11,316 centroids) in both calculators and are not retrieval metrics.

Each calculator's kNN call is timed by wrapping its ``knn_func``; "other" is everything else
(label counting, metrics). Run: ``python benchmarks/bench_metrics.py`` (add ``--n 6000
--classes 1100`` for a quick run). ``--device cuda`` runs both on the GPU: PML then searches with
``CustomKNN(LpDistance(normalize_embeddings=False))`` (its FaissKNN is CPU-only with faiss-cpu,
and raises NameError without FAISS), ours with its default KNN (torch on the GPU without FAISS-GPU).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import threading
import time

import numpy as np
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils import accuracy_calculator as pml_ac
from pytorch_metric_learning.utils.inference import CustomKNN

from pml_plugins.knn import KNN
from pml_plugins.metrics import AccuracyCalculator


class Timed:
    """Wraps a knn_func and adds up the seconds spent in it."""

    def __init__(self, knn_func):
        self.knn_func = knn_func
        self.seconds = 0.0
        self.k = None

    def __call__(self, query, k, reference=None, ref_includes_query=False):
        start = time.perf_counter()
        out = self.knn_func(query, k, reference, ref_includes_query)
        self.seconds += time.perf_counter() - start
        self.k = k
        return out

    def __getattr__(self, name):  # the calculator reads the wrapped function's attributes (full_ranking_metric)
        return getattr(self.__dict__["knn_func"], name)


class PeakRSS:
    """Peak resident memory above the starting level while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.growth_mb = (self.peak - self.start) / 2**20


def sop_like(n: int, num_classes: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    sizes = 2 + rng.multinomial(n - 2 * num_classes, np.full(num_classes, 1 / num_classes))
    labels = np.repeat(np.arange(num_classes), sizes)
    rng.shuffle(labels)
    centers = rng.standard_normal((num_classes, dim)).astype(np.float32) / math.sqrt(dim)
    x = centers[labels] + 0.08 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return torch.from_numpy(x), torch.from_numpy(labels)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(name, calculator, x, labels):
    timed = Timed(calculator.knn_func)
    calculator.knn_func = timed
    _sync(x.device)
    with PeakRSS() as mem:
        start = time.perf_counter()
        results = calculator.get_accuracy(x, labels)
        _sync(x.device)
        total = time.perf_counter() - start
    print(f"  {name}: {total:.1f} s, peak memory +{mem.growth_mb:.0f} MiB", flush=True)
    return {
        "name": name,
        "results": results,
        "total": total,
        "knn": timed.seconds,
        "k": timed.k,
        "other": total - timed.seconds,
        "peak_mb": mem.growth_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60502)
    parser.add_argument("--classes", type=int, default=11316)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--with-clustering", action="store_true", help="also compute NMI and AMI (FAISS k-means)")
    parser.add_argument(
        "--torch-knn", action="store_true", help="add a run of ours with the exact torch kNN (no FAISS)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--skip-default-k", action="store_true", help="leave out the default k=None run")
    parser.add_argument(
        "--pml-default",
        action="store_true",
        help="also run PML with its default k=None (the N x N ranking: only for small --n)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    x, labels = sop_like(args.n, args.classes, args.dim)
    x, labels = x.to(device), labels.to(device)
    exclude = () if args.with_clustering else ("NMI", "AMI")
    print(
        f"data: {args.n} x {args.dim}, {args.classes} classes (sizes {int(torch.bincount(labels).min())}-"
        f"{int(torch.bincount(labels).max())}), leave-one-out; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, device {device}"
    )
    if device.type == "cuda":
        pml_knn = CustomKNN(LpDistance(normalize_embeddings=False), batch_size=2048)
        run(
            "warm-up",
            AccuracyCalculator(exclude=exclude, device=device, plugin_metrics=False, k="max_bin_count"),
            x,
            labels,
        )
    else:
        from pytorch_metric_learning.utils.inference import FaissKNN

        pml_knn = FaissKNN()

    runs = [
        run(
            "PML 2.9 AccuracyCalculator (PML defaults)",
            pml_ac.AccuracyCalculator(k="max_bin_count", exclude=exclude, device=device, knn_func=pml_knn),
            x,
            labels,
        )
    ]
    runs.append(
        run(
            "pml_plugins AccuracyCalculator, k='max_bin_count' (+nDCG, Recall)",
            AccuracyCalculator(exclude=exclude, device=device, plugin_metrics=False, k="max_bin_count"),
            x,
            labels,
        )
    )
    if args.torch_knn:
        runs.append(
            run(
                "pml_plugins, exact torch kNN (no FAISS), k='max_bin_count'",
                AccuracyCalculator(
                    exclude=exclude,
                    device=device,
                    plugin_metrics=False,
                    k="max_bin_count",
                    knn_func=KNN("euclidean", backend="torch"),
                ),
                x,
                labels,
            )
        )

    if not args.skip_default_k:
        runs.append(
            run(
                "pml_plugins AccuracyCalculator, default k=None (full-ranking MAP/MRR, +nDCG, Recall)",
                AccuracyCalculator(exclude=exclude, device=device, plugin_metrics=False),
                x,
                labels,
            )
        )
    pml_run, ours = runs[0], runs[1]
    print()
    print(
        "| calculator | metrics | kNN k | total (s) | kNN (s) | other (s) | other / kNN | peak memory (MiB) "
        "| speed-up vs PML |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['name']} | {len(r['results'])} | {r['k']} | {r['total']:.2f} | {r['knn']:.2f} | "
            f"{r['other']:.2f} | "
            f"{100 * r['other'] / r['knn']:.1f}% | {r['peak_mb']:.0f} | {pml_run['total'] / r['total']:.2f}x |"
        )
    n = len(x)
    print(
        f"\nPML's default k=None asks FAISS for the {n} x {n - 1} ranking: {n * (n - 1) * 8 / 1e9:.0f} GB of int64 "
        f"indices + {n * (n - 1) * 4 / 1e9:.0f} GB of float32 distances (not run)"
    )
    if not args.skip_default_k:
        full = runs[-1]["results"]
        pml_full = None
        if args.pml_default:
            pml_full = run(
                "PML 2.9 AccuracyCalculator, k=None (N x N ranking)",
                pml_ac.AccuracyCalculator(exclude=exclude, device=device, knn_func=pml_knn),
                x,
                labels,
            )
            print(f"PML k=None: {pml_full['total']:.2f} s, peak memory +{pml_full['peak_mb']:.0f} MiB")
        print("\n| metric | ours, default k=None (full ranking) | PML k=None | ours, k='max_bin_count' |")
        print("|---|---|---|---|")
        for key in ("mean_average_precision", "mean_reciprocal_rank"):
            theirs = f"{pml_full['results'][key]:.10f}" if pml_full else "not run (memory)"
            print(f"| {key} | {full[key]:.10f} | {theirs} | {ours['results'][key]:.10f} |")
    print()
    shared = [k for k in pml_run["results"]]
    print("| metric | PML | pml_plugins | abs diff |")
    print("|---|---|---|---|")
    worst = 0.0
    for key in shared:
        a, b = pml_run["results"][key], ours["results"][key]
        worst = max(worst, abs(a - b))
        print(f"| {key} | {a:.10f} | {b:.10f} | {abs(a - b):.1e} |")
    for key, value in ours["results"].items():
        if key not in shared:
            print(f"| {key} | - | {value:.10f} | |")
    identical = all(pml_run["results"][k] == ours["results"][k] for k in shared)
    print()
    print(f"shared metrics bit-for-bit identical: {identical} (max abs diff {worst:.1e})")
    if args.torch_knn:
        t = runs[2]["results"]  # the torch kNN run (k="max_bin_count")
        print(
            f"torch kNN vs FAISS kNN, max abs diff over all metrics: "
            f"{max(abs(t[k] - ours['results'][k]) for k in t):.1e}"
        )
    print(
        f"end-to-end speed-up: {pml_run['total'] / ours['total']:.2f}x; our non-kNN time is "
        f"{100 * ours['other'] / ours['knn']:.1f}% of our kNN time "
        f"(PML: {100 * pml_run['other'] / pml_run['knn']:.1f}%)"
    )


if __name__ == "__main__":
    main()
