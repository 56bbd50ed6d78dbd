"""Top-k retrieval over a database and the per-query union of eq. 8, batched with padding."""

from __future__ import annotations

from typing import Any, Optional

import torch

from pml_plugins.knn import INDEXES, KNNIndex, default_nlist, knn_search


@torch.no_grad()
def cosine_topk(query: torch.Tensor, reference: torch.Tensor, k: int, index: Optional[Any] = None):
    """Indices ``(Q, k')`` of the top ``k' = min(k, N)`` reference rows by cosine, and a validity mask.

    ``index``: an optional prebuilt index over the (normalised) reference rows: the core's
    :class:`pml_plugins.knn.KNNIndex` (what :func:`build_faiss_index` returns: exact, IVF or
    HNSW, CPU or GPU), or any FAISS-like object with ``search(x: float32 ndarray, k) -> (D, I)``;
    ``-1`` results are invalid. Otherwise the core's ``pml_plugins.knn.knn_search`` (FAISS flat
    or exact torch) is used; it builds its index on every call, which is fine for small
    databases (see :func:`build_faiss_index` for large ones).
    """
    k = min(int(k), reference.shape[0] if index is None else int(getattr(index, "ntotal", k)))
    if k <= 0 or query.shape[0] == 0:
        empty = torch.empty(query.shape[0], 0, dtype=torch.long, device=query.device)
        return empty, empty.bool()
    if isinstance(index, KNNIndex):  # the core's kNN layer, index built once per database refresh
        _, idx = index.search(query.detach().float(), k, progress=False)
    elif index is not None:
        q = torch.nn.functional.normalize(query.detach().float(), dim=1).cpu().numpy()
        _, idx = index.search(q, k)
        idx = torch.as_tensor(idx, dtype=torch.long)
    else:
        _, idx = knn_search(query.detach().float(), reference.detach().float(), k, metric="cosine", progress=False)
    idx = idx.to(device=query.device, dtype=torch.long)
    return idx.clamp_min(0), idx >= 0


def union_per_query(query_of_pair: torch.Tensor, ref_of_pair: torch.Tensor, num_queries: int, num_ref: int):
    """Eq. 8 for every query at once: the set union of retrieved reference rows, padded.

    Args:
        query_of_pair, ref_of_pair: 1-D long tensors, one entry per (query, reference row) link
            (duplicates allowed, e.g. the same row retrieved by several views).
        num_queries: B. num_ref: number of reference rows N.
    Returns:
        ``(index (B, T), valid (B, T))`` with T = the largest union size (at least 1); each row
        lists its union sorted by reference index, padded with index 0 and ``valid=False``.
    """
    device = ref_of_pair.device
    keys = torch.unique(query_of_pair * num_ref + ref_of_pair)  # sorted, deduplicated links
    q, r = torch.div(keys, num_ref, rounding_mode="floor"), keys % max(num_ref, 1)
    counts = torch.bincount(q, minlength=num_queries)
    width = max(int(counts.max()) if counts.numel() else 0, 1)  # T = 0 would make empty softmaxes
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(keys.numel(), device=device) - starts[q]
    index = torch.zeros(num_queries, width, dtype=torch.long, device=device)
    valid = torch.zeros(num_queries, width, dtype=torch.bool, device=device)
    index[q, pos] = r
    valid[q, pos] = True
    return index, valid


def union_of_view_neighbours(neighbours: torch.Tensor, valid: torch.Tensor, num_views: int, num_ref: int):
    """The union S of eq. 8 over the A views of each query, from per-row top-k ``(B*A, k)``."""
    rows, k = neighbours.shape
    query = (torch.arange(rows, device=neighbours.device) // num_views).repeat_interleave(k)
    flat_valid = valid.reshape(-1)
    return union_per_query(query[flat_valid], neighbours.reshape(-1)[flat_valid], rows // num_views, num_ref)


def union_from_indices_tuple(indices_tuple: tuple, num_views: int, num_rows: int, num_ref: int):
    """The union S from a pair tuple ``(a1, p, a2, n)`` (e.g. DatabaseKNNMiner's), or a triplet
    tuple ``(a, p, n)``: every reference row linked to any view of a query belongs to its S."""
    if len(indices_tuple) == 4:
        a1, p, a2, n = indices_tuple
        anchors, refs = torch.cat([a1, a2]), torch.cat([p, n])
    elif len(indices_tuple) == 3:
        a, p, n = indices_tuple
        anchors, refs = torch.cat([a, a]), torch.cat([p, n])
    else:
        raise ValueError(
            f"indices_tuple must be PML's (a1, p, a2, n) pairs or (a, p, n) triplets, got {len(indices_tuple)} entries"
        )
    anchors, refs = anchors.long(), refs.long()
    if anchors.numel() and (int(anchors.min()) < 0 or int(anchors.max()) >= num_rows):
        raise ValueError(f"indices_tuple anchors must index the {num_rows} embedding rows")
    if refs.numel() and (int(refs.min()) < 0 or int(refs.max()) >= num_ref):
        raise ValueError(f"indices_tuple reference indices must index the {num_ref} ref_emb rows")
    return union_per_query(anchors // num_views, refs, num_rows // num_views, num_ref)


def build_faiss_index(
    embeddings: torch.Tensor,
    kind: str = "ivf",
    nlist: Optional[int] = None,
    nprobe: int = 16,
    train_size: Optional[int] = 100_000,
    seed: int = 0,
    **index_params: Any,
) -> KNNIndex:
    """A cosine index over the rows, for ``set_database(..., index=)``: the core's :class:`pml_plugins.knn.KNNIndex`.

    Built once per database refresh, so a training step only searches it. ``kind="flat"`` is
    exact; ``kind="ivf"`` is FAISS's ``IndexIVFFlat`` with ``nlist`` cells (default
    ``4 sqrt(N)``), trained on at most ``train_size`` random rows (None: the core's default,
    ``min(N, 64 nlist)``), searched with ``nprobe`` cells; ``kind="hnsw"`` is ``IndexHNSWFlat``
    (``index_params``: ``M``, ``ef_search``, ``ef_construction``); ``kind="pq"`` is a 4-bit PQ
    fast scan of every row re-ranked exactly (``index_params``: ``m``, ``k_factor``; any index of
    :data:`pml_plugins.knn.INDEXES` is accepted). CUDA embeddings put the
    index on the GPU(s) when FAISS has GPU support (sharded over several). Needs ``faiss``
    (``pip install faiss-cpu``).
    """
    if kind not in INDEXES:
        raise ValueError(f"kind must be one of {INDEXES}, got {kind!r}")
    params: dict = dict(index_params)
    if kind == "ivf":
        n = embeddings.shape[0]
        nlist = int(nlist or default_nlist(n))
        params.update(nlist=nlist, nprobe=int(nprobe), seed=int(seed))
        if train_size is not None:
            params["train_size"] = max(nlist, min(int(train_size), n))
    return KNNIndex(
        embeddings.detach(), metric="cosine", index=kind, backend="faiss", index_params=params, progress=False
    )
