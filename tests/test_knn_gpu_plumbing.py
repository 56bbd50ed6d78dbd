"""The kNN layer's GPU branches, executed on a machine without a GPU.

FAISS's GPU functions are replaced by a stand-in that records each call and hands back the CPU
index (the only thing faked is FAISS's GPU API, with the signatures FAISS documents:
``index_cpu_to_gpu(res, device, index)``, ``index_cpu_to_all_gpus(index, co=None)``,
``GpuMultipleClonerOptions().shard``). Everything of ours runs for real: the placement, the
resources kept alive, the sharding options, IVF's k-means on the "GPUs", the GPU k limit, and
the searches, whose results must equal the CPU ones. This checks our GPU code paths' plumbing,
not FAISS's GPU kernels (see docs/scale.md for what was and was not run on a GPU).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from pml_plugins.knn import GPU_MAX_K, KNN, KNNIndex, knn_search

real_faiss = pytest.importorskip("faiss")


class FakeGpuFaiss(types.ModuleType):
    """The real ``faiss`` module, with ``num_gpus`` GPUs that are the CPU."""

    def __init__(self, num_gpus: int) -> None:
        super().__init__("faiss")
        self.num_gpus, self.calls = num_gpus, []

    def __getattr__(self, name):  # everything not GPU-specific is the real FAISS
        return getattr(real_faiss, name)

    def get_num_gpus(self) -> int:
        return self.num_gpus

    class StandardGpuResources:
        pass

    class GpuMultipleClonerOptions:
        def __init__(self) -> None:
            self.shard = False
            self.common_ivf_quantizer = False

    def index_cpu_to_gpu(self, resources, device, index):
        assert isinstance(resources, FakeGpuFaiss.StandardGpuResources)
        self.calls.append(("index_cpu_to_gpu", device, type(index).__name__))
        return index

    def index_cpu_to_all_gpus(self, index, co=None, ngpu=-1):
        self.calls.append(
            ("index_cpu_to_all_gpus", type(index).__name__, None if co is None else (co.shard, co.common_ivf_quantizer))
        )
        return index


@pytest.fixture()
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(600, 16, generator=g), torch.randn(50, 16, generator=g)


def fake(monkeypatch, num_gpus: int) -> FakeGpuFaiss:
    module = FakeGpuFaiss(num_gpus)
    monkeypatch.setitem(sys.modules, "faiss", module)
    return module


def test_flat_sharded_over_all_gpus(monkeypatch, data):
    ref, query = data
    want = knn_search(query, ref, 7, metric="euclidean")
    gpus = fake(monkeypatch, 2)
    built = KNNIndex(ref, metric="euclidean", device="cuda:0")
    assert built.placement == "gpu_sharded"
    assert gpus.calls == [("index_cpu_to_all_gpus", "IndexFlatL2", (True, False))]  # shard, no IVF quantizer
    got = built.search(query, 7)
    assert torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0])


def test_one_gpu_is_the_inputs_gpu(monkeypatch, data):
    ref, query = data
    want = knn_search(query, ref, 5, metric="cosine")
    gpus = fake(monkeypatch, 4)
    built = KNNIndex(ref, metric="cosine", device="cuda:3", shard=False)
    assert built.placement == "gpu" and built._gpu_resources is not None  # resources outlive the index
    assert gpus.calls == [("index_cpu_to_gpu", 3, "IndexFlatIP")]
    assert torch.equal(built.search(query, 5)[1], want[1])


def test_ivf_on_gpus_clusters_there_and_shares_one_quantizer(monkeypatch, data):
    ref, query = data
    params = {"nlist": 8, "nprobe": 8}  # every cell probed: exact
    want = knn_search(query, ref, 6, metric="euclidean")
    gpus = fake(monkeypatch, 2)
    built = KNNIndex(ref, metric="euclidean", index="ivf", index_params=params, device="cuda:0", shard=True)
    assert built.placement == "gpu_sharded"
    assert gpus.calls == [
        ("index_cpu_to_all_gpus", "IndexFlatL2", None),  # k-means assignment index, copied to every GPU
        ("index_cpu_to_all_gpus", "IndexIVFFlat", (True, True)),  # sharded, one common coarse quantizer
    ]
    assert built._clustering_index is not None
    assert torch.equal(built.search(query, 6)[1], want[1])


@pytest.mark.parametrize("index", ["hnsw", "pq"])
def test_cpu_only_indexes_stay_on_the_cpu(monkeypatch, data, index):
    ref, _ = data
    gpus = fake(monkeypatch, 2)
    assert KNNIndex(ref, index=index, device="cuda:0").placement == "cpu"
    assert gpus.calls == []
    with pytest.raises(ValueError, match=f"no GPU version of index='{index}'"):
        KNNIndex(ref, index=index, device="cuda:0", shard=True)


def test_gpu_k_limit(monkeypatch):
    ref = torch.randn(GPU_MAX_K + 10, 4)
    gpus = fake(monkeypatch, 1)
    on_gpu = KNNIndex(ref, device="cuda:0")
    with pytest.raises(ValueError, match=rf"k = {GPU_MAX_K + 1} exceeds FAISS GPU's limit.*k_hint"):
        on_gpu.search(ref[:3], GPU_MAX_K + 1)
    # told the k beforehand, the index stays on the CPU and the search works
    on_cpu = KNNIndex(ref, device="cuda:0", k_hint=GPU_MAX_K + 1)
    assert on_cpu.placement == "cpu" and on_cpu.search(ref[:3], GPU_MAX_K + 1)[1].shape == (3, GPU_MAX_K + 1)
    # the one-shot search passes its k as the hint
    assert knn_search(ref[:3], ref, GPU_MAX_K + 1, device="cuda:0")[1].shape == (3, GPU_MAX_K + 1)
    assert [c[0] for c in gpus.calls] == ["index_cpu_to_gpu"]  # only the first index went to the "GPU"


def test_knn_func_on_gpus_matches_cpu(monkeypatch, data):
    ref, _ = data
    want = KNN("euclidean")(ref, 4, ref, True)
    gpus = fake(monkeypatch, 2)
    got = KNN("euclidean", device="cuda:0")(ref, 4, ref, True)  # GPU placement, never the CPU self-search
    assert gpus.calls and torch.equal(got[1], want[1])
