"""KNN as a drop-in for PML's FaissKNN when built (reset_before, reset_after, index_init_fn, gpus, .index),
KNNOptions validated once, and the wrappers at the top level."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.utils import accuracy_calculator as pml_ac
from pytorch_metric_learning.utils.inference import FaissKNN

import pml_plugins
from pml_plugins import AccuracyCalculator
from pml_plugins.knn import KNN, KNNOptions, knn_search

faiss = pytest.importorskip("faiss")
CPU = torch.device("cpu")


@pytest.fixture
def points():
    g = torch.Generator().manual_seed(0)
    return torch.randn(300, 16, generator=g), torch.randint(0, 10, (300,), generator=g)


@pytest.mark.parametrize("init", [faiss.IndexFlatIP, faiss.IndexFlatL2])
def test_index_init_fn_and_reset_after_as_faissknn(points, init):
    x, labels = points
    ours, theirs = KNN(reset_after=False, index_init_fn=init), FaissKNN(reset_after=False, index_init_fn=init)
    a = AccuracyCalculator(knn_func=ours, device=CPU, plugin_metrics=False, exclude=("NMI", "AMI"))
    a = a.get_accuracy(x, labels)
    b = pml_ac.AccuracyCalculator(knn_func=theirs, device=CPU, exclude=("NMI", "AMI")).get_accuracy(x, labels)
    assert isinstance(ours.index, init) and ours.index.ntotal == len(x) == theirs.index.ntotal
    for key in b:
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    # the same distances (as the index reports them: squared for L2) and neighbours as FaissKNN
    d_ours, i_ours = KNN(index_init_fn=init)(x[:20], 5, x, True)
    d_theirs, i_theirs = FaissKNN(index_init_fn=init)(x[:20], 5, x, True)
    assert torch.equal(i_ours, i_theirs) and torch.allclose(d_ours, d_theirs)


def test_dot_index_after_a_faiss_search(points):
    x, _ = points
    kept = KNN(reset_after=False)
    kept(x[:10], 3, x)
    assert isinstance(kept.index, faiss.Index) and kept.index.ntotal == len(x)
    released = KNN()  # reset_after=True, as FaissKNN: no index held after the call
    released(x[:10], 3, x)
    assert released.index is None
    assert KNN(reset_after=False, backend="torch")(x[:4], 2, x)[1].shape == (4, 2)


def test_reset_before_false_accumulates_like_faissknn(points):
    x, _ = points
    ours = KNN(reset_before=False, reset_after=False)
    theirs = FaissKNN(reset_before=False, reset_after=False)
    theirs.index = faiss.IndexFlatL2(x.shape[1])
    for part in (x[:100], x[100:]):
        _, i_ours = ours(x[:15], 4, part)
        d_theirs, i_theirs = theirs(x[:15], 4, part)
        assert torch.equal(i_ours, i_theirs)  # the second call searches both parts
    assert ours.index.ntotal == len(x)


def test_stored_index_with_init_fn_as_inference_model_uses_it(points):
    x, _ = points
    ours = KNN(reset_before=False, reset_after=False, index_init_fn=faiss.IndexFlatL2)
    theirs = FaissKNN(reset_before=False, reset_after=False)
    for f in (ours, theirs):
        f.train(x[:200])
        f.add(x[200:])
    assert torch.equal(ours(x[:7], 3)[1], theirs(x[:7], 3)[1])
    with pytest.raises(ValueError, match="initialized"):
        KNN(reset_before=False, index_init_fn=faiss.IndexFlatL2)(x[:2], 1, x)


def test_constructor_checks():
    with pytest.raises(TypeError, match="gpus must be a list"):
        KNN(gpus=0)
    with pytest.raises(ValueError, match="gpus must have length"):
        KNN(gpus=[])
    with pytest.raises(TypeError, match="reset_after"):
        KNN(reset_after="yes")
    with pytest.raises(TypeError, match="index_init_fn"):
        KNN(index_init_fn=3)
    assert KNN(gpus=[0]).gpus == [0]


def test_options_validated_once_and_frozen():
    o = KNNOptions(metric="euclidean", index="ivf", index_params={"nlist": 4})
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.metric = "cosine"
    for bad, error in [
        ({"metric": "l1"}, ValueError),
        ({"index": "lsh"}, ValueError),
        ({"backend": "jax"}, ValueError),
        ({"chunk_size": 0}, ValueError),
        ({"shard": "yes"}, TypeError),
        ({"index": "ivf", "index_params": {"nlsit": 4}}, ValueError),
        ({"shard": True, "backend": "torch"}, ValueError),
    ]:
        with pytest.raises(error):
            KNNOptions(**bad)
    knn = KNN("euclidean", index="ivf", index_params={"nlist": 4})
    assert knn.options == o and knn.index_type == "ivf" and knn.index is None
    g = torch.Generator().manual_seed(1)
    q, r = torch.randn(5, 8, generator=g), torch.randn(50, 8, generator=g)
    assert torch.equal(
        knn_search(q, r, 3, options=KNNOptions(metric="euclidean"))[1], knn_search(q, r, 3, metric="euclidean")[1]
    )


def test_wrappers_at_the_top_level():
    assert pml_plugins.CrossBatchMemory is pml_plugins.wrappers.CrossBatchMemory
    assert pml_plugins.SelfSupervisedLoss is pml_plugins.wrappers.SelfSupervisedLoss
    assert {"CrossBatchMemory", "SelfSupervisedLoss", "AccuracyCalculator"} <= set(pml_plugins.__all__)
    g = torch.Generator().manual_seed(2)
    emb, ref = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    ours = pml_plugins.SelfSupervisedLoss(pml_losses.ContrastiveLoss())(emb, ref)
    theirs = pml_losses.SelfSupervisedLoss(pml_losses.ContrastiveLoss())(emb, ref)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-7)
    labels = torch.randint(0, 3, (16,), generator=g)
    ours = pml_plugins.CrossBatchMemory(pml_losses.ContrastiveLoss(), 8, memory_size=32)(emb, labels)
    theirs = pml_losses.CrossBatchMemory(pml_losses.ContrastiveLoss(), 8, memory_size=32)(emb, labels)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-7)
