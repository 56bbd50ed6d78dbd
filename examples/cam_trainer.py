"""Train a small MLP on scikit-learn's digits with the CAM loss inside PML's MetricLossOnly trainer.

Retrieval is evaluated as in the paper (CBIR on held-out images of the training classes, L2
nearest neighbours) with PML's AccuracyCalculator, before and after training. Runs in a few
seconds on CPU::

    python examples/cam_trainer.py --epochs 8
"""

from __future__ import annotations

import argparse
import logging

import torch
from pytorch_metric_learning import trainers
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from sklearn.datasets import load_digits

import pml_plugins


def digits_split(seed: int = 0):
    """Half of every digit class for training, the other half as the retrieval set."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    train = torch.rand(len(y), generator=torch.Generator().manual_seed(seed)) < 0.5
    return (x[train], y[train]), (x[~train], y[~train])


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """precision@1 (= Recall@1) and MAP@R with L2 nearest neighbours (FAISS IndexFlatL2 in PML)."""
    model.eval()
    emb = model(x)
    model.train()
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count")
    return calc.get_accuracy(emb, y, emb, y, ref_includes_query=True)


def main(epochs: int = 8, embedding_size: int = 4, seed: int = 0, loss_lr: float | None = None) -> dict:
    torch.manual_seed(seed)
    (x_train, y_train), (x_test, y_test) = digits_split(seed)
    trunk = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
    embedder = torch.nn.Linear(64, embedding_size)  # plain (not normalised) embeddings: CAM is L2
    model = torch.nn.Sequential(trunk, embedder)
    loss = pml_plugins.create_loss("cam", num_classes=10, embedding_size=embedding_size)  # m = 2, p = 1
    needs = pml_plugins.get_entry("loss", "cam").needs()
    assert needs["loss_optimizer"] and needs["retrieval_distance"] == "euclidean"
    # the paper trains everything with Adam at 1e-3; on 900 digits a faster anchor lr converges in seconds
    loss_lr = loss_lr if loss_lr is not None else 30 * needs["loss_lr"]
    optimizers = {
        "trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=3e-3),
        "embedder_optimizer": torch.optim.Adam(embedder.parameters(), lr=3e-3),
        "metric_loss_optimizer": torch.optim.Adam(loss.parameters(), lr=loss_lr),
    }
    before = evaluate(model, x_test, y_test)
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers=optimizers,
        batch_size=64,
        loss_funcs={"metric_loss": loss},
        dataset=torch.utils.data.TensorDataset(x_train, y_train),
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
    )
    trainer.train(num_epochs=epochs)
    after = evaluate(model, x_test, y_test)
    with torch.no_grad():  # nearest-anchor classification through get_logits
        anchor_acc = float((loss.get_logits(model(x_test)).argmax(1) == y_test).float().mean())
    return {"before": before, "after": after, "nearest_anchor_accuracy": anchor_acc}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--embedding-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on busy machines)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("PML").setLevel(logging.WARNING)
    result = main(args.epochs, args.embedding_size, args.seed)
    for stage in ("before", "after"):
        r = result[stage]
        print(
            f"{stage:6s} precision_at_1={r['precision_at_1']:.4f} "
            f"mean_average_precision_at_r={r['mean_average_precision_at_r']:.4f}"
        )
    print(f"nearest_anchor_accuracy={result['nearest_anchor_accuracy']:.4f}")
