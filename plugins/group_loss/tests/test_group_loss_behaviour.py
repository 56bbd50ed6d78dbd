"""Behaviour on real data: training with the Group Loss improves class-disjoint Recall@1 on
scikit-learn's digits, and the PML-trainer example runs. Fixed seeds, CPU, a few seconds each."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits

from pml_plugin_group_loss import GroupLoss

REPO = Path(__file__).resolve().parents[3]
TEST_CLASSES = (0, 2, 5)  # train on the other 7 digits
EMBEDDING_SIZE, M = 4, 8


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and no contention with other tests
    yield
    torch.set_num_threads(threads)


def recall_at_1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        e = torch.nn.functional.normalize(model(x), dim=1)
    sim = e @ e.t()
    sim.fill_diagonal_(-2.0)  # leave-one-out
    return (y[sim.argmax(1)] == y).float().mean().item()


def train(seed: int, epochs: int = 6, **loss_kwargs) -> tuple[float, float]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    test = torch.isin(y, torch.tensor(TEST_CLASSES))
    x_tr, x_te, y_te = x[~test], x[test], y[test]
    y_tr = torch.unique(y[~test], return_inverse=True)[1]
    num_classes = int(y_tr.max()) + 1
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, EMBEDDING_SIZE))
    loss = GroupLoss(num_classes, EMBEDDING_SIZE, **loss_kwargs)
    opt = torch.optim.Adam(list(model.parameters()) + list(loss.parameters()), lr=1e-3)
    before = recall_at_1(model, x_te, y_te)
    g = torch.Generator().manual_seed(seed)
    by_class = [torch.nonzero(y_tr == c).flatten() for c in range(num_classes)]
    for _ in range(epochs * len(y_tr) // (num_classes * M)):
        # m-per-class batch in random order (the anchors are the first M of each class in batch order)
        idx = torch.cat([i[torch.randperm(len(i), generator=g)[:M]] for i in by_class])
        idx = idx[torch.randperm(len(idx), generator=g)]
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # proper batches must not warn
            out = loss(model(x_tr[idx]), y_tr[idx])
        out.backward()
        opt.step()
    return before, recall_at_1(model, x_te, y_te)


def test_training_improves_class_disjoint_recall(one_thread):
    # measured (R@1 before -> after, 6 epochs, T=2): with CE (default) seed 0 .598->.870, seed 1
    # .726->.836; the paper's loss (ce_weight=0) seed 0 .598->.840, seed 1 .726->.775
    for ce_weight in (1.0, 0.0):
        for seed in (0, 1):
            before, after = train(seed, temperature=2.0, ce_weight=ce_weight)
            assert after > before + 0.04, (ce_weight, seed, before, after)
    assert train(0, epochs=1, temperature=2.0) == train(0, epochs=1, temperature=2.0)  # deterministic


def test_digits_example_runs():
    env = dict(os.environ, PYTHONHASHSEED="0")
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "group_loss_trainer.py"), "--epochs", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("Recall@1")]
    before, after = (float(line.split()[-1]) for line in lines[:2])
    assert after > before + 0.1, out.stdout  # measured 0.5978 -> 0.8268 (4-D embeddings, 3 epochs)
