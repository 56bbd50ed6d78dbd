"""Behaviour: the paper's central claim (K > 1 proxies help when classes are multi-modal), and the
digits example in a PML trainer. Fixed seeds, CPU, a few seconds each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pml_plugin_mpa import MultiProxyAnchorLoss

NUM_CLASSES, NUISANCE, EMBEDDING_SIZE = 5, 5, 4
REPO = Path(__file__).resolve().parents[3]


def multimodal_data(seed: int, n_train: int = 30, n_test: int = 20):
    """Class c has two well-separated modes, +3 e_c and -3 e_c (noise 0.5), plus 5 nuisance dims
    (std 1.5) the model must learn to ignore. Through a bias-free linear embedding the two modes
    of a class stay antipodal, so one proxy per class cannot be close to both; two can."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(NUM_CLASSES) * 3.0
    centers, labels = torch.cat([eye, -eye]), torch.arange(NUM_CLASSES).repeat(2)

    def draw(n: int):
        x = centers.repeat_interleave(n, 0) + 0.5 * torch.randn(2 * NUM_CLASSES * n, NUM_CLASSES, generator=g)
        z = 1.5 * torch.randn(2 * NUM_CLASSES * n, NUISANCE, generator=g)
        return torch.cat([x, z], 1), labels.repeat_interleave(n)

    return draw(n_train), draw(n_test)


def recall_at_1(emb: torch.Tensor, labels: torch.Tensor) -> float:
    e = torch.nn.functional.normalize(emb, dim=1)
    sim = e @ e.t()
    sim.fill_diagonal_(-2.0)  # leave-one-out among the held-out samples
    return (labels[sim.argmax(1)] == labels).float().mean().item()


def train_recall(proxies_per_class: int, seed: int, epochs: int = 80) -> tuple[float, float]:
    (x_tr, y_tr), (x_te, y_te) = multimodal_data(seed)
    torch.manual_seed(seed)
    model = torch.nn.Linear(NUM_CLASSES + NUISANCE, EMBEDDING_SIZE, bias=False)
    loss = MultiProxyAnchorLoss(NUM_CLASSES, EMBEDDING_SIZE, proxies_per_class=proxies_per_class)
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": 5e-2}, {"params": loss.parameters(), "lr": 1e-1}])
    with torch.no_grad():
        before = recall_at_1(model(x_te), y_te)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y_tr), generator=g)
        for i in range(0, len(y_tr), 100):
            idx = perm[i : i + 100]
            opt.zero_grad()
            loss(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
    with torch.no_grad():
        return before, recall_at_1(model(x_te), y_te)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-for-bit deterministic and no contention with other tests
    yield
    torch.set_num_threads(threads)


def test_multiple_proxies_beat_one_on_multimodal_classes(one_thread):
    results = {seed: (train_recall(1, seed), train_recall(2, seed)) for seed in (0, 1, 5)}
    # measured (R@1 before -> after): seed 0: K=1 .43->.435, K=2 .43->.93; seed 1: .45->.375 / ->.87;
    # seed 5: .375->.44 / ->.96
    for seed, ((_, single), (before, multi)) in results.items():
        assert multi > single + 0.2, (seed, results[seed])
        assert multi > before + 0.2, (seed, results[seed])
    assert train_recall(2, 0) == results[0][1]  # deterministic


def test_digits_example_runs():
    env = dict(os.environ, PYTHONHASHSEED="0")
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "mpa_trainer.py"), "--epochs", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("Recall@1")]
    before, after = (float(line.split()[-1]) for line in lines[:2])
    assert after > before + 0.03, out.stdout  # measured 0.5045 -> 0.5770 (4-D embeddings, 3 epochs)
