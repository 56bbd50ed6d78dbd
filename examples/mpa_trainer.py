"""Train a tiny MLP on scikit-learn's digits with the MPA loss inside PML's MetricLossOnly trainer.

Classes 0-4 train, classes 5-9 test (class-disjoint retrieval). The proxies get their own
optimizer with the paper's proxy learning rate (1e-2); the paper's backbone lr is 1e-4 for a
pretrained network, here 1e-3 for an MLP trained from scratch. Runs in seconds on CPU.

    python examples/mpa_trainer.py [--loss multi_proxy_anchor_ap] [--epochs 3]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from pytorch_metric_learning import samplers, trainers
from pytorch_metric_learning.utils import common_functions as c_f
from sklearn.datasets import load_digits

import pml_plugins


def recall_at_1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        e = torch.nn.functional.normalize(model(x), dim=1)  # the loss's retrieval_distance: cosine
    sim = e @ e.t()
    sim.fill_diagonal_(-2.0)
    return (y[sim.argmax(1)] == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--loss",
        default="multi_proxy_anchor",
        choices=["multi_proxy_anchor", "multi_proxy_anchor_dw", "multi_proxy_anchor_ap"],
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--proxies-per-class", type=int, default=4)
    parser.add_argument("--embedding-size", type=int, default=4)
    args = parser.parse_args()

    torch.manual_seed(0)
    c_f.NUMPY_RANDOM = np.random.RandomState(0)  # PML's samplers draw from this
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train, test = y < 5, y >= 5
    x_tr, y_tr, x_te, y_te = x[train], y[train], x[test], y[test]

    trunk = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
    embedder = torch.nn.Linear(64, args.embedding_size)
    model = torch.nn.Sequential(trunk, embedder)
    loss = pml_plugins.create_loss(
        args.loss, num_classes=5, embedding_size=args.embedding_size, proxies_per_class=args.proxies_per_class
    )
    proxy_lr = pml_plugins.get_entry("loss", args.loss).spec.loss_lr  # 1e-2, the paper's
    optimizers = {
        "trunk_optimizer": torch.optim.AdamW(trunk.parameters(), lr=1e-3),
        "embedder_optimizer": torch.optim.AdamW(embedder.parameters(), lr=1e-3),
        "metric_loss_optimizer": torch.optim.AdamW(loss.parameters(), lr=proxy_lr),
    }
    print(f"Recall@1 before: {recall_at_1(model, x_te, y_te):.4f}")
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers=optimizers,
        batch_size=64,
        loss_funcs={"metric_loss": loss},
        dataset=torch.utils.data.TensorDataset(x_tr, y_tr),
        sampler=samplers.MPerClassSampler(y_tr, m=16, batch_size=64, length_before_new_iter=len(y_tr)),
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
    )
    trainer.train(num_epochs=args.epochs)
    print(f"Recall@1 after: {recall_at_1(model, x_te, y_te):.4f}")


if __name__ == "__main__":
    main()
