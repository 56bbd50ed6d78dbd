"""Datasets for the main job, always split by class (train and test classes are disjoint).

Dataset specs (``--dataset``):

``digits``
    scikit-learn's bundled ``load_digits`` (1797 real 8x8 handwritten digits, no download),
    each placed at a random offset on a 12x12 canvas (the same placement every run), train on
    classes 0-4, test on the unseen classes 5-9. The shift is what makes it a metric-learning
    task: on the raw 8x8 images, nearest neighbours in pixel space (what an untrained network
    gives) are already ~97% Recall@1, so no loss can be told apart from the untrained floor.
``digits:raw``
    the same split on the unshifted 8x8 images.
``glyphs`` / ``glyphs:classes=200,size=32,per_font=2,seed=0``
    ~710 printable characters rendered from the fonts matplotlib ships (a class is a character,
    its samples the 16 font variants under seeded affine distortion), half the classes train and
    the other half test; generated once and cached (:mod:`pml_plugins.pipeline.glyphs`).
``imagefolder:PATH``
    a torchvision ``ImageFolder`` tree; ``PATH/train`` + ``PATH/test`` when both exist;
    ``PATH/train`` + ``PATH/query`` + ``PATH/gallery`` (In-Shop's protocol: queries searched in
    a separate gallery); otherwise the first half of the sorted classes trains and the second
    half tests (the CUB-200 / Cars-196 protocol).
``cub:PATH`` / ``cars:PATH`` / ``sop:PATH``
    CUB-200-2011, Cars-196, Stanford Online Products through PML's own dataset classes, from
    files already on disk (never downloaded at run time).
``embeddings:PATH.npz``
    precomputed features: ``features`` + ``labels`` (split by class like ``imagefolder``),
    ``train_features``/``train_labels``/``test_features``/``test_labels``, or
    ``train_*`` + ``query_features``/``query_labels``/``gallery_features``/``gallery_labels``.

Labels are remapped to ``0..C-1`` within each split, as classification-style losses expect.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

DATASET_KINDS = ("digits", "glyphs", "imagefolder", "cub", "cars", "sop", "embeddings")
_IMAGE_KINDS = ("imagefolder", "cub", "cars", "sop")
_ALIASES = {
    "cub200": "cub",
    "cub_200_2011": "cub",
    "cars196": "cars",
    "stanford_online_products": "sop",
    "npz": "embeddings",
    "folder": "imagefolder",
}


@dataclass
class ImageTransforms:
    """Train / test transforms for image datasets (from timm's data config for timm backbones)."""

    train: Optional[Callable] = None
    test: Optional[Callable] = None


@dataclass
class DataSplits:
    """The class-disjoint train / test splits of one dataset."""

    spec: str
    kind: str
    train: Dataset
    test: Dataset
    train_labels: np.ndarray
    test_labels: np.ndarray
    #: (C, H, W) for images, (D,) for feature vectors; None when set by the transforms.
    input_shape: Optional[tuple] = None
    train_classes: list = field(default_factory=list)
    test_classes: list = field(default_factory=list)
    #: the training split with the evaluation transform (same items, same order); None: ``train``
    #: has no augmentation (tensors), so it serves as is
    train_eval: Optional[Dataset] = None
    #: a separate gallery the ``test`` split (then the query set) is searched in; None: ``test``
    #: is queried against itself
    gallery: Optional[Dataset] = None
    gallery_labels: Optional[np.ndarray] = None

    @property
    def train_without_augmentation(self) -> Dataset:
        """The training items as the evaluation sees them (for databases, references, pre-computed rows)."""
        return self.train_eval if self.train_eval is not None else self.train

    #: validation classes held out of the training classes (:func:`hold_out_classes`); None: no validation
    val: Optional[Dataset] = None
    val_labels: Optional[np.ndarray] = None

    @property
    def num_train_classes(self) -> int:
        return int(len(np.unique(self.train_labels)))

    @property
    def num_test_classes(self) -> int:
        return int(len(np.unique(self.test_labels)))

    def describe(self) -> str:
        val = (
            ""
            if self.val_labels is None
            else f"validation {len(self.val_labels)} samples / {len(np.unique(self.val_labels))} classes, "
        )
        train = f"{self.spec}: train {len(self.train_labels)} samples / {self.num_train_classes} classes, {val}"
        if self.gallery is not None:
            return (
                train + f"query {len(self.test_labels)} samples / {self.num_test_classes} classes, gallery "
                f"{len(self.gallery_labels)} samples / {len(np.unique(self.gallery_labels))} classes"
            )
        return train + f"test {len(self.test_labels)} samples / {self.num_test_classes} classes (disjoint)"


class TensorPairs(Dataset):
    """``(x[i], y[i])`` pairs held in memory (digits, precomputed embeddings)."""

    def __init__(self, x: torch.Tensor, y: np.ndarray):
        self.x = x
        self.labels = np.asarray(y, dtype=np.int64)
        self._y = torch.as_tensor(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.x[i], self._y[i]


class RelabeledImages(Dataset):
    """Image files with labels remapped to 0..C-1; loads lazily with PIL."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, transform: Optional[Callable] = None):
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            img = img.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


def parse_dataset_spec(spec: str) -> tuple[str, Optional[str]]:
    """``"imagefolder:/data/x"`` -> ``("imagefolder", "/data/x")``; checks the kind and the path."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("dataset must be a non-empty string such as 'digits' or 'imagefolder:PATH'")
    kind, _, path = spec.strip().partition(":")
    kind = _ALIASES.get(kind.lower().replace("-", "_"), kind.lower().replace("-", "_"))
    if kind not in DATASET_KINDS:
        close = difflib.get_close_matches(kind, DATASET_KINDS, n=2, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown dataset {spec!r}.{hint} Known: digits, glyphs, imagefolder:PATH, cub:PATH, "
            f"cars:PATH, sop:PATH, embeddings:PATH.npz"
        )
    if kind == "digits":
        if path not in ("", "raw", "shifted"):
            raise ValueError(
                f"digits takes no path: use 'digits' (shifted on a 12x12 canvas) or 'digits:raw', got {spec!r}"
            )
        return kind, path or None
    if kind == "glyphs":
        from .glyphs import parse_glyphs_options

        parse_glyphs_options(path)  # checks the options now, before any training
        return kind, path or None
    if not path:
        raise ValueError(f"dataset {kind!r} needs a path: '{kind}:PATH'")
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset path {path!r} does not exist (nothing is downloaded at run time)")
    if kind == "embeddings" and not os.path.isfile(path):
        raise ValueError(f"embeddings:PATH must name a .npz file, {path!r} is a folder")
    if kind in _IMAGE_KINDS and not os.path.isdir(path):
        raise ValueError(f"{kind}:PATH must name a folder, {path!r} is a file")
    return kind, path


def is_image_dataset(kind: str) -> bool:
    return kind in _IMAGE_KINDS


def feature_shape(spec: str) -> Optional[tuple]:
    """The input shape a built-in backbone must accept, when the data fixes it (not images)."""
    kind, path = parse_dataset_spec(spec)
    if kind == "digits":
        return (1, 8, 8) if path == "raw" else (1, DIGITS_CANVAS, DIGITS_CANVAS)
    if kind == "glyphs":
        from .glyphs import parse_glyphs_options

        size = parse_glyphs_options(path).size
        return (1, size, size)
    if kind == "embeddings":
        return (_load_npz(path)[0].shape[1],)
    return None


def load_data(spec: str, transforms: Optional[ImageTransforms] = None) -> DataSplits:
    """Load ``spec`` as class-disjoint train / test splits; errors name the problem."""
    kind, path = parse_dataset_spec(spec)
    transforms = transforms or ImageTransforms()
    if kind == "digits":
        splits = _digits(spec, shifted=path != "raw")
    elif kind == "glyphs":
        splits = _glyphs(spec, path)
    elif kind == "embeddings":
        splits = _embeddings(spec, path)
    elif kind == "imagefolder":
        splits = _imagefolder(spec, path, transforms)
    else:
        splits = _pml_dataset(spec, kind, path, transforms)
    for name, labels in (("train", splits.train_labels), ("test", splits.test_labels)):
        n = len(np.unique(labels))
        if n < 2:
            raise ValueError(
                f"dataset {spec!r}: the {name} split has {n} class(es); metric learning "
                f"needs at least 2 classes per split (the splits are class-disjoint)"
            )
    return splits


def _remap(labels: Sequence[Any]) -> tuple[np.ndarray, list]:
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[c] for c in labels], dtype=np.int64), classes


def remap_labels(labels: Sequence[Any]) -> tuple[np.ndarray, list]:
    """Labels as ``0..C-1`` in sorted class order, and the sorted classes."""
    return _remap(labels)


def _split_classes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the train / test samples: the first half of the sorted classes trains."""
    classes = np.unique(labels)
    train_classes = classes[: len(classes) // 2]
    train_mask = np.isin(labels, train_classes)
    return train_mask, ~train_mask


DIGITS_CANVAS = 12


def _digits(spec: str, shifted: bool = True) -> DataSplits:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    y = np.asarray(data.target, dtype=np.int64)
    if shifted:  # a fixed RNG: the dataset is the same whatever the run's seed
        offsets = np.random.RandomState(0).randint(0, DIGITS_CANVAS - 8 + 1, size=(len(x), 2))
        canvas = torch.zeros(len(x), 1, DIGITS_CANVAS, DIGITS_CANVAS)
        for dy, dx in {tuple(o) for o in offsets.tolist()}:
            rows = torch.as_tensor(np.flatnonzero((offsets[:, 0] == dy) & (offsets[:, 1] == dx)))
            canvas[rows, :, dy : dy + 8, dx : dx + 8] = x[rows]
        x = canvas
    train_mask = y < 5
    test_y, _ = _remap(y[~train_mask].tolist())
    return DataSplits(
        spec=spec,
        kind="digits",
        train=TensorPairs(x[train_mask], y[train_mask]),
        test=TensorPairs(x[~train_mask], test_y),
        train_labels=y[train_mask],
        test_labels=test_y,
        input_shape=tuple(x.shape[1:]),
        train_classes=list(range(5)),
        test_classes=list(range(5, 10)),
    )


def _glyphs(spec: str, options: Optional[str]) -> DataSplits:
    from .glyphs import load_glyphs, parse_glyphs_options

    data = load_glyphs(parse_glyphs_options(options))
    x = torch.as_tensor(data["images"]).float().div_(255.0).unsqueeze(1)  # (N, 1, S, S) in [0, 1]
    y = np.asarray(data["labels"], dtype=np.int64)
    chars = [str(c) for c in data["chars"]]
    train_mask = np.isin(y, data["train_classes"])
    train_y, train_classes = _remap(y[train_mask].tolist())
    test_y, test_classes = _remap(y[~train_mask].tolist())
    return DataSplits(
        spec=spec,
        kind="glyphs",
        train=TensorPairs(x[train_mask], train_y),
        test=TensorPairs(x[~train_mask], test_y),
        train_labels=train_y,
        test_labels=test_y,
        input_shape=tuple(x.shape[1:]),
        train_classes=[chars[c] for c in train_classes],
        test_classes=[chars[c] for c in test_classes],
    )


def _load_npz(path: str) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    with np.load(path, allow_pickle=False) as npz:
        keys = set(npz.files)
        if {"train_features", "train_labels", *QUERY_GALLERY_KEYS} <= keys:
            return npz["train_features"], npz["train_labels"], npz["query_features"], npz["query_labels"]
        if {"train_features", "train_labels", "test_features", "test_labels"} <= keys:
            return npz["train_features"], npz["train_labels"], npz["test_features"], npz["test_labels"]
        feat_key = "features" if "features" in keys else ("embeddings" if "embeddings" in keys else None)
        if feat_key is None or "labels" not in keys:
            raise ValueError(
                f"{path}: expected arrays 'features' (or 'embeddings') and 'labels', or "
                f"'train_features', 'train_labels', 'test_features', 'test_labels'; found {sorted(keys)}"
            )
        return npz[feat_key], npz["labels"], None, None


QUERY_GALLERY_KEYS = ("query_features", "query_labels", "gallery_features", "gallery_labels")


def load_npz_gallery(path: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``(gallery_features, gallery_labels)`` of an .npz that has them, else None."""
    with np.load(path, allow_pickle=False) as npz:
        if set(QUERY_GALLERY_KEYS) <= set(npz.files):
            return npz["gallery_features"], np.asarray(npz["gallery_labels"]).reshape(-1)
    return None


def _embeddings(spec: str, path: str) -> DataSplits:
    x, y, xt, yt = _load_npz(path)
    if xt is None:
        y = np.asarray(y).reshape(-1)
        if x.ndim != 2 or len(x) != len(y):
            raise ValueError(f"{path}: 'features' must be (N, D) and 'labels' (N,), got {x.shape} and {y.shape}")
        train_mask, test_mask = _split_classes(y)
        x, xt, yt, y = x[train_mask], x[test_mask], y[test_mask], y[train_mask]
    for name, (a, b) in {"train": (x, y), "test": (xt, yt)}.items():
        if a.ndim != 2 or len(a) != len(np.asarray(b).reshape(-1)):
            raise ValueError(f"{path}: {name} features must be (N, D) with N labels, got {a.shape} and {np.shape(b)}")
    if x.shape[1] != xt.shape[1]:
        raise ValueError(f"{path}: train and test features differ in width ({x.shape[1]} vs {xt.shape[1]})")
    y_r, train_classes = _remap(np.asarray(y).reshape(-1).tolist())
    gallery = load_npz_gallery(path)
    if gallery is not None:  # query / gallery share one label space: remap them together
        xg, yg = gallery
        if xg.ndim != 2 or xg.shape[1] != x.shape[1] or len(xg) != len(yg):
            raise ValueError(
                f"{path}: gallery_features must be (N, {x.shape[1]}) with N gallery_labels, "
                f"got {xg.shape} and {yg.shape}"
            )
        both, test_classes = _remap(np.concatenate([np.asarray(yt).reshape(-1), yg]).tolist())
        yt_r, yg_r = both[: len(yt)], both[len(yt) :]
    else:
        yt_r, test_classes = _remap(np.asarray(yt).reshape(-1).tolist())
    splits = DataSplits(
        spec=spec,
        kind="embeddings",
        train=TensorPairs(torch.as_tensor(np.asarray(x, dtype=np.float32)), y_r),
        test=TensorPairs(torch.as_tensor(np.asarray(xt, dtype=np.float32)), yt_r),
        train_labels=y_r,
        test_labels=yt_r,
        input_shape=(int(x.shape[1]),),
        train_classes=train_classes,
        test_classes=test_classes,
    )
    if gallery is not None:
        splits.gallery = TensorPairs(torch.as_tensor(np.asarray(xg, dtype=np.float32)), yg_r)
        splits.gallery_labels = yg_r
    return splits


def _scan_folder(root: str) -> tuple[list[str], list[str]]:
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(root)
    except FileNotFoundError as exc:  # torchvision: "Couldn't find any class folder" / no valid files
        raise FileNotFoundError(f"{root}: {exc}") from None
    return [p for p, _ in folder.samples], [folder.classes[t] for _, t in folder.samples]


def _imagefolder(spec: str, path: str, transforms: ImageTransforms) -> DataSplits:
    train_dir, test_dir = os.path.join(path, "train"), os.path.join(path, "test")
    query_dir, gallery_dir = os.path.join(path, "query"), os.path.join(path, "gallery")
    if os.path.isdir(train_dir) and os.path.isdir(query_dir) and os.path.isdir(gallery_dir):
        train_paths, train_names = _scan_folder(train_dir)
        y, train_classes = _remap(train_names)
        query, gallery = load_image_query_gallery(query_dir, gallery_dir, transforms.test)
        return DataSplits(
            spec=spec,
            kind="imagefolder",
            train=RelabeledImages(train_paths, y, transforms.train),
            test=query,
            train_labels=y,
            test_labels=query.labels,
            train_classes=train_classes,
            test_classes=query.classes,
            train_eval=RelabeledImages(train_paths, y, transforms.test),
            gallery=gallery,
            gallery_labels=gallery.labels,
        )
    if os.path.isdir(train_dir) and os.path.isdir(test_dir):
        train_paths, train_names = _scan_folder(train_dir)
        test_paths, test_names = _scan_folder(test_dir)
    else:
        paths, names = _scan_folder(path)
        classes = sorted(set(names))
        train_set = set(classes[: len(classes) // 2])
        train_paths = [p for p, n in zip(paths, names) if n in train_set]
        train_names = [n for n in names if n in train_set]
        test_paths = [p for p, n in zip(paths, names) if n not in train_set]
        test_names = [n for n in names if n not in train_set]
    y, train_classes = _remap(train_names)
    yt, test_classes = _remap(test_names)
    return DataSplits(
        spec=spec,
        kind="imagefolder",
        train=RelabeledImages(train_paths, y, transforms.train),
        test=RelabeledImages(test_paths, yt, transforms.test),
        train_labels=y,
        test_labels=yt,
        train_classes=train_classes,
        test_classes=test_classes,
        train_eval=RelabeledImages(train_paths, y, transforms.test),
    )


def load_image_query_gallery(
    query_dir: str, gallery_dir: str, transform: Optional[Callable] = None
) -> tuple[RelabeledImages, RelabeledImages]:
    """Two ImageFolder trees whose class folders name the same classes (In-Shop's item ids), as
    datasets with one shared label space (``.classes`` lists it)."""
    query_paths, query_names = _scan_folder(query_dir)
    gallery_paths, gallery_names = _scan_folder(gallery_dir)
    labels, classes = _remap(query_names + gallery_names)
    missing = sorted(set(query_names) - set(gallery_names))
    if len(missing) == len(set(query_names)):
        raise ValueError(
            f"{query_dir} and {gallery_dir} share no class folder: a query can never find its "
            f"class in the gallery (first query classes: {missing[:5]})"
        )
    query = RelabeledImages(query_paths, labels[: len(query_paths)], transform)
    gallery = RelabeledImages(gallery_paths, labels[len(query_paths) :], transform)
    query.classes = gallery.classes = classes
    return query, gallery


def _pml_dataset(spec: str, kind: str, path: str, transforms: ImageTransforms) -> DataSplits:
    from pytorch_metric_learning import datasets as pml_datasets

    cls, expected = {
        "cub": (pml_datasets.CUB, os.path.join("CUB_200_2011", "images.txt")),
        "cars": (pml_datasets.Cars196, "names.csv"),
        "sop": (pml_datasets.StanfordOnlineProducts, os.path.join("Stanford_Online_Products", "Ebay_train.txt")),
    }[kind]
    if not os.path.exists(os.path.join(path, expected)):
        raise FileNotFoundError(
            f"{kind}:{path}: {os.path.join(path, expected)} not found; point to the folder that "
            f"holds the extracted dataset as PML's {cls.__name__} expects (nothing is downloaded)"
        )
    parts = {}
    for split in ("train", "test"):
        ds = cls(root=path, split=split, download=False)
        labels, classes = _remap(list(ds.labels))
        parts[split] = (RelabeledImages(ds.paths, labels, getattr(transforms, split)), labels, classes)
    train = parts["train"][0]
    return DataSplits(
        spec=spec,
        kind=kind,
        train=train,
        test=parts["test"][0],
        train_labels=parts["train"][1],
        test_labels=parts["test"][1],
        train_classes=parts["train"][2],
        test_classes=parts["test"][2],
        train_eval=RelabeledImages(train.paths, train.labels, transforms.test),
    )


class RelabeledSubset(Dataset):
    """``dataset[indices[i]]`` with its label replaced by ``labels[i]`` (classes remapped to 0..C-1)."""

    def __init__(self, dataset: Dataset, indices: np.ndarray, labels: np.ndarray):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.indices) != len(self.labels):
            raise ValueError(f"indices ({len(self.indices)}) and labels ({len(self.labels)}) must have one entry each")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[int(self.indices[i])][0], int(self.labels[i])


# -- class-disjoint validation (Musgrave et al. 2020: folds of the training classes) --------------
def class_folds(classes: Sequence[Any], k: int, seed: int) -> list[np.ndarray]:
    """Split ``classes`` into ``k`` class-disjoint folds: a seeded shuffle, sizes differing by at most
    one. Every fold needs >= 2 classes (MAP@R on one class says nothing) and, for k > 1, the other
    folds together >= 2 (something to train on)."""
    classes = np.asarray(list(classes))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"folds must be an integer >= 1, got {k!r}")
    if len(np.unique(classes)) != len(classes):
        raise ValueError("classes must be distinct")
    if len(classes) < 2 * k or (k > 1 and len(classes) - (len(classes) + k - 1) // k < 2):
        raise ValueError(
            f"folds={k}: {len(classes)} training classes cannot make {k} folds of >= 2 classes each "
            f"(at most {max(len(classes) // 2, 1)} folds here)"
        )
    order = np.random.RandomState(seed % 2**32).permutation(len(classes))
    return [np.sort(classes[part]) for part in np.array_split(order, k)]


def validation_classes(classes: Sequence[Any], fraction: float, seed: int) -> np.ndarray:
    """A seeded ``fraction`` of ``classes`` to hold out for validation (at least 2, leaving at least 2
    to train on); ``fraction == 0``: none."""
    classes = np.asarray(list(classes))
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"val-classes must be a fraction in [0, 1), got {fraction!r}")
    if fraction == 0:
        return classes[:0]
    n = max(2, int(round(fraction * len(classes))))
    if len(classes) - n < 2:
        raise ValueError(
            f"val-classes {fraction:g}: {len(classes)} training classes leave fewer than 2 to train on "
            f"after holding out {n} for validation (validation needs >= 2 classes)"
        )
    order = np.random.RandomState(seed % 2**32).permutation(len(classes))
    return np.sort(classes[order[:n]])


def hold_out_classes(splits: DataSplits, held_out: Sequence[int]) -> DataSplits:
    """``splits`` with the training classes ``held_out`` (remapped label ids) moved to ``val``; both
    parts are relabeled ``0..C-1``. The test split is untouched."""
    held = np.asarray(list(held_out), dtype=np.int64)
    labels = np.asarray(splits.train_labels)
    unknown = np.setdiff1d(held, labels)
    if len(unknown):
        raise ValueError(f"held-out classes {unknown.tolist()} are not training classes")
    val_mask = np.isin(labels, held)
    train_idx, val_idx = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
    train_y, train_ids = _remap(labels[train_idx].tolist())
    val_y, val_ids = _remap(labels[val_idx].tolist())
    names = list(splits.train_classes) or list(range(int(labels.max()) + 1))
    # validation is evaluation: its items come without the training augmentation
    train_eval = None if splits.train_eval is None else RelabeledSubset(splits.train_eval, train_idx, train_y)
    return dataclasses.replace(
        splits,
        train=RelabeledSubset(splits.train, train_idx, train_y),
        train_labels=train_y,
        train_classes=[names[c] for c in train_ids],
        train_eval=train_eval,
        val=RelabeledSubset(splits.train_without_augmentation, val_idx, val_y),
        val_labels=val_y,
    )


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Labels of a dataset: its ``labels``/``targets`` attribute, else read item by item."""
    for attr in ("labels", "targets"):
        value = getattr(dataset, attr, None)
        if value is not None:
            return np.asarray(value).reshape(len(dataset), -1)[:, 0] if np.ndim(value) > 1 else np.asarray(value)
    return np.array([int(dataset[i][1]) for i in range(len(dataset))])


def default_image_transforms(image_size: int) -> ImageTransforms:
    """Transforms for the built-in backbones on image folders (timm backbones use timm's)."""
    from torchvision import transforms as T

    norm = T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    train = T.Compose([T.RandomResizedCrop(image_size, scale=(0.6, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(), norm])
    return ImageTransforms(train=train, test=test)
