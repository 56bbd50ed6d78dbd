"""class_distances_from_embeddings (hand values), the [text] extra's error, binarize_embeddings."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from pml_plugin_adaptive_margin import binarize_embeddings, class_distances_from_embeddings, class_distances_from_text
from pml_plugin_adaptive_margin import class_distances as cd

# three class embeddings: e0 = (1, 0), e1 = (0, 2) (orthogonal), e2 = (-3, 0) (opposite e0)
E = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])


def test_cosine_half():
    # (1 - cos) / 2: orthogonal 0.5, opposite 1.0
    expected = torch.tensor([[0.0, 0.5, 1.0], [0.5, 0.0, 0.5], [1.0, 0.5, 0.0]])
    assert torch.allclose(class_distances_from_embeddings(E), expected)
    assert torch.allclose(class_distances_from_embeddings(E.numpy(), metric="cosine", normalize="half"), expected)


def test_euclidean_half():
    # unit vectors: |(1,0) - (0,1)| / 2 = sqrt(2) / 2; |(1,0) - (-1,0)| / 2 = 1
    r = math.sqrt(2) / 2
    expected = torch.tensor([[0.0, r, 1.0], [r, 0.0, r], [1.0, r, 0.0]])
    assert torch.allclose(class_distances_from_embeddings(E, metric="euclidean"), expected)


def test_minmax():
    # cosine distances 1 (0-1), 2 (0-2), 1 (1-2): min 1, max 2 -> 0, 1, 0
    expected = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(class_distances_from_embeddings(E, normalize="minmax"), expected)
    # Euclidean of the raw vectors: |e0 - e1| = sqrt(5), |e0 - e2| = 4, |e1 - e2| = sqrt(13)
    lo, hi = math.sqrt(5), 4.0
    mid = (math.sqrt(13) - lo) / (hi - lo)
    expected = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, mid], [1.0, mid, 0.0]])
    assert torch.allclose(class_distances_from_embeddings(E, metric="euclidean", normalize="minmax"), expected)
    with pytest.warns(UserWarning, match="equally distant"):
        flat = class_distances_from_embeddings(torch.eye(3), normalize="minmax")
    assert torch.equal(flat, torch.zeros(3, 3))


def test_properties_on_random_embeddings():
    e = torch.randn(20, 6, generator=torch.Generator().manual_seed(0))
    for metric in ("cosine", "euclidean"):
        for normalize in ("half", "minmax"):
            d = class_distances_from_embeddings(e, metric=metric, normalize=normalize)
            assert d.dtype == torch.float32 and d.shape == (20, 20)
            assert torch.equal(d, d.t()) and torch.equal(d.diagonal(), torch.zeros(20))
            assert d.min() >= 0 and d.max() <= 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="metric"):
        class_distances_from_embeddings(E, metric="manhattan")
    with pytest.raises(ValueError, match="normalize"):
        class_distances_from_embeddings(E, normalize="zscore")
    with pytest.raises(ValueError, match="zero vectors"):
        class_distances_from_embeddings(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="NaN"):
        class_distances_from_embeddings(torch.tensor([[1.0, 0.0], [float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="one row per class"):
        class_distances_from_embeddings(torch.ones(3))


def test_missing_text_extra_names_it(monkeypatch):
    monkeypatch.setattr(cd, "DEFAULT_TEXT_PACKAGE", "pml_plugin_adaptive_margin_no_such_model_package")
    with pytest.raises(ImportError, match=r"pml-plugin-adaptive-margin\[text\]"):
        class_distances_from_text(["a", "b"])
    cd._sentence_transformer.cache_clear()
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pml-plugin-adaptive-margin\[text\]"):
        cd._sentence_transformer("/nonexistent", "cpu")
    cd._sentence_transformer.cache_clear()


def test_text_model_is_never_downloaded():
    with pytest.raises(ValueError, match="never downloaded"):
        class_distances_from_text(["a", "b"], model="sentence-transformers/all-MiniLM-L6-v2")


def test_binarize_hand_values():
    # row (1, 2, 3, 10): mean 4 -> (-, -, -, +); row (0.5, -0.5): mean 0 -> (+, -)
    codes = binarize_embeddings(torch.tensor([[1.0, 2.0, 3.0, 10.0]]))
    assert torch.equal(codes, torch.tensor([[-1.0, -1.0, -1.0, 1.0]]))
    assert torch.equal(
        binarize_embeddings(torch.tensor([[0.5, -0.5]], dtype=torch.float16)),
        torch.tensor([[1.0, -1.0]], dtype=torch.float16),
    )
    # a constant row: LayerNorm gives 0 everywhere, not > 0
    assert torch.equal(binarize_embeddings(torch.full((1, 3), 7.0)), -torch.ones(1, 3))


def test_binarize_is_layernorm_then_sign_and_ranks_by_hamming():
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0)) * 3 + 1
    codes = binarize_embeddings(x)
    ln = torch.nn.LayerNorm(64, elementwise_affine=False)(x)
    assert torch.equal(codes, torch.where(ln > 0, 1.0, -1.0)) and not codes.requires_grad
    bits = (codes > 0).numpy()
    hamming = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    cos = torch.nn.functional.normalize(codes, dim=1) @ torch.nn.functional.normalize(codes, dim=1).t()
    assert np.allclose(cos.numpy(), 1 - 2 * hamming / 64, atol=1e-6)
    with pytest.raises(TypeError):
        binarize_embeddings(np.zeros((2, 3)))
