"""Train a tiny MLP on scikit-learn's digits with the adaptive additive margin softmax inside PML's
MetricLossOnly trainer, then evaluate float and binarised ("bits") embeddings.

Classes 0-4 train, classes 5-9 test (class-disjoint retrieval). The class distances d (eq. 3)
come from a second "modality" of the training classes: by default the cosine distances of
their mean images (a stand-in for text that needs nothing installed); ``--class-distances FILE``
loads a precomputed C x C matrix (.npy/.pt/.txt/.csv), ``--class-texts FILE`` embeds one
description per line with the [text] extra, ``--distances none`` gives d = 0 (LMCL). The proxies
get their own optimizer at the registered loss_lr (the paper's 0.01). Runs in seconds on CPU.

    python examples/adaptive_margin_trainer.py [--epochs 3] [--distances none] [--class-texts five_lines.txt]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from pytorch_metric_learning import samplers, trainers
from pytorch_metric_learning.utils import common_functions as c_f
from sklearn.datasets import load_digits

import pml_plugins
from pml_plugin_adaptive_margin import binarize_embeddings, class_distances_from_embeddings


def recall_at_1(emb: torch.Tensor, y: torch.Tensor) -> float:
    e = torch.nn.functional.normalize(emb.float(), dim=1)  # the loss's retrieval_distance: cosine
    sim = e @ e.t()
    sim.fill_diagonal_(-2.0)  # leave-one-out among the test samples
    return (y[sim.argmax(1)] == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--embedding-size", type=int, default=6)  # small: raw digits are easy
    parser.add_argument("--distances", choices=["pixels", "none"], default="pixels")
    parser.add_argument("--class-distances", help="a precomputed 5 x 5 d matrix (.npy/.pt/.txt/.csv)")
    parser.add_argument("--class-texts", help="a text file with one description per training class (5 lines)")
    parser.add_argument("--margin", type=float, default=0.4)
    parser.add_argument("--scale", type=float, default=20.0)
    args = parser.parse_args()

    torch.manual_seed(0)
    c_f.NUMPY_RANDOM = np.random.RandomState(0)  # PML's samplers draw from this
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train, test = y < 5, y >= 5
    x_tr, y_tr, x_te, y_te = x[train], y[train], x[test], y[test]

    loss_args = {"margin": args.margin, "scale": args.scale}
    if args.class_texts:
        loss_args["class_texts"] = args.class_texts  # what `--loss-arg class_texts=FILE` does in the main job
    elif args.class_distances:
        loss_args["class_distances"] = args.class_distances
    elif args.distances == "pixels":
        class_means = torch.stack([x_tr[y_tr == c].mean(0) for c in range(5)])
        loss_args["class_distances"] = class_distances_from_embeddings(class_means, metric="cosine", normalize="half")
    loss = pml_plugins.create_loss(
        "adaptive_margin_softmax", num_classes=5, embedding_size=args.embedding_size, **loss_args
    )
    if loss.class_distances is not None:
        print("class distances d (train classes 0-4):")
        print(np.array2string(loss.class_distances.numpy(), precision=2))

    trunk = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
    embedder = torch.nn.Linear(64, args.embedding_size)
    model = torch.nn.Sequential(trunk, embedder)
    proxy_lr = pml_plugins.get_entry("loss", "adaptive_margin_softmax").spec.loss_lr
    optimizers = {
        "trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=1e-3),
        "embedder_optimizer": torch.optim.Adam(embedder.parameters(), lr=1e-3),
        "metric_loss_optimizer": torch.optim.Adam(loss.parameters(), lr=proxy_lr),
    }
    with torch.no_grad():
        before = model(x_te)
    print(f"Recall@1 before: {recall_at_1(before, y_te):.4f}")
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers=optimizers,
        batch_size=64,
        loss_funcs={"metric_loss": loss},
        dataset=torch.utils.data.TensorDataset(x_tr, y_tr),
        # the paper's class-balanced batches (k = 5 images per class there; 16 here)
        sampler=samplers.MPerClassSampler(y_tr, m=16, batch_size=64, length_before_new_iter=len(y_tr)),
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
    )
    trainer.train(num_epochs=args.epochs)
    with torch.no_grad():
        after = model(x_te)
    print(f"Recall@1 after: {recall_at_1(after, y_te):.4f}")
    # the paper's "bits" rows: parameter-free LayerNorm, threshold at 0; cosine on ±1 codes ranks by Hamming
    print(f"Recall@1 after, {args.embedding_size} bits: {recall_at_1(binarize_embeddings(after), y_te):.4f}")


if __name__ == "__main__":
    main()
