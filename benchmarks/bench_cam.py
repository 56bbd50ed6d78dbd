"""Benchmark: CAM loss forward+backward time and peak memory next to PML's ProxyAnchorLoss.

Each (loss, t, device) runs in a fresh subprocess so that peak memory is its own:
CUDA -> ``torch.cuda.max_memory_allocated`` above the memory held before the first call;
CPU -> growth of the process's peak RSS (``resource.getrusage``) over the same window.
"CAM naive" is eq. 1-4 written with plain autograd over the full t x t distance matrix
(what the chunked repeller avoids); it is skipped where it would not fit.

    python benchmarks/bench_cam.py                    # t = 100 and 11,318, CPU (+ CUDA if present)
    python benchmarks/bench_cam.py --devices cpu --classes 100
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

LOSSES = ("cam", "cam_naive", "proxy_anchor")
LABELS = {"cam": "CAM (this plugin)", "cam_naive": "CAM naive autograd", "proxy_anchor": "PML ProxyAnchorLoss"}


def naive_cam(emb, labels, anchors, margin=2.0, min_norm=1.0):
    """Eq. 1-4 with autograd over the whole t x t matrix (reference for cost only)."""
    import torch

    l_a = 0.5 * ((emb - anchors[labels]) ** 2).sum(1).mean()
    sq = (anchors * anchors).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * anchors @ anchors.T).clamp_min(1e-12)
    off = ~torch.eye(len(anchors), dtype=torch.bool, device=anchors.device)
    l_r = 0.5 * ((2 * margin - d2.sqrt()).clamp_min(0) ** 2 * off).sum()
    l_n = 0.5 * ((min_norm - anchors.norm(dim=1)).clamp_min(0) ** 2).sum()
    return l_a + l_r + l_n


def worker(name: str, t: int, device: str, batch: int, dim: int, reps: int) -> dict:
    import torch
    from pytorch_metric_learning.losses import ProxyAnchorLoss

    from pml_plugin_cam import ClassAnchorMarginLoss

    torch.manual_seed(0)
    emb = torch.randn(batch, dim, device=device, requires_grad=True)
    labels = torch.randint(t, (batch,), device=device)
    if name == "proxy_anchor":
        loss = ProxyAnchorLoss(t, dim).to(device)
        step = lambda: loss(emb, labels)
    else:
        loss = ClassAnchorMarginLoss(t, dim).to(device)
        step = (lambda: loss(emb, labels)) if name == "cam" else (lambda: naive_cam(emb, labels, loss.anchors))

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def once():
        emb.grad = None
        loss.zero_grad(set_to_none=True)
        step().backward()

    sync()
    if device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    once()  # the first call also counts for the memory peak
    sync()
    peak = (
        torch.cuda.max_memory_allocated() - base
        if device == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    )
    once()  # warm-up
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - start)
    return {"ms": 1e3 * statistics.median(times), "peak_mib": peak / 2**20}


def run_one(name: str, t: int, device: str, args) -> dict | None:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        name,
        str(t),
        device,
        "--batch",
        str(args.batch),
        "--dim",
        str(args.dim),
        "--reps",
        str(args.reps),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  [{name} t={t} {device} failed: {tail[:120]}]", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 11318])
    parser.add_argument("--devices", nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument(
        "--naive-max-classes", type=int, default=20000, help="skip the naive variant above this t (its t x t matrices)"
    )
    parser.add_argument("--worker", nargs=3, metavar=("LOSS", "T", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, t, device = args.worker
        print(json.dumps(worker(name, int(t), device, args.batch, args.dim, args.reps)))
        return

    import torch

    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    print(
        f"torch {torch.__version__}, batch {args.batch}, embedding {args.dim}, median of {args.reps} fwd+bwd, "
        f"CPU threads {torch.get_num_threads()}"
        + (f", GPU {torch.cuda.get_device_name()}" if "cuda" in devices else "")
    )
    print()
    print("| device | t | loss | fwd+bwd ms | peak MiB | time / ProxyAnchor | memory / ProxyAnchor |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for device in devices:
        for t in args.classes:
            results = {}
            for name in LOSSES:
                if name == "cam_naive" and t > args.naive_max_classes:
                    continue
                results[name] = run_one(name, t, device, args)
            ref = results.get("proxy_anchor")
            for name, r in results.items():
                if r is None:
                    print(f"| {device} | {t:,} | {LABELS[name]} | failed | | | |")
                    continue
                ratio_t = f"{r['ms'] / ref['ms']:.2f}x" if ref else "-"
                ratio_m = f"{r['peak_mib'] / ref['peak_mib']:.2f}x" if ref and ref["peak_mib"] > 0 else "-"
                print(
                    f"| {device} | {t:,} | {LABELS[name]} | {r['ms']:.2f} | {r['peak_mib']:.1f} "
                    f"| {ratio_t} | {ratio_m} |"
                )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
