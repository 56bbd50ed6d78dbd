"""The kNN layer at scale: chunked FAISS search, approximate indexes, IVF subsample training,
index-parameter validation, the GPU placement decision, and `pml-plugins evaluate --knn-index`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pml_plugins import knn as knn_module
from pml_plugins.cli import main
from pml_plugins.cli.knn_params import parse_index_params
from pml_plugins.knn import GPU_MAX_K, KNN, KNNIndex, check_index_params, faiss_placement, knn_search
from pml_plugins.metrics import AccuracyCalculator

needs_faiss = pytest.mark.skipif(not knn_module.faiss_available(), reason="no FAISS")


def clustered(n, q, dim=32, classes=40, noise=1.0, seed=0):
    """Gaussian clusters on the unit sphere (labels = cluster), queries drawn from the same clusters."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)

    def draw(m):
        labels = rng.integers(classes, size=m)
        x = centers[labels] + noise / math.sqrt(dim) * rng.standard_normal((m, dim))
        return torch.from_numpy((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)), torch.from_numpy(
            labels
        )

    return (*draw(n), *draw(q))


def top1_recall(approx, exact):
    return float((approx[:, 0] == exact[:, 0]).float().mean())


@pytest.fixture(scope="module")
def data():
    return clustered(4000, 300)


# -- chunking ---------------------------------------------------------------------------------
@needs_faiss
@pytest.mark.parametrize(
    "index, params", [("flat", None), ("ivf", {"nlist": 32, "nprobe": 4}), ("hnsw", {"M": 16}), ("pq", {"m": 8})]
)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_chunked_faiss_search_equals_unchunked(data, index, params, metric):
    ref, _, query, _ = data
    built = KNNIndex(ref, metric=metric, index=index, index_params=params)
    whole_s, whole_i = built.search(query, 15, chunk_size=len(query))
    chunk_s, chunk_i = built.search(query, 15, chunk_size=7)  # 43 blocks, the last one short
    assert torch.equal(whole_i, chunk_i)
    assert torch.equal(whole_s, chunk_s)
    # and the one-shot knn_search builds the same index and gives the same answer
    s, i = knn_search(query, ref, 15, metric=metric, index=index, index_params=params, chunk_size=50)
    assert torch.equal(i, whole_i)


@needs_faiss
def test_default_faiss_chunk_is_bounded(data, monkeypatch):
    ref, _, query, _ = data
    calls = []
    built = KNNIndex(ref, index="flat")
    real_search = built.faiss_index.search

    def spy(x, k):  # observe the FAISS index's own calls (not our code): block sizes
        calls.append(len(x))
        return real_search(x, k)

    monkeypatch.setattr(built.faiss_index, "search", spy)
    monkeypatch.setattr(knn_module.index, "DEFAULT_FAISS_RESULTS", 256 * 10)  # 256 queries per call at k = 10
    built.search(query, 10)
    assert calls == [256, 44]


def test_progress_bar_hidden_off_terminal(data, capsys):
    ref, _, query, _ = data
    knn_search(query, ref, 5, backend="torch", chunk_size=10)  # 30 blocks, stderr is not a terminal
    assert capsys.readouterr().err == ""
    knn_search(query, ref, 5, backend="torch", chunk_size=10, progress=True)
    assert "kNN search" in capsys.readouterr().err


# -- approximate indexes ------------------------------------------------------------------------
@needs_faiss
@pytest.mark.parametrize(
    "index, params",
    [
        ("ivf", {"nlist": 32, "nprobe": 8}),
        ("hnsw", {"M": 16, "ef_search": 64, "ef_construction": 64}),
        ("pq", {"m": 16, "k_factor": 8}),
    ],
)
def test_approximate_indexes_reach_high_recall_on_clustered_data(data, index, params):
    ref, _, query, _ = data
    _, exact = knn_search(query, ref, 10, metric="cosine", index="flat")
    built = KNNIndex(ref, metric="cosine", index=index, index_params=params)
    _, approx = built.search(query, 10)
    assert top1_recall(approx, exact) >= 0.95
    assert built.params.items() >= params.items()  # the user's values were used


@needs_faiss
@pytest.mark.parametrize("metric", ["cosine", "inner_product", "euclidean"])
def test_pq_reranks_its_candidates_exactly(data, metric):
    ref, _, query, _ = data
    ref, query = ref * 3, query * 0.5  # not unit rows: inner_product and euclidean differ from cosine
    built = KNNIndex(ref, metric=metric, index="pq", index_params={"m": 4, "k_factor": 4})
    assert built.params == {"m": 4, "k_factor": 4, "train_size": len(ref), "seed": 0}
    scores, idx = built.search(query, 12)
    # the returned scores are the exact ones of the returned references (IndexRefineFlat), in order
    r = torch.nn.functional.normalize(ref, dim=1) if metric == "cosine" else ref
    q = torch.nn.functional.normalize(query, dim=1) if metric == "cosine" else query
    if metric == "euclidean":
        exact_scores = (q[:, None, :] - r[idx]).norm(dim=2)
        assert bool((scores[:, 1:] >= scores[:, :-1]).all())
    else:
        exact_scores = (q[:, None, :] * r[idx]).sum(2)
        assert bool((scores[:, 1:] <= scores[:, :-1]).all())
    assert torch.allclose(scores, exact_scores, atol=1e-4)
    # m = 4 codes 8 dimensions with 16 centroids: coarse, so re-ranking more candidates helps
    _, exact = knn_search(query, ref, 12, metric=metric)
    recall_of = lambda k_factor: top1_recall(
        KNNIndex(ref, metric=metric, index="pq", index_params={"m": 4, "k_factor": k_factor}).search(query, 12)[1],
        exact,
    )
    assert recall_of(1) < recall_of(32)
    # every reference requested: k_factor is capped at N / k and the whole set comes back
    _, everything = built.search(query[:3], len(ref))
    assert all(sorted(row.tolist()) == list(range(len(ref))) for row in everything)


@needs_faiss
def test_pq_parameters(data):
    ref = data[0]
    default = KNNIndex(ref, index="pq")
    assert default.params == {"m": 16, "k_factor": 16, "seed": 0, "train_size": len(ref)}  # m = dim / 2
    assert default.placement == "cpu"
    sampled = KNNIndex(ref, index="pq", index_params={"train_size": 500, "seed": 1})
    assert sampled.params["train_size"] == 500
    odd = KNNIndex(torch.randn(200, 15), index="pq")
    assert odd.params["m"] == 15  # an odd dimension: one coordinate per sub-quantizer
    with pytest.raises(ValueError, match=r"index_params\['m'\] = 5 must divide the embedding dimension 32"):
        KNNIndex(ref, index="pq", index_params={"m": 5})
    with pytest.raises(ValueError, match=r"'train_size'\] = 8 must be >= 16"):
        KNNIndex(ref, index="pq", index_params={"train_size": 8})
    with pytest.raises(ValueError, match=r"'nprobe'.*known: m, k_factor, train_size, seed"):
        KNNIndex(ref, index="pq", index_params={"nprobe": 8})


@needs_faiss
def test_ivf_probing_every_cell_is_exact(data):
    ref, _, query, _ = data
    _, exact = knn_search(query, ref, 10, metric="euclidean")
    _, approx = knn_search(query, ref, 10, metric="euclidean", index="ivf", index_params={"nlist": 16, "nprobe": 16})
    assert torch.equal(approx, exact)
    # one probed cell of 64: a real approximation, measurably worse
    _, coarse = knn_search(query, ref, 10, metric="euclidean", index="ivf", index_params={"nlist": 64, "nprobe": 1})
    assert top1_recall(coarse, exact) < 1.0


@needs_faiss
def test_rows_with_too_few_candidates_are_searched_again(data):
    ref, _, query, _ = data
    built = KNNIndex(ref, index="ivf", index_params={"nlist": 100, "nprobe": 1})  # ~40 rows per cell
    _, idx = built.search(query, 200)  # one cell cannot hold 200 candidates
    assert bool((idx >= 0).all())
    assert built.faiss_index.nprobe == 1  # restored after the retries
    assert all(len(set(row.tolist())) == 200 for row in idx)


@needs_faiss
def test_ivf_trains_on_a_random_subsample(data):
    ref = data[0]
    default = KNNIndex(ref, index="ivf", index_params={"nlist": 20})
    assert default.params["train_size"] == min(len(ref), 64 * 20) == 1280
    assert default.params["niter"] == 10 and default.params["nprobe"] == 16
    small = KNNIndex(ref, index="ivf", index_params={"nlist": 20, "train_size": 400, "seed": 3})
    again = KNNIndex(ref, index="ivf", index_params={"nlist": 20, "train_size": 400, "seed": 3})
    other = KNNIndex(ref, index="ivf", index_params={"nlist": 20, "train_size": 400, "seed": 4})
    full = KNNIndex(ref, index="ivf", index_params={"nlist": 20, "train_size": None, "seed": 3})
    assert small.params["train_size"] == 400 and full.params["train_size"] == len(ref)
    centroids = lambda b: b.faiss_index.quantizer.reconstruct_n(0, 20)
    np.testing.assert_array_equal(centroids(small), centroids(again))  # seeded: reproducible
    assert not np.allclose(centroids(small), centroids(other))  # another sample, other cells
    assert not np.allclose(centroids(small), centroids(full))  # not trained on every row
    assert small.faiss_index.ntotal == len(ref)  # every row is still indexed
    with pytest.raises(ValueError, match="train_size"):
        KNNIndex(ref, index="ivf", index_params={"nlist": 20, "train_size": 10})
    with pytest.raises(ValueError, match="nlist"):
        KNNIndex(ref[:10], index="ivf", index_params={"nlist": 20})


# -- validation ---------------------------------------------------------------------------------
def test_index_param_validation_names_the_parameter():
    with pytest.raises(ValueError, match=r"'nprob'.*known: nlist, nprobe"):
        check_index_params("ivf", {"nprob": 8})
    with pytest.raises(ValueError, match=r"'nlist'.*known: M, ef_search"):
        check_index_params("hnsw", {"nlist": 8})
    with pytest.raises(ValueError, match="flat index takes no parameters"):
        check_index_params("flat", {"nprobe": 8})
    with pytest.raises(TypeError, match=r"index_params\['nprobe'\] must be an int"):
        check_index_params("ivf", {"nprobe": 2.5})
    with pytest.raises(ValueError, match=r"index_params\['M'\] must be >= 1"):
        check_index_params("hnsw", {"M": 0})
    with pytest.raises(TypeError, match="index_params must be a mapping"):
        check_index_params("ivf", [("nlist", 4)])
    assert check_index_params("ivf", {"nlist": np.int64(4), "train_size": None, "seed": 0}) == {
        "nlist": 4,
        "train_size": None,
        "seed": 0,
    }
    # at construction, before any work
    with pytest.raises(ValueError, match="'bogus'"):
        KNN(index="hnsw", index_params={"bogus": 1})
    with pytest.raises(ValueError, match="chunk_size"):
        KNN(chunk_size=0)
    with pytest.raises(TypeError, match="shard"):
        KNN(shard="yes")


def test_parse_index_params():
    assert parse_index_params(["nlist=4096", " nprobe = 32 ", "train_size=none"]) == {
        "nlist": 4096,
        "nprobe": 32,
        "train_size": None,
    }
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_index_params(["nlist"])
    with pytest.raises(ValueError, match="'nprobe' must be an integer, got 'many'"):
        parse_index_params(["nprobe=many"])


# -- GPU placement (the decision only: this machine has no GPU) -----------------------------------
@pytest.mark.parametrize(
    "index, device, gpus, shard, k, expected",
    [
        ("flat", "cpu", 0, None, None, "cpu"),
        ("flat", "cpu", 4, None, None, "cpu"),  # CPU inputs stay on the CPU even with GPUs
        ("flat", "cuda", 0, None, None, "cpu"),  # faiss-cpu: CPU index (knn_search prefers torch on GPU for flat)
        ("flat", "cuda", 1, None, None, "gpu"),
        ("flat", "cuda", 1, True, None, "gpu"),  # sharding over one GPU is one GPU
        ("flat", "cuda", 4, None, None, "gpu_sharded"),
        ("ivf", "cuda", 2, True, 100, "gpu_sharded"),
        ("ivf", "cuda", 4, False, None, "gpu"),
        ("hnsw", "cuda", 4, None, None, "cpu"),  # no GPU HNSW in FAISS
        ("pq", "cuda", 4, None, None, "cpu"),  # nor GPU PQ fast scan
        ("flat", "cuda", 4, None, GPU_MAX_K, "gpu_sharded"),
        ("flat", "cuda", 4, None, GPU_MAX_K + 1, "cpu"),  # beyond FAISS GPU's k
    ],
)
def test_faiss_placement(index, device, gpus, shard, k, expected):
    assert faiss_placement(index, device, gpus, shard, k) == expected


def test_faiss_placement_errors():
    with pytest.raises(ValueError, match="device='cuda'"):
        faiss_placement("flat", "cpu", 2, shard=True)
    with pytest.raises(ValueError, match="GPU support"):
        faiss_placement("ivf", "cuda", 0, shard=True)
    with pytest.raises(ValueError, match="no GPU version of index='hnsw'"):
        faiss_placement("hnsw", "cuda", 2, shard=True)
    with pytest.raises(ValueError, match="no GPU version of index='pq'"):
        faiss_placement("pq", "cuda", 2, shard=True)
    with pytest.raises(TypeError, match="shard"):
        faiss_placement("flat", "cuda", 2, shard=1)
    with pytest.raises(ValueError, match="index"):
        faiss_placement("lsh", "cuda", 2)


def test_this_machine_places_on_cpu(data):
    ref = data[0]
    assert knn_module.faiss_num_gpus() == 0  # faiss-cpu (or none): what the rest of this file assumes
    built = KNNIndex(ref[:100], backend="torch")
    assert built.placement == "torch"
    if knn_module.faiss_available():
        assert KNNIndex(ref[:100], index="flat").placement == "cpu"
        with pytest.raises(ValueError, match="GPU support"):
            KNNIndex(ref[:100], device="cuda", shard=True)


# -- the calculator and the evaluate command ------------------------------------------------------
@needs_faiss
def test_accuracy_calculator_with_approximate_knn(data):
    ref, ref_labels, query, query_labels = data
    kwargs = dict(
        include=("precision_at_1", "mean_average_precision_at_r", "recall_at_4", "ndcg_at_8"),
        ndcg_ks=(8,),
        recall_ks=(4,),
        device="cpu",
        plugin_metrics=False,
    )
    exact = AccuracyCalculator(knn_func=KNN("cosine"), **kwargs).get_accuracy(query, query_labels, ref, ref_labels)
    exhaustive = AccuracyCalculator(
        knn_func=KNN("cosine", index="ivf", index_params={"nlist": 16, "nprobe": 16}), **kwargs
    ).get_accuracy(query, query_labels, ref, ref_labels)
    assert exhaustive == pytest.approx(exact, abs=1e-12)


@needs_faiss
def test_evaluate_command_knn_index(tmp_path, data, capsys):
    ref, ref_labels, query, query_labels = data
    paths = {}
    for name, arr in (("q", query), ("ql", query_labels), ("r", ref), ("rl", ref_labels)):
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], arr.numpy())
    base = [
        "evaluate",
        "--embeddings",
        paths["q"],
        "--labels",
        paths["ql"],
        "--reference",
        paths["r"],
        "--reference-labels",
        paths["rl"],
        "--json",
        "--no-plugin-metrics",
        "--exclude",
        "NMI",
        "AMI",
        "--distance",
        "cosine",
    ]

    def run(*extra):
        assert main([*base, *extra]) == 0
        return json.loads(capsys.readouterr().out)

    exact = run()
    ivf_all = run("--knn-index", "ivf", "--knn-param", "nlist=16", "--knn-param", "nprobe=16")
    assert ivf_all["knn"] == {"index": "ivf", "nlist": 16, "nprobe": 16} and exact["knn"] == {"index": "flat"}
    assert ivf_all["metrics"] == pytest.approx(exact["metrics"], abs=1e-12)  # every cell probed: exact
    hnsw = run("--knn-index", "hnsw", "--knn-param", "M=16", "--knn-param", "ef_search=128")
    assert hnsw["metrics"]["precision_at_1"] == pytest.approx(exact["metrics"]["precision_at_1"], abs=0.02)
    pq = run("--knn-index", "pq", "--knn-param", "m=16", "--knn-param", "k_factor=32")
    assert pq["knn"] == {"index": "pq", "m": 16, "k_factor": 32}
    assert pq["metrics"]["precision_at_1"] == pytest.approx(exact["metrics"]["precision_at_1"], abs=0.02)
    # errors name the parameter; exit status 2 like the command's other input errors
    assert main([*base, "--knn-index", "ivf", "--knn-param", "nprob=16"]) == 2
    assert "'nprob'" in capsys.readouterr().err
    assert main([*base, "--knn-param", "nlist=16"]) == 2  # flat takes none
    assert "--knn-param" in capsys.readouterr().err
    assert main([*base, "--knn-index", "ivf", "--knn-param", "nprobe=lots"]) == 2
    assert "'nprobe' must be an integer" in capsys.readouterr().err
