"""pml_plugins.AccuracyCalculator in use: PML's tester on digits, `pml-plugins evaluate`, plugin metrics."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from pytorch_metric_learning.testers import GlobalEmbeddingSpaceTester
from pytorch_metric_learning.utils import accuracy_calculator as pml_ac
from sklearn.datasets import load_digits

import pml_plugins
from pml_plugins import AccuracyCalculator
from pml_plugins.cli import main

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(0)
    projection = torch.randn(64, 24, generator=g, dtype=torch.float64)  # float embeddings: no distance ties
    return (torch.tensor(x) @ projection).float(), torch.tensor(y)


def test_global_embedding_space_tester_on_digits(digits):
    x, y = digits
    dataset = torch.utils.data.TensorDataset(x, y)
    # k as PML's below (its default k=None, in a tester: tests/test_metrics_default_k.py)
    calculator = AccuracyCalculator(device=CPU, plugin_metrics=False, exclude=("NMI", "AMI"), k="max_bin_count")
    tester = GlobalEmbeddingSpaceTester(
        accuracy_calculator=calculator, dataloader_num_workers=0, batch_size=512, data_device=CPU
    )
    results = tester.test({"val": dataset}, 0, torch.nn.Identity())["val"]
    for key in (
        "precision_at_1_level0",
        "mean_average_precision_at_r_level0",
        "ndcg_at_2_level0",
        "ndcg_at_100_level0",
        "recall_at_8_level0",
    ):
        assert 0 < results[key] <= 1, key
    assert results["recall_at_1_level0"] == results["precision_at_1_level0"]
    assert results["recall_at_8_level0"] >= results["recall_at_4_level0"] >= results["recall_at_1_level0"]
    # the same numbers as PML's own calculator in the same tester
    pml_tester = GlobalEmbeddingSpaceTester(
        accuracy_calculator=pml_ac.AccuracyCalculator(device=CPU, k="max_bin_count", exclude=("NMI", "AMI")),
        dataloader_num_workers=0,
        batch_size=512,
        data_device=CPU,
    )
    expected = pml_tester.test({"val": dataset}, 0, torch.nn.Identity())["val"]
    for key, value in expected.items():
        if key != "epoch":
            assert results[key] == pytest.approx(value, abs=1e-6 if "reciprocal" in key else 1e-12), key


def _save(tmp_path, name, array):
    path = tmp_path / f"{name}.npy"
    np.save(path, array)
    return str(path)


def test_evaluate_command_json(tmp_path, digits, capsys):
    x, y = digits
    e = _save(tmp_path, "e", x.numpy())
    lab = _save(tmp_path, "l", y.numpy())
    assert (
        main(
            [
                "evaluate",
                "--embeddings",
                e,
                "--labels",
                lab,
                "--json",
                "--exclude",
                "NMI",
                "AMI",
                "--ndcg-ks",
                "4",
                "10",
                "--recall-ks",
                "1",
                "5",
                "--no-plugin-metrics",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    expected = AccuracyCalculator(
        device=CPU, ndcg_ks=(4, 10), recall_ks=(1, 5), plugin_metrics=False, exclude=("NMI", "AMI")
    ).get_accuracy(x, y)
    assert out["metrics"] == pytest.approx(expected, abs=1e-12)
    assert out["num_queries"] == out["num_references"] == len(x) and out["ref_includes_query"] is True
    # a separate reference set, cosine ranking, labels stored as floats
    q = _save(tmp_path, "q", x[:300].numpy())
    ql = _save(tmp_path, "ql", y[:300].numpy())
    r = _save(tmp_path, "r", x[300:].numpy())
    rl = _save(tmp_path, "rl", y[300:].numpy().astype(np.float32))
    assert (
        main(
            [
                "evaluate",
                "--embeddings",
                q,
                "--labels",
                ql,
                "--reference",
                r,
                "--reference-labels",
                rl,
                "--distance",
                "cosine",
                "--json",
                "--include",
                "precision_at_1",
                "ndcg_at_8",
                "--ndcg-ks",
                "8",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert set(out["metrics"]) == {"precision_at_1", "ndcg_at_8"} and out["num_references"] == len(x) - 300


def test_evaluate_command_errors(tmp_path, capsys):
    e = _save(tmp_path, "e", np.zeros((4, 3), dtype=np.float32))
    bad = _save(tmp_path, "bad", np.zeros(5))
    assert main(["evaluate", "--embeddings", e, "--labels", bad]) == 2
    assert "same length" in capsys.readouterr().err
    assert main(["evaluate", "--embeddings", e, "--labels", str(tmp_path / "missing.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--embeddings", e, "--labels", bad, "--reference", e]) == 2
    assert "go together" in capsys.readouterr().err


def test_evaluate_command_end_to_end_table(tmp_path, run_cli):
    g = np.random.default_rng(0)
    labels = np.repeat(np.arange(20), 5)
    emb = (np.eye(20)[labels] * 3 + g.normal(size=(100, 20))).astype(np.float32)
    proc = run_cli(
        "evaluate",
        "--embeddings",
        _save(tmp_path, "e", emb),
        "--labels",
        _save(tmp_path, "l", labels),
        "--exclude",
        "AMI",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("100 queries, 100 references, euclidean")
    names = [line.split()[0] for line in lines[2:]]
    assert names[:6] == [
        "NMI",
        "mean_average_precision",
        "mean_average_precision_at_r",
        "mean_reciprocal_rank",
        "precision_at_1",
        "r_precision",
    ]
    assert {"ndcg_at_2", "ndcg_at_100", "recall_at_8"} <= set(names)


# -- metrics registered by plugins --------------------------------------------------------------------
def _metric_plugin():
    def precision_at_3(relevance, **kwargs):
        """One score per query: the calculator averages it as its own metrics."""
        return relevance[:, :3].sum(1).double() / 3

    def num_queries(query, **kwargs):
        return len(query)

    class MeanFirstDistance:
        def __call__(self, knn_distances, **kwargs):
            return knn_distances[:, 0].mean()

    def neighbours_seen(knn_labels, **kwargs):
        return knn_labels.shape[1]

    @pml_plugins.hookimpl
    def register_metrics(register):
        register(precision_at_3, name="precision_at_3", k=3, summary="P@3")
        register(num_queries, name="num_queries", requires_knn=False)
        register(MeanFirstDistance, name="mean_first_distance")
        register(neighbours_seen, name="neighbours_seen", k=40)
        register(num_queries, name="precision_at_1")  # clashes with PML's: appears as plugin:name

    return types.SimpleNamespace(register_metrics=register_metrics)


@pytest.fixture
def metric_plugin():
    name = pml_plugins.register_plugin(_metric_plugin(), name="test_metrics_plugin")
    yield name
    pml_plugins.unregister_plugin(name)


def test_plugin_metric_appears_by_name(metric_plugin, digits):
    x, y = digits[0][:400], digits[1][:400]
    calc = AccuracyCalculator(device=CPU, exclude=("NMI", "AMI"), ndcg_ks=(2,), recall_ks=(1,))
    res = calc.get_accuracy(x, y)
    for name in (
        "precision_at_3",
        "num_queries",
        "mean_first_distance",
        "neighbours_seen",
        "test_metrics_plugin:precision_at_1",
    ):
        assert name in res, name
    assert res["num_queries"] == 400
    assert res["neighbours_seen"] >= 40  # the declared k widened the one search
    # the per-query tensor is averaged like the built-ins: P@3 by hand
    from pml_plugins.knn import KNN

    _, idx = KNN()(x, 3, x, True)
    by_hand = (y[idx] == y[:, None]).double().mean(1).mean().item()
    assert res["precision_at_3"] == pytest.approx(by_hand, abs=1e-12)
    per_class = AccuracyCalculator(device=CPU, include=("precision_at_3",), return_per_class=True).get_accuracy(x, y)
    assert len(per_class["precision_at_3"]) == 10
    # include / exclude by name; the selection can be restricted or turned off
    assert set(calc.get_accuracy(x, y, include=("precision_at_3",))) == {"precision_at_3"}
    assert "num_queries" not in AccuracyCalculator(device=CPU, plugin_metrics=False).get_curr_metrics()
    only = AccuracyCalculator(device=CPU, plugin_metrics=["num_queries"], include=("num_queries",))
    assert only.get_accuracy(x, y) == {"num_queries": 400}


def test_plugin_metric_gone_after_unregister(digits):
    name = pml_plugins.register_plugin(_metric_plugin(), name="test_metrics_plugin_2")
    assert "precision_at_3" in AccuracyCalculator(device=CPU).get_curr_metrics()
    pml_plugins.unregister_plugin(name)
    assert "precision_at_3" not in AccuracyCalculator(device=CPU).get_curr_metrics()
