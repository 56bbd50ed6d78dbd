"""DMCAC: time per training step vs database size (d = 384), approximate retrieval with exact
and IVF indexes, side by side with PML's NormalizedSoftmaxLoss on the same model and batch.

    python benchmarks/bench_dmcac.py                 # 10k, 100k, 1M rows (about 5 min on 2 cores)
    python benchmarks/bench_dmcac.py --sizes 10000   # quick

A step = model forward + loss (retrieval, union, eq. 9-19) + backward + optimiser step, on
B queries x A views of synthetic clustered 384-d features through a 384x384 linear encoder
(deliberately cheap, so the retrieval share is a worst case: a ViT-S step on 224px images costs
seconds on CPU). Retrieval modes:

* ``knn layer``: ``pml_plugins.knn.knn_search`` on the held database each step (FAISS flat,
  index rebuilt per call: the default when ``set_database`` gets no index);
* ``flat index``: a FAISS ``IndexFlatIP`` built once per database refresh (exact);
* ``ivf index``: a FAISS ``IndexIVFFlat`` built once per refresh (nprobe 16);
* ``full``: ``retrieval="full"`` (every database row, eq. 6), only where it fits.

Columns: median step time, the retrieval (top-k search) part of it, the index build time
(paid once per refresh, not per step), IVF recall of the exact top-k, and the ratio to the
NormalizedSoftmaxLoss step. Memory: the database is D x 384 float32 (1.5 GB at 1M rows); the
FAISS flat/IVF indexes hold one more copy; per step DMCAC allocates B x A x |S| x 384 floats of
gathered rows (|S| <= A k) plus the B*A x |S| similarity and attention maps (a few MB here).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from pytorch_metric_learning.losses import NormalizedSoftmaxLoss

from pml_plugin_dmcac import DMCACLoss, build_faiss_index
from pml_plugin_dmcac.retrieval import cosine_topk

DIM, CLASSES = 384, 1000


def clustered(n: int, centers: torch.Tensor, g: torch.Generator, noise: float = 0.8):
    labels = torch.randint(len(centers), (n,), generator=g)
    out = torch.empty(n, DIM)
    for s in range(0, n, 100_000):  # chunked: bounded temporary memory at 1M rows
        lab = labels[s : s + 100_000]
        out[s : s + len(lab)] = centers[lab] + noise * torch.randn(len(lab), DIM, generator=g) / DIM**0.5
    return torch.nn.functional.normalize(out, dim=1), labels


def time_steps(loss, model, x, y, steps: int, warmup: int = 1) -> float:
    opt = torch.optim.SGD(list(model.parameters()) + list(loss.parameters()), lr=1e-3)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        value = loss(model(x), y)
        opt.zero_grad()
        value.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_retrieval(queries, db, index, k, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        cosine_topk(queries, db, k, index=index)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=64, help="B, queries per batch")
    parser.add_argument("--views", type=int, default=6, help="A (the paper's 6)")
    parser.add_argument("--k", type=int, default=12, help="top-k per view (the paper's 12)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--full-max", type=int, default=100_000, help="largest database for retrieval='full'")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(CLASSES, DIM, generator=g)
    B, A = args.queries, args.views
    x_lab = torch.randint(CLASSES, (B,), generator=g)
    x = torch.nn.functional.normalize(
        centers[x_lab].repeat_interleave(A, 0) + 0.8 * torch.randn(B * A, DIM, generator=g) / DIM**0.5, dim=1
    )
    y = x_lab.repeat_interleave(A)
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, DIM)
    with torch.no_grad():
        model.weight.copy_(torch.eye(DIM) + 0.01 * torch.randn(DIM, DIM))
        model.bias.zero_()
    baseline = time_steps(NormalizedSoftmaxLoss(CLASSES, DIM), model, x, y, args.steps)
    print(f"torch threads {torch.get_num_threads()}, B={B} queries x A={A} views = {B * A} rows, k={args.k}, d={DIM}")
    print(f"PML NormalizedSoftmaxLoss step (same model and batch): {baseline * 1e3:.1f} ms\n")
    header = (
        "| database rows | retrieval | step (ms) | top-k search (ms) | index build (s) | IVF recall@k | x NormSoftmax |"
    )
    print(header)
    print("|" + "---|" * 7)
    for n in args.sizes:
        db, db_labels = clustered(n, centers, g)
        with torch.no_grad():
            views = model(x)
        exact_idx, _ = cosine_topk(views, db, args.k)
        modes = [("knn layer", None), ("flat index", "flat"), ("ivf index", "ivf")]
        if n <= args.full_max:
            modes.append(("full", "full"))
        for name, kind in modes:
            loss = DMCACLoss(CLASSES, DIM, num_views=A, k=args.k, retrieval="full" if kind == "full" else "approximate")
            build = 0.0
            index = None
            if kind in ("flat", "ivf"):
                t0 = time.perf_counter()
                nlist = None if n < 200_000 else 1024  # 4 sqrt(N) = 4000 cells would be slow to train on 2 cores
                index = build_faiss_index(db, kind=kind, nlist=nlist, nprobe=args.nprobe, train_size=50_000)
                build = time.perf_counter() - t0
            loss.set_database(db, db_labels, index=index)
            step = time_steps(loss, model, x, y, args.steps)
            search = 0.0 if kind == "full" else time_retrieval(views, db, index, args.k, args.steps)
            recall = "-"
            if kind == "ivf":
                got, ok = cosine_topk(views, db, args.k, index=index)
                hits = (got[:, :, None] == exact_idx[:, None, :]).any(1) & ok.any(1, keepdim=True)
                recall = f"{float(hits.float().mean()):.3f}"
            print(
                f"| {n:,} | {name} | {step * 1e3:.1f} | {search * 1e3:.1f} | {build:.1f} | {recall} "
                f"| {step / baseline:.1f} |",
                flush=True,
            )
            del loss, index
        del db, db_labels


if __name__ == "__main__":
    main()
