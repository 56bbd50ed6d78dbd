"""The glyphs dataset (deterministic, cached, class-disjoint) and class-disjoint validation folds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pml_plugins.pipeline import data as data_mod
from pml_plugins.pipeline import glyphs

SMALL = "classes=20,size=12,per_font=1"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PML_PLUGINS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# -- glyphs ---------------------------------------------------------------------------------------
def test_glyphs_split_class_count_and_shapes(cache):
    splits = data_mod.load_data(f"glyphs:{SMALL}")
    assert splits.kind == "glyphs" and splits.input_shape == (1, 12, 12)
    assert splits.num_train_classes == 10 and splits.num_test_classes == 10
    assert not set(splits.train_classes) & set(splits.test_classes)  # class-disjoint characters
    assert len(splits.train_labels) == 10 * 16 and len(splits.test_labels) == 10 * 16  # 16 fonts x 1
    assert np.bincount(splits.train_labels).tolist() == [16] * 10
    x, y = splits.train[0]
    assert x.shape == (1, 12, 12) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert float(x.sum()) > 0  # something is drawn
    assert data_mod.feature_shape(f"glyphs:{SMALL}") == (1, 12, 12)


def test_glyphs_are_deterministic_and_cached(cache):
    opts = glyphs.parse_glyphs_options(SMALL)
    first = glyphs.load_glyphs(opts)
    files = list(cache.glob("glyphs-*.npz"))
    assert len(files) == 1 and opts.key() in files[0].name
    again = glyphs.generate(opts)  # rendered afresh, not read from the cache
    for key in ("images", "labels", "chars", "train_classes", "test_classes"):
        assert np.array_equal(first[key], again[key]), key
    other = glyphs.generate(glyphs.parse_glyphs_options(SMALL + ",seed=1"))
    assert not np.array_equal(first["chars"], other["chars"])  # the seed picks other characters
    cached = glyphs.load_glyphs(opts)
    assert np.array_equal(cached["images"], first["images"])
    files[0].write_bytes(b"not an npz")  # a corrupt cache is regenerated, not an error
    assert np.array_equal(glyphs.load_glyphs(opts)["images"], first["images"])


def test_glyphs_drop_characters_that_render_identically(cache):
    paths = glyphs.font_paths()
    chars = glyphs.shared_characters(paths)
    assert 650 <= len(chars) <= 760  # about 730 printable characters shared by the 16 variants
    sample = ["A", "\u0391", "B", "o", "\u03bf", "0"]  # Latin A, Greek Alpha, B, Latin o, Greek omicron, zero
    clean = glyphs.render_clean(sample, paths, 24)
    keep = glyphs.drop_duplicates(sample, clean)
    assert [sample[i] for i in keep] == ["A", "B", "o", "0"]
    data = glyphs.load_glyphs(glyphs.parse_glyphs_options("size=12,per_font=1"))
    assert 500 < len(data["chars"]) < len(chars)  # the full set, minus duplicates
    assert "A" in data["chars"] and "\u0391" not in data["chars"]


def test_glyphs_options_are_checked_before_training():
    with pytest.raises(ValueError, match="key=value among classes, size"):
        data_mod.parse_dataset_spec("glyphs:colour=red")
    with pytest.raises(ValueError, match="size must be between 8 and 128"):
        data_mod.parse_dataset_spec("glyphs:size=4")
    with pytest.raises(ValueError, match="classes must be >= 4"):
        data_mod.parse_dataset_spec("glyphs:classes=2")
    with pytest.raises(ValueError, match="must be an integer"):
        data_mod.parse_dataset_spec("glyphs:size=big")
    assert data_mod.parse_dataset_spec("glyphs") == ("glyphs", None)


# -- folds ----------------------------------------------------------------------------------------
def test_class_folds_are_disjoint_cover_and_are_seeded():
    classes = list(range(11))
    folds = data_mod.class_folds(classes, 3, seed=0)
    assert sorted(len(f) for f in folds) == [3, 4, 4]
    assert sorted(np.concatenate(folds).tolist()) == classes  # every class exactly once
    for i in range(3):
        for j in range(i + 1, 3):
            assert not set(folds[i]) & set(folds[j])
    again = data_mod.class_folds(classes, 3, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again))
    assert any(not np.array_equal(a, b) for a, b in zip(folds, data_mod.class_folds(classes, 3, seed=1)))


def test_class_folds_and_validation_classes_refuse_impossible_splits():
    with pytest.raises(ValueError, match="cannot make 3 folds"):
        data_mod.class_folds(range(5), 3, seed=0)
    with pytest.raises(ValueError, match="folds must be an integer >= 1"):
        data_mod.class_folds(range(5), 0, seed=0)
    with pytest.raises(ValueError, match="val-classes must be a fraction"):
        data_mod.validation_classes(range(5), 1.0, seed=0)
    with pytest.raises(ValueError, match="fewer than 2 to train on"):
        data_mod.validation_classes(range(3), 0.5, seed=0)
    assert len(data_mod.validation_classes(range(5), 0.2, seed=0)) == 2  # at least 2 validation classes
    assert len(data_mod.validation_classes(range(100), 0.2, seed=0)) == 20
    assert len(data_mod.validation_classes(range(5), 0.0, seed=0)) == 0


def test_hold_out_classes_moves_whole_classes_and_relabels(cache):
    splits = data_mod.load_data("digits")
    held = data_mod.validation_classes(range(splits.num_train_classes), 0.4, seed=3)
    part = data_mod.hold_out_classes(splits, held)
    original = splits.train_labels
    assert len(part.train_labels) + len(part.val_labels) == len(original)
    assert len(part.val_labels) == int(np.isin(original, held).sum())
    assert sorted(np.unique(part.train_labels).tolist()) == list(range(5 - len(held)))
    assert sorted(np.unique(part.val_labels).tolist()) == list(range(len(held)))
    assert set(part.train_classes).isdisjoint(held.tolist())
    # the samples really are the held-out classes' images, in order
    idx = np.flatnonzero(np.isin(original, held))
    assert torch.equal(part.val[0][0], splits.train[int(idx[0])][0])
    assert part.test is splits.test and np.array_equal(part.test_labels, splits.test_labels)
    assert "validation" in part.describe()
