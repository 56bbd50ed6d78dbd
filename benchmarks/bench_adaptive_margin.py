"""Benchmark of the adaptive additive margin softmax (pml-plugin-adaptive-margin) against PML's
CosFaceLoss and NormalizedSoftmaxLoss, all rows measured side by side in one run.

One forward + backward (gradients to embeddings and proxies) per timing, median of ``--repeats``
after warm-up. Rows per scale:

- ``PML NormalizedSoftmaxLoss`` (eq. 1) and ``PML CosFaceLoss`` (eq. 2, LMCL), the baselines;
- ``AdaptiveMarginSoftmaxLoss`` with d = None (eq. 2: the same function as CosFaceLoss);
- ``AdaptiveMarginSoftmaxLoss`` with a dense C x C d (eq. 3): adds the gather of B rows of d and
  two B x C element-wise ops.

Peak memory: the high-water mark of the bytes held by tensors allocated during one step,
estimated from ``torch.profiler``'s per-op memory records (CPU), or exactly by
``torch.cuda.max_memory_allocated`` (CUDA). The d buffer itself (C^2 * 4 bytes) is allocated
before the step and listed in its own column.

    python benchmarks/bench_adaptive_margin.py                 # CPU
    python benchmarks/bench_adaptive_margin.py --device cuda
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
from loss_timing import median_step_seconds, peak_step_bytes
from pytorch_metric_learning.losses import CosFaceLoss, NormalizedSoftmaxLoss

from pml_plugin_adaptive_margin import AdaptiveMarginSoftmaxLoss

SCALES = {  # name: (B, D, C)
    "CUB-like (B=180, D=512, C=100)": (180, 512, 100),
    "In-Shop (B=75, D=2048, C=3997)": (75, 2048, 3997),
    "SOP (B=75, D=512, C=11318)": (75, 512, 11318),
}


def _random_d(c: int, device: str) -> torch.Tensor:
    a = torch.rand(c, c, device=device)
    return ((a + a.t()) / 2).fill_diagonal_(0)


def run(device: str, repeats: int, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(
        f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, median of {repeats}"
    )
    for scale, (b, dim, c) in SCALES.items():
        torch.manual_seed(0)
        x = torch.randn(b, dim, device=device, requires_grad=True)
        labels = torch.randint(c, (b,), device=device)
        d = _random_d(c, device)
        makers: dict[str, Callable[[], torch.nn.Module]] = {
            "PML NormalizedSoftmaxLoss (T=0.05)": lambda: NormalizedSoftmaxLoss(c, dim, temperature=0.05),
            "PML CosFaceLoss (m=0.4, s=20)": lambda: CosFaceLoss(c, dim, margin=0.4, scale=20.0),
            "adaptive margin, d = None": lambda: AdaptiveMarginSoftmaxLoss(c, dim),
            "adaptive margin, dense d": lambda: AdaptiveMarginSoftmaxLoss(c, dim, class_distances=d.cpu()),
        }
        rows = []
        for row, make in makers.items():
            loss_fn = make().to(device)
            seconds = median_step_seconds(loss_fn, x, labels, repeats, device)
            peak = peak_step_bytes(loss_fn, x, labels, device)
            d_bytes = sum(buf.numel() * buf.element_size() for buf in loss_fn.buffers())
            rows.append((row, seconds, peak, d_bytes))
            del loss_fn
        cosface = rows[1][1]
        print(f"\n{scale}")
        print("| method | fwd+bwd ms | / CosFace | step peak MiB | d buffer MiB |")
        print("|---|---:|---:|---:|---:|")
        for row, seconds, peak, d_bytes in rows:
            print(
                f"| {row} | {seconds * 1e3:.2f} | {seconds / cosface:.2f} | {peak / 2**20:.1f} "
                f"| {d_bytes / 2**20:.1f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    run(args.device, args.repeats, args.threads)


if __name__ == "__main__":
    main()
