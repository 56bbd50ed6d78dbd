"""Top-k retrieval over a database and the per-query union of eq. 8, batched with padding."""
from __future__ import annotations

from typing import Any, Optional

import torch


def _core_knn_search():
    """The core's kNN layer (FAISS when installed, exact torch otherwise), or None if absent."""
    try:
        from pml_plugins.knn import knn_search
    except ImportError:  # older core without the kNN layer: use the local exact search
        return None
    return knn_search


@torch.no_grad()
def exact_cosine_topk(query: torch.Tensor, reference: torch.Tensor, k: int, chunk_size: int = 65536):
    """Exact top-k cosine similarities in torch, chunked over the reference rows (bounded memory)."""
    q = torch.nn.functional.normalize(query.float(), dim=1)
    best_s = q.new_full((q.shape[0], 0), float("-inf"))
    best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
    for start in range(0, reference.shape[0], chunk_size):
        r = torch.nn.functional.normalize(reference[start:start + chunk_size].to(q), dim=1)
        s = q @ r.T
        kk = min(k, s.shape[1])
        s, i = s.topk(kk, dim=1)
        best_s, order = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + kk), dim=1)
        best_i = torch.cat([best_i, i + start], 1).gather(1, order)
    return best_s, best_i


@torch.no_grad()
def cosine_topk(query: torch.Tensor, reference: torch.Tensor, k: int, index: Optional[Any] = None):
    """Indices ``(Q, k')`` of the top ``k' = min(k, N)`` reference rows by cosine, and a validity mask.

    ``index``: an optional FAISS-like object with ``search(x: float32 ndarray, k) -> (D, I)``
    built on the (normalised) reference rows (e.g. an IVF index); ``-1`` results are invalid.
    Otherwise the core's ``pml_plugins.knn.knn_search`` (FAISS or exact torch) is used.
    """
    k = min(int(k), reference.shape[0] if index is None else int(getattr(index, "ntotal", k)))
    if k <= 0 or query.shape[0] == 0:
        empty = torch.empty(query.shape[0], 0, dtype=torch.long, device=query.device)
        return empty, empty.bool()
    if index is not None:
        q = torch.nn.functional.normalize(query.detach().float(), dim=1).cpu().numpy()
        _, idx = index.search(q, k)
        idx = torch.as_tensor(idx, dtype=torch.long, device=query.device)
        return idx.clamp_min(0), idx >= 0
    knn_search = _core_knn_search()
    if knn_search is not None:
        _, idx = knn_search(query.detach().float(), reference.detach().float(), k, metric="cosine")
    else:
        _, idx = exact_cosine_topk(query.detach(), reference.detach(), k)
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
        raise ValueError(f"indices_tuple must be PML's (a1, p, a2, n) pairs or (a, p, n) triplets, got {len(indices_tuple)} entries")
    anchors, refs = anchors.long(), refs.long()
    if anchors.numel() and (int(anchors.min()) < 0 or int(anchors.max()) >= num_rows):
        raise ValueError(f"indices_tuple anchors must index the {num_rows} embedding rows")
    if refs.numel() and (int(refs.min()) < 0 or int(refs.max()) >= num_ref):
        raise ValueError(f"indices_tuple reference indices must index the {num_ref} ref_emb rows")
    return union_per_query(anchors // num_views, refs, num_rows // num_views, num_ref)
