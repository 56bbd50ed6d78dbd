"""Benchmark of the MPA family (pml-plugin-mpa) against PML's SoftTripleLoss and the bare matmul floor.

One forward + backward (gradients to embeddings and proxies) per timing, median of ``--repeats``
after warm-up, all rows measured side by side in one run. Rows per scale:

- ``matmul floor``: ``x @ w.T`` for x (B, d), w (C*K, d), backward with a fixed upstream
  gradient (the cost every K-proxy loss of these shapes pays at least);
- ``SoftTripleLoss`` (PML, centers_per_class=K); ``ProxyAnchorLoss`` (PML, one proxy per class);
- the three MPA losses (K proxies per class, tau = 0.2 so the regulariser is included).

Peak memory: the high-water mark of the bytes held by tensors allocated during one step,
estimated from ``torch.profiler``'s per-op memory records (CPU), or exactly by
``torch.cuda.max_memory_allocated`` (CUDA).

    python benchmarks/bench_mpa.py                 # SOP and CUB scale, CPU
    python benchmarks/bench_mpa.py --device cuda
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
from loss_timing import median_step_seconds, peak_step_bytes
from pytorch_metric_learning.losses import ProxyAnchorLoss, SoftTripleLoss

from pml_plugin_mpa import MultiProxyAnchorAPLoss, MultiProxyAnchorDWLoss, MultiProxyAnchorLoss

SCALES = {  # name: (B, d, C, K)
    "SOP (B=32, d=512, C=11318, K=10)": (32, 512, 11318, 10),
    "CUB (B=180, d=512, C=100, K=10)": (180, 512, 100, 10),
}


class MatmulFloor(torch.nn.Module):
    def __init__(self, num_classes: int, embedding_size: int, k: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(num_classes * k, embedding_size))
        self.upstream = None

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = x @ self.w.t()
        if self.upstream is None or self.upstream.shape != out.shape:
            self.upstream = torch.randn_like(out)
        return (out * self.upstream).sum()  # the backward is the two matmuls plus one B x CK mul


def run(device: str, repeats: int, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {repeats}")
    for scale, (b, d, c, k) in SCALES.items():
        torch.manual_seed(0)
        x = torch.randn(b, d, device=device, requires_grad=True)
        labels = torch.randint(c, (b,), device=device)
        makers: dict[str, Callable[[], torch.nn.Module]] = {
            "matmul floor (x @ w.T)": lambda: MatmulFloor(c, d, k),
            f"PML SoftTripleLoss (K={k})": lambda: SoftTripleLoss(c, d, centers_per_class=k),
            "PML ProxyAnchorLoss (K=1)": lambda: ProxyAnchorLoss(c, d),
            f"MPA (K={k})": lambda: MultiProxyAnchorLoss(c, d, proxies_per_class=k),
            f"MPA-DW (K={k})": lambda: MultiProxyAnchorDWLoss(c, d, proxies_per_class=k),
            f"MPA-AP (K={k})": lambda: MultiProxyAnchorAPLoss(c, d, proxies_per_class=k),
        }
        rows = []
        for name, make in makers.items():
            loss_fn = make().to(device)
            seconds = median_step_seconds(loss_fn, x, labels, repeats, device)
            peak = peak_step_bytes(loss_fn, x, labels, device)
            rows.append((name, seconds, peak))
            del loss_fn
        floor = rows[0][1]
        soft = rows[1][1]
        print(f"\n{scale}")
        print("| method | fwd+bwd ms | x floor | SoftTriple / this | peak MiB |")
        print("|---|---:|---:|---:|---:|")
        for name, seconds, peak in rows:
            print(
                f"| {name} | {seconds * 1e3:.1f} | {seconds / floor:.2f} | {soft / seconds:.2f} | {peak / 2**20:.1f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    run(args.device, args.repeats, args.threads)


if __name__ == "__main__":
    main()
