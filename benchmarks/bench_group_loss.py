"""Benchmark of GroupLoss (pml-plugin-group-loss) next to PML's NormalizedSoftmaxLoss.

One forward + backward (gradients to embeddings and to the loss's classifier / class weights) per
timing, median of ``--repeats`` after warm-up, all rows measured side by side in one run.
Batches are m-per-class: n = 60 = 10 classes x 6 samples, d = 512, at C = 100 (CUB-sized
classifier) and C = 11,318 (SOP). Rows per scale:

- ``PML NormalizedSoftmaxLoss`` (the reference: one n x C logit matrix and a cross-entropy);
- ``GroupLoss`` defaults (T = 24, 2 anchors, 1 replicator iteration, CE term);
- ``GroupLoss`` with 3 iterations, and with ``ce_weight=0`` (the paper's loss alone).

Peak memory: the high-water mark of the bytes held by tensors allocated during one step,
estimated from ``torch.profiler``'s per-op memory records (CPU), or exactly by
``torch.cuda.max_memory_allocated`` (CUDA). GroupLoss holds O(n^2 + n C) per iteration: W (n x n)
and a few n x C matrices (logits, prior, X * Pi, X(t+1)).

    python benchmarks/bench_group_loss.py              # CPU
    python benchmarks/bench_group_loss.py --device cuda
"""

from __future__ import annotations

import argparse
import warnings
from typing import Callable

import torch
from loss_timing import median_step_seconds, peak_step_bytes
from pytorch_metric_learning.losses import NormalizedSoftmaxLoss

from pml_plugin_group_loss import GroupLoss

N_CLASSES_PER_BATCH, M, D = 10, 6, 512
SCALES = {"C = 100": 100, "C = 11,318": 11318}


def run(device: str, repeats: int, threads: int | None) -> None:
    warnings.simplefilter("ignore")
    if threads:
        torch.set_num_threads(threads)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(
        f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, median of {repeats}"
    )
    n = N_CLASSES_PER_BATCH * M
    for scale, c in SCALES.items():
        torch.manual_seed(0)
        x = torch.randn(n, D, device=device, requires_grad=True)
        labels = torch.randperm(c)[:N_CLASSES_PER_BATCH].repeat_interleave(M)
        labels = labels[torch.randperm(n)].to(device)
        makers: dict[str, Callable[[], torch.nn.Module]] = {
            "PML NormalizedSoftmaxLoss": lambda: NormalizedSoftmaxLoss(c, D),
            "GroupLoss (defaults: 1 iteration, CE)": lambda: GroupLoss(c, D),
            "GroupLoss (3 iterations)": lambda: GroupLoss(c, D, num_iterations=3),
            "GroupLoss (ce_weight=0)": lambda: GroupLoss(c, D, ce_weight=0.0),
        }
        rows = []
        for label, make in makers.items():
            loss_fn = make().to(device)
            rows.append(
                (
                    label,
                    median_step_seconds(loss_fn, x, labels, repeats, device, warmup=3),
                    peak_step_bytes(loss_fn, x, labels, device),
                )
            )
            del loss_fn
        ref_t, ref_m = rows[0][1], rows[0][2]
        print(f"\nn = {n} ({N_CLASSES_PER_BATCH} classes x {M}), d = {D}, {scale}")
        print("| loss | fwd+bwd ms | x NormSoftmax time | peak MiB | x NormSoftmax memory |")
        print("|---|---:|---:|---:|---:|")
        for label, seconds, peak in rows:
            print(
                f"| {label} | {seconds * 1e3:.2f} | {seconds / ref_t:.2f} | {peak / 2**20:.2f} | {peak / ref_m:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    run(args.device, args.repeats, args.threads)


if __name__ == "__main__":
    main()
