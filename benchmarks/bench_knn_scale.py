"""Benchmark: approximate kNN (FAISS IVF / HNSW / PQ) against exact search, and evaluation at 1M scale.

Synthetic clustered embeddings: ``N / items_per_class`` Gaussian clusters on the unit sphere in
128-d (centres uniform on the sphere, per-dimension noise ``noise / sqrt(d)``, re-normalised),
label = cluster id; queries are separate draws from the same clusters. Cosine similarity (FAISS
inner-product indexes on normalised rows), all through ``pml_plugins.knn``.

For every N in ``--sizes``:

* exact: FAISS flat (our ``KNNIndex(index="flat")``) on a subset of ``--exact-queries`` queries,
  its time extrapolated linearly to all ``--queries`` (exact search cost is linear in queries);
  PML's own ``FaissKNN`` on the same subset for N <= ``--pml-max-n`` (side by side);
* IVF (``nlist`` default 4 sqrt(N), trained on min(N, 64 nlist) random rows) for each
  ``--nprobe``: build time, search time of all queries (k = 10), and recall against exact on
  the subset: ``R@1`` = fraction of queries whose approximate top-1 is the exact top-1 (an
  exactly tied score counts), ``R@1 in top10`` = the exact top-1 is among the approximate 10,
  ``10-R@10`` = overlap of the two top-10 lists;
* HNSW (M = 32) for each ``--ef-search``, for N <= ``--hnsw-max-n``;
* PQ fast scan with exact re-ranking (``m`` = ``--pq-m``, default dim / 2) for each
  ``--pq-k-factor``;
* end to end: ``pml_plugins.AccuracyCalculator(knn_func=KNN("cosine", index=..., ...))`` on all
  queries against the N references (precision@1, Recall@{1,2,4,8}, nDCG@{2,4,8,10}, MAP@R,
  R-precision; ``k="max_bin_count"``), with ``--e2e-index`` (default ``auto``: the swept
  approximate configuration with R@1 >= 0.95 of least build + search time, else the one of
  highest R@1); its time includes building the index. The metrics are compared with the exact
  ones on the query subset.

Run (the numbers in docs/scale.md): ``nice python benchmarks/bench_knn_scale.py``; ``--quick`` for
a one-minute check (N = 20k, 100k; 10k queries).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import numpy as np
import torch

from pml_plugins.knn import KNN, KNNIndex, faiss_available
from pml_plugins.metrics import AccuracyCalculator

NDCG_KS = (2, 4, 8, 10)
RECALL_KS = (1, 2, 4, 8)
INCLUDE = (
    "precision_at_1",
    "mean_average_precision_at_r",
    "r_precision",
    *[f"recall_at_{k}" for k in RECALL_KS],
    *[f"ndcg_at_{k}" for k in NDCG_KS],
)


def clustered(n: int, q: int, dim: int, items_per_class: int, noise: float, seed: int = 0):
    """References and queries: Gaussian clusters on the unit sphere, labels = cluster ids."""
    rng = np.random.default_rng(seed)
    num_classes = max(1, n // items_per_class)
    centers = rng.standard_normal((num_classes, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)

    def draw(m: int):
        labels = rng.integers(num_classes, size=m)
        x = np.empty((m, dim), dtype=np.float32)
        for s in range(0, m, 100_000):  # blocks: no float64 temporaries of the whole set
            e = min(m, s + 100_000)
            x[s:e] = centers[labels[s:e]] + (noise / math.sqrt(dim)) * rng.standard_normal(
                (e - s, dim), dtype=np.float32
            )
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return torch.from_numpy(x), torch.from_numpy(labels)

    ref, ref_labels = draw(n)
    query, query_labels = draw(q)
    return ref, ref_labels, query, query_labels


def recall(approx_s, approx_i, exact_s, exact_i):
    """(R@1, exact top-1 in approximate top-10, 10-R@10) on the exact-search subset."""
    top1 = (approx_i[:, 0] == exact_i[:, 0]) | ((approx_s[:, 0] - exact_s[:, 0]).abs() <= 1e-6)
    in10 = (approx_i == exact_i[:, :1]).any(1)
    overlap = (approx_i[:, :10, None] == exact_i[:, None, :10]).any(2).float().mean(1)
    return float(top1.float().mean()), float(in10.float().mean()), float(overlap.mean())


class Capture:
    """Wraps a knn_func and keeps what it returned (the neighbours the calculator used)."""

    def __init__(self, knn_func):
        self.knn_func, self.result = knn_func, None

    def __call__(self, query, k, reference=None, ref_includes_query=False):
        self.result = self.knn_func(query, k, reference, ref_includes_query)
        return self.result


class Precomputed:
    """A knn_func returning a search done beforehand (to run the calculator on exact neighbours)."""

    def __init__(self, scores, indices):
        self.scores, self.indices = scores, indices

    def __call__(self, query, k, reference=None, ref_includes_query=False):
        return self.scores[:, :k], self.indices[:, :k]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def ivf_params(args: argparse.Namespace) -> dict:
    """The IVF build options given on the command line (nlist, train_size)."""
    return {name: value for name, value in (("nlist", args.nlist), ("train_size", args.train_size)) if value}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="numbers of references N")
    p.add_argument("--queries", type=int, default=100_000, help="queries searched per N (and evaluated end to end)")
    p.add_argument(
        "--exact-queries",
        type=int,
        default=10_000,
        help="queries of the exact-search subset (recall, extrapolated time)",
    )
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--items-per-class", type=int, default=100, help="references per cluster on average")
    p.add_argument("--noise", type=float, default=1.5, help="norm of the Gaussian noise around a unit centre")
    p.add_argument("--nlist", type=int, default=None, help="IVF cells (default 4 sqrt(N))")
    p.add_argument("--train-size", type=int, default=None, help="IVF k-means sample (default min(N, 64 nlist))")
    p.add_argument("--nprobe", type=int, nargs="*", default=[8, 16, 32, 64], help="IVF sweep (none: no IVF)")
    p.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--hnsw-max-n", type=int, default=100_000, help="largest N for HNSW (its build is slow on 2 cores)")
    p.add_argument(
        "--pml-max-n", type=int, default=100_000, help="largest N for PML's FaissKNN (exact, same cost as ours)"
    )
    p.add_argument(
        "--pq-k-factor",
        type=int,
        nargs="*",
        default=[4, 16, 64],
        help="PQ sweep: candidates re-ranked exactly per neighbour (none: no PQ)",
    )
    p.add_argument("--pq-m", type=int, default=None, help="PQ sub-quantizers (default dim / 2)")
    p.add_argument(
        "--e2e-index",
        choices=("auto", "ivf", "hnsw", "pq", "flat"),
        default="auto",
        help="index of the end-to-end run (flat: exact, for the baseline)",
    )
    p.add_argument(
        "--e2e-nprobe",
        type=int,
        default=None,
        help="IVF nprobe of the end-to-end run (default: smallest with R@1 >= 0.95)",
    )
    p.add_argument(
        "--e2e-ef-search",
        type=int,
        default=None,
        help="HNSW ef_search of the end-to-end run (default: smallest with R@1 >= 0.95)",
    )
    p.add_argument("--threads", type=int, default=None, help="FAISS / torch threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="N = 20k, 100k; 10k queries; 2k exact")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not faiss_available():
        raise SystemExit("this benchmark needs FAISS: pip install 'pml-plugins[cpu]'")
    import faiss

    if args.quick:
        args.sizes, args.queries, args.exact_queries = [20_000, 100_000], 10_000, 2_000
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    threads = args.threads or faiss.omp_get_max_threads()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} threads, "
        f"torch {torch.__version__}, faiss {faiss.__version__}, faiss GPUs {faiss.get_num_gpus()}"
    )
    print(
        f"data: {args.dim}-d clusters on the unit sphere, {args.items_per_class} refs/class, noise {args.noise}; "
        f"{args.queries} queries (exact subset {args.exact_queries})"
    )

    rows, e2e_rows = [], []
    for n in args.sizes:
        (ref, ref_labels, query, query_labels), gen_s = timed(
            lambda: clustered(n, args.queries, args.dim, args.items_per_class, args.noise, args.seed)
        )
        sub = min(args.exact_queries, args.queries)
        qs = query[:sub]
        k_eval = int(torch.bincount(ref_labels).max())  # max_bin_count: what MAP@R needs
        k_exact = max(10, k_eval, max(NDCG_KS))
        print(f"\nN = {n}: data {gen_s:.1f} s; exact search of {sub} queries, k = {k_exact}")
        flat, build_s = timed(lambda: KNNIndex(ref, metric="cosine", index="flat"))
        (ex_s, ex_i), search_s = timed(lambda: flat.search(qs, k_exact, progress=None))
        flat = None  # frees the index before the next size
        exact_per_query = (build_s + search_s) / sub
        exact_total = build_s + exact_per_query * args.queries
        rows.append(
            dict(
                n=n,
                method="exact flat (ours)",
                params="-",
                build=build_s,
                search=exact_total,
                note=f"measured on {sub} queries, x{args.queries / sub:g}",
                r1=1.0,
                in10=1.0,
                r10=1.0,
            )
        )
        if n <= args.pml_max_n:
            from pytorch_metric_learning.utils.inference import FaissKNN

            (_, pml_i), pml_s = timed(lambda: FaissKNN(index_init_fn=faiss.IndexFlatIP)(qs, k_exact, ref, False))
            rows.append(
                dict(
                    n=n,
                    method="exact PML FaissKNN",
                    params="IndexFlatIP",
                    build=float("nan"),
                    search=pml_s / sub * args.queries,
                    note=f"measured on {sub} queries",
                    r1=float((pml_i[:, 0] == ex_i[:, 0]).float().mean()),
                    in10=float("nan"),
                    r10=float("nan"),
                )
            )
        ivf_base, ivf_build = (
            (None, 0.0)
            if not args.nprobe
            else timed(lambda: KNNIndex(ref, metric="cosine", index="ivf", index_params=ivf_params(args)))
        )
        nlist, train_size = (0, 0) if ivf_base is None else (ivf_base.params["nlist"], ivf_base.params["train_size"])
        for nprobe in args.nprobe if ivf_base is not None else ():
            ivf_base.faiss_index.nprobe = min(nprobe, nlist)
            (a_s, a_i), s = timed(lambda: ivf_base.search(query, 10, progress=None))
            r1, in10, r10 = recall(a_s[:sub], a_i[:sub], ex_s, ex_i)
            rows.append(
                dict(
                    n=n,
                    method="IVF-Flat",
                    params=f"nlist={nlist} nprobe={nprobe}",
                    build=ivf_build,
                    search=s,
                    note=f"trained on {train_size} rows",
                    r1=r1,
                    in10=in10,
                    r10=r10,
                    index="ivf",
                    index_params={"nprobe": nprobe, **ivf_params(args)},
                )
            )
            print(f"  IVF nprobe={nprobe}: search {s:.1f} s, R@1 {r1:.4f}")
        ivf_base = None  # frees the index
        if n <= args.hnsw_max_n:
            hnsw, hnsw_build = timed(lambda: KNNIndex(ref, metric="cosine", index="hnsw", progress=None))
            for ef in args.ef_search:
                hnsw.params["ef_search"] = ef
                (a_s, a_i), s = timed(lambda: hnsw.search(query, 10, progress=None))
                r1, in10, r10 = recall(a_s[:sub], a_i[:sub], ex_s, ex_i)
                rows.append(
                    dict(
                        n=n,
                        method="HNSW-Flat",
                        params=f"M=32 ef_search={ef}",
                        build=hnsw_build,
                        search=s,
                        note="efConstruction 40",
                        r1=r1,
                        in10=in10,
                        r10=r10,
                        index="hnsw",
                        index_params={"ef_search": ef},
                    )
                )
                print(f"  HNSW ef_search={ef}: search {s:.1f} s, R@1 {r1:.4f}")
            del hnsw
        pq_build_params = {"m": args.pq_m} if args.pq_m else {}
        if args.pq_k_factor:
            pq, pq_build = timed(lambda: KNNIndex(ref, metric="cosine", index="pq", index_params=pq_build_params))
            for k_factor in args.pq_k_factor:
                pq.params["k_factor"] = k_factor
                (a_s, a_i), s = timed(lambda: pq.search(query, 10, progress=None))
                r1, in10, r10 = recall(a_s[:sub], a_i[:sub], ex_s, ex_i)
                rows.append(
                    dict(
                        n=n,
                        method="PQ fast scan + exact re-rank",
                        params=f"m={pq.params['m']} k_factor={k_factor}",
                        build=pq_build,
                        search=s,
                        note=f"4-bit codes, trained on {pq.params['train_size']} rows",
                        r1=r1,
                        in10=in10,
                        r10=r10,
                        index="pq",
                        index_params={**pq_build_params, "k_factor": k_factor},
                    )
                )
                print(f"  PQ k_factor={k_factor}: search {s:.1f} s, R@1 {r1:.4f}")
            del pq

        # end to end: our calculator with the approximate kNN, every query against the N references
        if args.e2e_index == "flat":
            e2e_index, params, label = "flat", {}, "exact flat"
        else:
            swept = [
                r
                for r in rows
                if r["n"] == n and "index" in r and (args.e2e_index == "auto" or r["index"] == args.e2e_index)
            ]
            if args.e2e_index == "ivf" and args.e2e_nprobe:
                swept = [r for r in swept if r["index_params"]["nprobe"] == args.e2e_nprobe] or [
                    dict(
                        index="ivf",
                        index_params={"nprobe": args.e2e_nprobe, **ivf_params(args)},
                        method="IVF-Flat",
                        params=f"nprobe={args.e2e_nprobe}",
                        r1=0.0,
                        build=0.0,
                        search=0.0,
                    )
                ]
            if args.e2e_index == "hnsw" and args.e2e_ef_search:
                swept = [
                    dict(
                        index="hnsw",
                        index_params={"ef_search": args.e2e_ef_search},
                        method="HNSW-Flat",
                        params=f"M=32 ef_search={args.e2e_ef_search}",
                        r1=0.0,
                        build=0.0,
                        search=0.0,
                    )
                ]
            if not swept:
                raise SystemExit(f"--e2e-index {args.e2e_index}: that index was not swept at N = {n}")
            good = [r for r in swept if r["r1"] >= 0.95]
            chosen = min(good, key=lambda r: r["build"] + r["search"]) if good else max(swept, key=lambda r: r["r1"])
            e2e_index, params, label = chosen["index"], chosen["index_params"], f"{chosen['method']} {chosen['params']}"
        calc = AccuracyCalculator(
            include=INCLUDE,
            k="max_bin_count",
            ndcg_ks=NDCG_KS,
            recall_ks=RECALL_KS,
            device="cpu",
            plugin_metrics=False,
            knn_func=Capture(KNN("cosine", index=e2e_index, index_params=params, progress=None)),
        )
        approx, e2e_s = timed(lambda: calc.get_accuracy(query, query_labels, ref, ref_labels, False))
        # the same metrics on the subset: exact neighbours vs the approximate ones the calculator used
        used_s, used_i = calc.knn_func.result
        e2e_r1 = recall(used_s[:sub], used_i[:sub], ex_s, ex_i)[0]
        subset_metrics = lambda s_, i_: AccuracyCalculator(
            include=INCLUDE,
            k="max_bin_count",
            ndcg_ks=NDCG_KS,
            recall_ks=RECALL_KS,
            device="cpu",
            plugin_metrics=False,
            knn_func=Precomputed(s_, i_),
        ).get_accuracy(qs, query_labels[:sub], ref, ref_labels, False)
        exact_sub, approx_sub = subset_metrics(ex_s, ex_i), subset_metrics(used_s[:sub], used_i[:sub])
        e2e_rows.append(
            dict(
                n=n,
                q=args.queries,
                index=label,
                r1=e2e_r1,
                seconds=e2e_s,
                exact_est=exact_total,
                approx=approx,
                exact_sub=exact_sub,
                approx_sub=approx_sub,
                sub=sub,
            )
        )
        print(f"  end to end ({args.queries} x {n}, {label}): {e2e_s:.1f} s, R@1 of the index {e2e_r1:.4f}")
        ref = query = None  # frees the data before the next size

    print("\n## kNN: approximate vs exact (k = 10, cosine, all queries; recall on the exact subset)\n")
    print(
        "| N | method | parameters | build (s) | search (s) | total (s) | vs exact | R@1 | R@1 in top10 | 10-R@10 "
        "| note |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        exact = next(x for x in rows if x["n"] == r["n"] and x["method"] == "exact flat (ours)")
        total = (0 if math.isnan(r["build"]) else r["build"]) + r["search"]
        exact_total = exact["build"] + exact["search"]
        fmt = lambda v: "-" if math.isnan(v) else f"{v:.4f}"
        build = "-" if math.isnan(r["build"]) else f"{r['build']:.1f}"
        print(
            f"| {r['n']:,} | {r['method']} | {r['params']} | {build} | {r['search']:.1f} | {total:.1f} | "
            f"{exact_total / total:.1f}x | {fmt(r['r1'])} | {fmt(r['in10'])} | {fmt(r['r10'])} | {r['note']} |"
        )

    print("\n## End to end: pml_plugins.AccuracyCalculator with approximate kNN\n")
    print(
        "| N refs | queries | kNN | R@1 of the index | time (s) | exact kNN alone, est. (s) | "
        + " | ".join(INCLUDE)
        + " |"
    )
    print("|---|---|---|---|---|---|" + "---|" * len(INCLUDE))
    for e in e2e_rows:
        print(
            f"| {e['n']:,} | {e['q']:,} | {e['index']} | {e['r1']:.4f} | {e['seconds']:.1f} | {e['exact_est']:.0f} | "
            + " | ".join(f"{e['approx'][m]:.4f}" for m in INCLUDE)
            + " |"
        )
    print("\nSame metrics on the exact subset, exact vs approximate neighbours (last row: largest |difference|):\n")
    print("| N refs | subset | kNN | metric | exact | approximate | difference |")
    print("|---|---|---|---|---|---|---|")
    for e in e2e_rows:
        worst = max(INCLUDE, key=lambda m: abs(e["exact_sub"][m] - e["approx_sub"][m]))
        for m in ("precision_at_1", "recall_at_1", "mean_average_precision_at_r", "ndcg_at_10", worst):
            print(
                f"| {e['n']:,} | {e['sub']:,} | {e['index']} | {m} | {e['exact_sub'][m]:.4f} "
                f"| {e['approx_sub'][m]:.4f} | "
                f"{e['approx_sub'][m] - e['exact_sub'][m]:+.4f} |"
            )


if __name__ == "__main__":
    main()
