"""Evaluation and training protocols the papers use, applied to loaded :class:`~.data.DataSplits`.

* ``--query Q --gallery G``: queries searched in a separate gallery (In-Shop's protocol,
  ``ref_includes_query=False``). Q and G are both ImageFolder folders (class folders name the
  same classes) or both ``.npz`` files (``features`` + ``labels``, one label space).
* ``--samples-per-class N``: the training split cut to N samples of each class, drawn with the
  run's seed (CAM's few-shot protocol); a class with fewer samples keeps all of them.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from . import data as data_mod


def _npz_pair(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        keys = set(npz.files)
        feat = "features" if "features" in keys else ("embeddings" if "embeddings" in keys else None)
        if feat is None or "labels" not in keys:
            raise ValueError(
                f"{path}: a query / gallery .npz needs arrays 'features' (or 'embeddings') and "
                f"'labels'; found {sorted(keys)}"
            )
        x, y = np.asarray(npz[feat], dtype=np.float32), np.asarray(npz["labels"]).reshape(-1)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"{path}: features must be (N, D) with N labels, got {x.shape} and {y.shape}")
    return x, y


def load_query_gallery(
    query: str, gallery: str, transforms: Optional[data_mod.ImageTransforms] = None, feature_size: Optional[int] = None
) -> tuple[Dataset, np.ndarray, Dataset, np.ndarray]:
    """``(query, query_labels, gallery, gallery_labels)`` from two folders or two .npz files."""
    for name, path in (("query", query), ("gallery", gallery)):
        if not os.path.exists(os.path.expanduser(path)):
            raise FileNotFoundError(f"--{name} {path!r} does not exist")
    query, gallery = os.path.expanduser(query), os.path.expanduser(gallery)
    if os.path.isdir(query) and os.path.isdir(gallery):
        transform = transforms.test if transforms is not None else None
        q, g = data_mod.load_image_query_gallery(query, gallery, transform)
        return q, q.labels, g, g.labels
    if query.endswith(".npz") and gallery.endswith(".npz"):
        (xq, yq), (xg, yg) = _npz_pair(query), _npz_pair(gallery)
        if xq.shape[1] != xg.shape[1] or (feature_size is not None and xq.shape[1] != feature_size):
            raise ValueError(
                f"--query and --gallery features must have the training data's width "
                f"{feature_size}, got {xq.shape[1]} and {xg.shape[1]}"
            )
        labels, _ = data_mod.remap_labels(np.concatenate([yq, yg]).tolist())
        yq_r, yg_r = labels[: len(yq)], labels[len(yq) :]
        return (
            data_mod.TensorPairs(torch.as_tensor(xq), yq_r),
            yq_r,
            data_mod.TensorPairs(torch.as_tensor(xg), yg_r),
            yg_r,
        )
    raise ValueError(
        f"--query and --gallery must both be ImageFolder folders or both .npz files, got {query!r} and {gallery!r}"
    )


def few_shot_indices(labels: np.ndarray, samples_per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``samples_per_class`` random samples of each class (all of a smaller class)."""
    if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, int) or samples_per_class < 1:
        raise ValueError(f"samples_per_class must be a positive integer, got {samples_per_class!r}")
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.RandomState(seed % (2**32))
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(idx if len(idx) <= samples_per_class else rng.choice(idx, samples_per_class, replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.empty(0, dtype=np.int64)


def _take(dataset: Dataset, idx: np.ndarray) -> Dataset:
    """The items ``idx`` of one of the main job's datasets, as a dataset of the same kind."""
    if isinstance(dataset, data_mod.TensorPairs):
        return data_mod.TensorPairs(dataset.x[torch.as_tensor(idx)], dataset.labels[idx])
    if isinstance(dataset, data_mod.RelabeledImages):
        return data_mod.RelabeledImages([dataset.paths[i] for i in idx], dataset.labels[idx], dataset.transform)
    return torch.utils.data.Subset(dataset, idx.tolist())


def apply_protocols(
    splits: data_mod.DataSplits,
    *,
    query: Optional[str] = None,
    gallery: Optional[str] = None,
    samples_per_class: Optional[int] = None,
    seed: int = 0,
    transforms: Optional[data_mod.ImageTransforms] = None,
) -> tuple[data_mod.DataSplits, dict]:
    """The splits with ``--query/--gallery`` and ``--samples-per-class`` applied, and what was done
    (for ``config.json``)."""
    done: dict = {}
    if (query is None) != (gallery is None):
        raise ValueError("query and gallery go together: give both --query and --gallery, or neither")
    if query is not None:
        width = splits.input_shape[0] if splits.kind == "embeddings" and splits.input_shape else None
        q, yq, g, yg = load_query_gallery(query, gallery, transforms, feature_size=width)
        splits.test, splits.test_labels, splits.gallery, splits.gallery_labels = q, yq, g, yg
        splits.test_classes = list(getattr(q, "classes", np.unique(yq).tolist()))
    if splits.gallery is not None:
        done["evaluation"] = {
            "protocol": "query vs gallery (ref_includes_query=False)",
            "query": query or "from the dataset",
            "gallery": gallery or "from the dataset",
            "num_query": len(splits.test_labels),
            "num_gallery": len(splits.gallery_labels),
        }
    if samples_per_class is not None:
        idx = few_shot_indices(splits.train_labels, samples_per_class, seed)
        before = len(splits.train_labels)
        splits.train = _take(splits.train, idx)
        if splits.train_eval is not None:
            splits.train_eval = _take(splits.train_eval, idx)
        splits.train_labels = np.asarray(splits.train_labels)[idx]
        counts = np.bincount(splits.train_labels)
        done["few_shot"] = {
            "samples_per_class": samples_per_class,
            "seed": seed,
            "train_samples": int(len(idx)),
            "train_samples_before": int(before),
            "classes_with_fewer": int((counts[counts > 0] < samples_per_class).sum()),
        }
    return splits, done
