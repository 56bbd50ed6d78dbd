"""DMCAC's retrieval modes on a real (small) ViT: step time and peak memory of one training step.

* approximate: top-k per view over a refreshed, constant database (the paper's default);
* full (constant rows): every database row, no gradient into the encoder through them;
* full (database gradient): every row embedded by the current encoder in the step, the gradient
  reaching the encoder through every row (``DatabaseEncoder``, two passes, chunked).

    python benchmarks/bench_dmcac_full_retrieval.py [--device cuda] [--database 600] [--image-size 224]

CPU defaults are tiny (timm vit_tiny at 32 px) so it runs in a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pml_plugin_dmcac import DatabaseEncoder, DatabaseRefresher, DMCACLoss, make_embed_fn
from pml_plugins.pipeline.memory import PeakMemory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--queries", type=int, default=16, help="B (each is A rows)")
    parser.add_argument("--views", type=int, default=6)
    parser.add_argument("--database", type=int, default=200, help="D database images")
    parser.add_argument("--chunk", type=int, default=64, help="database images per chunk (refresh_batch_size)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import timm

    device = torch.device(args.device)
    torch.manual_seed(0)
    trunk = timm.create_model(args.model, num_classes=0, img_size=args.image_size, pretrained=False).to(device)
    width = trunk.num_features
    size = (3, args.image_size, args.image_size)
    database = torch.utils.data.TensorDataset(torch.randn(args.database, *size), torch.arange(args.database) % 50)
    x = torch.randn(args.queries * args.views, *size, device=device)
    labels = torch.arange(args.queries).repeat_interleave(args.views) % 50
    labels = labels.to(device)
    opt = torch.optim.AdamW(trunk.parameters(), lr=3e-5)
    print(
        f"{args.model} ({width}-d) at {args.image_size} px on {device}; B={args.queries} x A={args.views} "
        f"views, database D={args.database}, chunk {args.chunk}"
    )
    print("| retrieval | step (s) | peak memory (MiB) | memory kind |")
    print("|---|---:|---:|---|")
    for mode in ("approximate", "full (constant rows)", "full (database gradient)"):
        loss = DMCACLoss(
            num_classes=50,
            embedding_size=width,
            num_views=args.views,
            retrieval="approximate" if mode == "approximate" else "full",
        ).to(device)
        if mode == "full (database gradient)":
            loss.set_database_encoder(
                DatabaseEncoder(database, trunk, modules=[trunk], batch_size=args.chunk, device=device)
            )
        else:
            DatabaseRefresher(
                loss, database, make_embed_fn(trunk, None, device), batch_size=args.chunk, device=device, progress=False
            ).refresh()
        times = []
        mem = PeakMemory(device)
        with mem:
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                opt.zero_grad()
                loss(trunk(x), labels).backward()
                opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        print(f"| {mode} | {statistics.median(times):.3f} | {mem.peak_mb:.0f} | {mem.kind} |")


if __name__ == "__main__":
    main()
