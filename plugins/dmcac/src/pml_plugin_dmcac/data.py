"""Data pieces for DMCAC training: the query/database split, multi-view items, the B*A collate."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch


def _as_label_tensor(labels: Any) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (num_samples,), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    return labels.long()


def split_query_database(
    labels: Any, database_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, disjoint training query / database split (the paper's 80/20, section 4.1).

    In each class with n samples, ``round(n * database_fraction)`` samples (at least 1 and at
    most n - 1 when n >= 2, so every class is on both sides; a singleton stays a query) go to
    the database, chosen at random with ``seed``.

    Args:
        labels: ``(num_samples,)`` integer labels (tensor, array or list).
        database_fraction: share of each class that goes to the database, in (0, 1).
        seed: seed of the random choice (same seed, same split).
    Returns:
        ``(query_indices, database_indices)``: sorted 1-D long tensors, disjoint, covering all samples.
    """
    labels = _as_label_tensor(labels)
    if not 0.0 < float(database_fraction) < 1.0:
        raise ValueError(f"database_fraction must be in (0, 1), got {database_fraction!r}")
    if labels.numel() == 0:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty
    g = torch.Generator().manual_seed(int(seed))
    # shuffle, then group by class keeping the shuffled order: a random order within each class
    perm = torch.randperm(labels.numel(), generator=g)
    order = perm[torch.argsort(labels[perm], stable=True)]
    classes, counts = torch.unique(labels, return_counts=True)
    n_db = torch.round(counts.double() * float(database_fraction)).long()
    n_db = torch.where(counts >= 2, n_db.clamp(min=1).minimum(counts - 1), torch.zeros_like(n_db))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(labels.numel()) - torch.repeat_interleave(starts, counts)  # position within its class
    is_db = rank < torch.repeat_interleave(n_db, counts)
    return order[~is_db].sort().values, order[is_db].sort().values


def dataset_labels(dataset: torch.utils.data.Dataset) -> torch.Tensor:
    """The labels of a dataset without loading its inputs where possible.

    Understands ``TensorDataset`` (second tensor), ``Subset``, and datasets with ``targets`` /
    ``labels`` (torchvision folders); otherwise iterates over the items once.
    """
    if isinstance(dataset, torch.utils.data.Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) >= 2:
        return _as_label_tensor(dataset.tensors[1])
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            return _as_label_tensor(getattr(dataset, attr))
    return _as_label_tensor([int(dataset[i][1]) for i in range(len(dataset))])


class TensorViewAugment:
    """Cheap augmentation for plain tensors (no torchvision needed), e.g. the 8x8 digits vectors.

    A 1-D vector whose length is a square s*s is treated as an s x s image (as are 2-D and 3-D
    ``(C, H, W)`` tensors): a random shift of up to ``max_shift`` pixels per axis (zero fill),
    then Gaussian noise with ``noise_std`` times the input's standard deviation. Other vectors
    only get the noise.
    """

    def __init__(self, max_shift: int = 1, noise_std: float = 0.1, generator: Optional[torch.Generator] = None):
        self.max_shift, self.noise_std, self.generator = int(max_shift), float(noise_std), generator

    def _shift(self, img: torch.Tensor) -> torch.Tensor:
        s = self.max_shift
        if s <= 0:
            return img
        dy, dx = (int(v) for v in torch.randint(-s, s + 1, (2,), generator=self.generator))
        h, w = img.shape[-2:]
        padded = torch.nn.functional.pad(img, (s, s, s, s))
        return padded[..., s - dy : s - dy + h, s - dx : s - dx + w]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        out = x.float()
        side = math.isqrt(out.numel()) if out.ndim == 1 else 0
        if out.ndim == 1 and side * side == out.numel() and side > 1:
            out = self._shift(out.view(side, side)).reshape(-1)
        elif out.ndim in (2, 3):
            out = self._shift(out)
        if self.noise_std > 0:
            scale = out.std() if out.numel() > 1 else out.new_tensor(1.0)
            out = out + torch.randn(out.shape, generator=self.generator) * self.noise_std * scale
        return out.to(x.dtype) if x.is_floating_point() else out


def rand_augment(num_ops: int = 2, magnitude: int = 9) -> Callable:
    """torchvision's RandAugment (the paper's query augmentation), for PIL images / uint8 tensors."""
    from torchvision import transforms  # an image-only dependency: imported when images are used

    return transforms.RandAugment(num_ops=num_ops, magnitude=magnitude)


class MultiViewDataset(torch.utils.data.Dataset):
    """Items ``(views (A, ...), label)``: view 0 the original, views 1..A-1 augmented.

    Two ways to build the views:

    * image datasets that expose their files — torchvision folders (``loader``, ``samples``,
      ``transform``) or datasets with ``paths``, ``labels`` and ``transform`` (the main job's
      image splits): the raw RGB image goes through ``view_transform`` (RandAugment by default)
      and then the dataset's own ``transform`` (resize, crop, ToTensor, normalise), so every view
      is shaped exactly as the original;
    * any other dataset of ``(tensor, label)`` items: ``view_transform`` is applied to the item's
      tensor (default :class:`TensorViewAugment`; PIL images get RandAugment).

    Args:
        dataset: the base training dataset.
        num_views: A, views per item (1 = the original only).
        indices: the items of ``dataset`` to use (e.g. the query split), default all.
        view_transform: the augmentation for views 1..A-1 (default as above).
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        num_views: int,
        indices: Optional[Sequence[int]] = None,
        view_transform: Optional[Callable] = None,
    ):
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        self.dataset, self.num_views = dataset, int(num_views)
        self.indices = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        self.is_folder = all(hasattr(dataset, a) for a in ("loader", "samples", "transform"))
        self.has_paths = not self.is_folder and all(hasattr(dataset, a) for a in ("paths", "labels", "transform"))
        self.is_folder = self.is_folder or self.has_paths
        if view_transform is None:
            view_transform = rand_augment() if self.is_folder else None
        self.view_transform = view_transform
        self._tensor_augment = TensorViewAugment()
        self._labels: Optional[torch.Tensor] = None

    @property
    def labels(self) -> torch.Tensor:
        """Labels of the items (e.g. for a sampler)."""
        if self._labels is None:
            self._labels = dataset_labels(self.dataset)[self.indices]
        return self._labels

    def __len__(self) -> int:
        return int(self.indices.numel())

    def _augment(self, x: Any) -> Any:
        if self.view_transform is not None:
            return self.view_transform(x)
        if isinstance(x, torch.Tensor) and x.dtype != torch.uint8:
            return self._tensor_augment(x)
        return rand_augment()(x)  # PIL image or uint8 tensor

    def __getitem__(self, i: int):
        j = int(self.indices[i])
        if self.is_folder:
            if self.has_paths:
                from PIL import Image

                with Image.open(self.dataset.paths[j]) as img:
                    raw = img.convert("RGB")
                label = int(self.dataset.labels[j])
            else:
                path, label = self.dataset.samples[j]
                raw = self.dataset.loader(path)
            own = self.dataset.transform or (lambda x: x)
            views = [own(raw)] + [own(self._augment(raw)) for _ in range(self.num_views - 1)]
            if getattr(self.dataset, "target_transform", None) is not None:
                label = self.dataset.target_transform(label)
        else:
            x, label = self.dataset[j][:2]
            views = [x] + [self._augment(x) for _ in range(self.num_views - 1)]
        views = [torch.as_tensor(v) for v in views]
        return torch.stack(views), torch.as_tensor(label)


def multi_view_collate(batch: Sequence[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """PML trainer ``collate_fn``: items ``(views (A, ...), label)`` -> ``(B*A, ...)`` rows with
    the A views of an item consecutive, and the label repeated A times."""
    views = torch.stack([item[0] for item in batch])  # (B, A, ...)
    labels = torch.stack([torch.as_tensor(item[1]) for item in batch]).long()
    num_views = views.shape[1]
    return views.reshape(-1, *views.shape[2:]), labels.repeat_interleave(num_views)
