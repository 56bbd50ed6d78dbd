"""Leave-one-out kNN of a set against itself, every pair's score computed once.

Evaluating retrieval on one set (``AccuracyCalculator.get_accuracy(x, labels)``, PML's
``ref_includes_query``) searches ``N`` queries against the same ``N`` references. A flat FAISS
search multiplies every pair twice: ``x_a . x_b`` for query ``a`` and again for query ``b``.
Here the rows are cut into blocks and each block pair ``(I, J)``, ``I <= J``, is multiplied once
(half the GEMM, which is most of the cost); the block's rows update the top-k heaps of the
queries in ``I`` and its transpose those of the queries in ``J``, with FAISS's own heaps
(``HeapArray.addn``), which visit the references of every query in increasing index order,
as FAISS's flat search does.

The result is an exact kNN. The scores are rounded differently from FAISS's (the squared L2
distance comes out of one augmented GEMM, ``[x_a, |x_a|^2, 1] . [-2 x_b, 1, |x_b|^2]``), so
references whose scores differ by a few float32 ulps can be ordered differently than FAISS
orders them, as FAISS's own results differ between batch sizes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .progress import progress_bar

__all__ = ["symmetric_self_search", "DEFAULT_BLOCK_SIZE"]

#: Rows per block: 8192 x 8192 float32 scores (256 MiB, and as much for the transpose) per block
#: pair; larger blocks ran faster at 60k x 512 on 2 cores (2048: 21.9 s, 4096: 19.7 s, 8192: 17.6 s).
DEFAULT_BLOCK_SIZE = 8192


def symmetric_self_search(
    x: np.ndarray,
    k: int,
    metric: str,
    faiss: Any,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows of ``x`` to every row of ``x``, the row itself included.

    Args:
        x: ``(N, D)`` C-contiguous float32 array (already L2-normalised for cosine).
        k: neighbours per row, ``1 <= k <= N``.
        metric: ``"euclidean"`` (returns unsquared L2 distances, ascending) or
            ``"inner_product"`` / ``"cosine"`` (dot products, descending).
        faiss: the imported FAISS module (its heaps do the top-k selection).
        block_size: rows per block.
        progress: tqdm bar over the block pairs (None: on a terminal only).

    Returns:
        ``(scores, indices)``, ``(N, k)`` float32 and int64 CPU tensors.
    """
    n, d = x.shape
    if metric == "euclidean":  # one GEMM gives |a|^2 + |b|^2 - 2 a.b
        sq = np.einsum("ij,ij->i", x, x)
        left = np.empty((n, d + 2), np.float32)
        left[:, :d], left[:, d], left[:, d + 1] = x, sq, 1.0
        right = np.empty((n, d + 2), np.float32)
        np.multiply(x, -2.0, out=right[:, :d])
        right[:, d], right[:, d + 1] = 1.0, sq
        heaps = faiss.float_maxheap_array_t()  # keeps the k smallest
    else:
        left = right = x
        heaps = faiss.float_minheap_array_t()  # keeps the k largest
    values = np.empty((n, k), np.float32)
    ids = np.empty((n, k), np.int64)
    heaps.nh, heaps.k = n, k
    heaps.val, heaps.ids = faiss.swig_ptr(values), faiss.swig_ptr(ids)
    heaps.heapify()
    # preallocated flat buffers, viewed per block pair as contiguous (rows, cols) arrays: fresh
    # 16 MiB arrays per pair would page-fault on every block
    block = np.empty(block_size * block_size, np.float32)
    mirror = torch.empty(block_size * block_size)
    starts = range(0, n, block_size)
    pairs = len(starts) * (len(starts) + 1) // 2
    with progress_bar(pairs, pairs, progress, "kNN self-search (each pair once)") as bar:
        for i0 in starts:
            i1 = min(n, i0 + block_size)
            for j0 in range(i0, n, block_size):
                j1 = min(n, j0 + block_size)
                rows, cols = i1 - i0, j1 - j0
                scores = block[: rows * cols].reshape(rows, cols)
                np.matmul(left[i0:i1], right[j0:j1].T, out=scores)
                heaps.addn(cols, faiss.swig_ptr(scores), j0, i0, rows)  # queries of I, references of J
                if j0 != i0:  # the same scores seen from the queries of J
                    mirrored = mirror[: rows * cols].view(cols, rows)
                    mirrored.copy_(torch.from_numpy(scores).T)  # torch's blocked transpose is ~4x numpy's
                    heaps.addn(rows, faiss.swig_ptr(mirrored.numpy()), i0, j0, cols)
                bar.update(1)
    heaps.reorder()  # sorted: ascending distances / descending similarities
    scores_out = torch.from_numpy(values)
    if metric == "euclidean":
        scores_out = scores_out.clamp_min_(0).sqrt_()  # rounding can leave -1e-7 for a row and itself
    return scores_out, torch.from_numpy(ids)
