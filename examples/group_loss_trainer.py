"""Train a tiny MLP on scikit-learn's digits with the Group Loss inside PML's MetricLossOnly trainer.

Classes 1, 3, 4, 6, 7, 8, 9 train, classes 0, 2, 5 test (class-disjoint retrieval). Batches are
m-per-class (``MPerClassSampler``, 7 classes x 8 samples, 2 anchors per class) as the loss needs. The
classifier layer of the loss gets its own optimizer. The paper trains a pretrained network with
lr 2e-4 and T = 24 (CUB); an MLP trained from scratch has small logits, so this example uses
lr 1e-3 for both and a lower temperature (--temperature). Runs in seconds on CPU.

    python examples/group_loss_trainer.py [--epochs 3] [--temperature 2] [--ce-weight 1]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from pytorch_metric_learning import samplers, trainers
from pytorch_metric_learning.utils import common_functions as c_f
from sklearn.datasets import load_digits

import pml_plugins

TEST_CLASSES = (0, 2, 5)


def recall_at_1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        e = torch.nn.functional.normalize(model(x), dim=1)  # the loss's retrieval_distance: cosine
    sim = e @ e.t()
    sim.fill_diagonal_(-2.0)
    return (y[sim.argmax(1)] == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--embedding-size", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--num-anchors", type=int, default=2)
    parser.add_argument("--num-iterations", type=int, default=1)
    parser.add_argument("--ce-weight", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    c_f.NUMPY_RANDOM = np.random.RandomState(0)  # PML's samplers draw from this
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    test = torch.isin(y, torch.tensor(TEST_CLASSES))
    x_tr, y_tr, x_te, y_te = x[~test], y[~test], x[test], y[test]
    y_tr = torch.unique(y_tr, return_inverse=True)[1]  # labels 0..6 for the 7-way classifier

    trunk = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
    embedder = torch.nn.Linear(64, args.embedding_size)
    model = torch.nn.Sequential(trunk, embedder)
    loss = pml_plugins.create_loss(
        "group_loss",
        num_classes=7,
        embedding_size=args.embedding_size,
        temperature=args.temperature,
        num_anchors=args.num_anchors,
        num_iterations=args.num_iterations,
        ce_weight=args.ce_weight,
    )
    optimizers = {
        "trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=args.lr),
        "embedder_optimizer": torch.optim.Adam(embedder.parameters(), lr=args.lr),
        "metric_loss_optimizer": torch.optim.Adam(loss.parameters(), lr=args.lr),  # the classifier
    }
    print(f"Recall@1 before: {recall_at_1(model, x_te, y_te):.4f}")
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers=optimizers,
        batch_size=56,
        loss_funcs={"metric_loss": loss},
        dataset=torch.utils.data.TensorDataset(x_tr, y_tr),
        sampler=samplers.MPerClassSampler(y_tr, m=8, batch_size=56, length_before_new_iter=len(y_tr)),
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
    )
    trainer.train(num_epochs=args.epochs)
    print(f"Recall@1 after: {recall_at_1(model, x_te, y_te):.4f}")


if __name__ == "__main__":
    main()
