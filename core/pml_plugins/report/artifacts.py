"""The run-folder contract the report reads, and the writers the training loop calls.

A run folder ``OUT/`` holds, besides ``config.json``, ``metrics.json`` and ``checkpoint.pt``:

``metrics.jsonl``
    one JSON object per line, one line per epoch, appended and flushed as the epoch ends:
    ``epoch`` (1-based), ``loss`` (mean training loss of the epoch), ``lr`` (a dict, one learning
    rate per optimizer), ``seconds`` (wall time of the epoch) and, where the run validates,
    ``val_<metric>`` numbers. Other numeric keys are allowed and plotted as they come.
``test_embeddings.npz``
    the test split as the evaluation saw it: ``embeddings`` (N, D) float32, ``labels`` (N,) int64
    (classes ``0..C-1``), ``class_names`` (C,) str (the dataset's names of those classes),
    ``retrieval_distance`` (``"cosine"`` or ``"euclidean"``), and for image data ``thumbnails``
    (M, h, w) or (M, h, w, 3) uint8 with ``thumbnail_index`` (M,) int64, the rows of
    ``embeddings`` they show. At most :data:`MAX_THUMBNAILS` thumbnails (a seeded sample when
    the test split is larger) of at most :data:`THUMBNAIL_SIZE` pixels a side, compressed, so the
    file stays a few MB; embeddings are kept whole (N x D x 4 bytes).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

METRICS_JSONL = "metrics.jsonl"
TEST_ARTIFACTS = "test_embeddings.npz"
#: most thumbnails a run folder keeps (a seeded sample of a larger test split)
MAX_THUMBNAILS = 10_000
#: longest side of a thumbnail, in pixels (smaller images are kept at their size)
THUMBNAIL_SIZE = 32

PathLike = Union[str, "os.PathLike[str]"]


# -- per-epoch log -------------------------------------------------------------------------------
def append_metrics_line(out: PathLike, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``OUT/metrics.jsonl`` and flush it to disk.

    Non-finite floats are written as ``null`` (JSON has no NaN), numpy scalars as numbers.
    """
    if not isinstance(record, Mapping):
        raise TypeError(f"record must be a mapping of metric names to values, got {type(record).__name__}")
    path = Path(out) / METRICS_JSONL
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_clean(dict(record)), allow_nan=False)
    with open(path, "a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_metrics_jsonl(run_dir: PathLike) -> list[dict]:
    """The epoch records of ``RUN_DIR/metrics.jsonl`` ([] when absent); a torn last line is skipped."""
    path = Path(run_dir) / METRICS_JSONL
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue  # an interrupted write leaves at most one partial line
        if isinstance(value, dict):
            records.append(value)
    return records


def _clean(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # 0-d tensors and arrays
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# -- test embeddings ---------------------------------------------------------------------------
def save_test_artifacts(
    out: PathLike,
    embeddings: Any,
    labels: Any,
    thumbnails: Optional[Any] = None,
    *,
    thumbnail_index: Optional[Sequence[int]] = None,
    class_names: Optional[Sequence] = None,
    retrieval_distance: str = "cosine",
) -> Path:
    """Write ``OUT/test_embeddings.npz`` (see the module docstring); returns its path.

    ``embeddings`` (N, D) and ``labels`` (N,) are arrays or tensors. ``thumbnails`` are uint8
    images (M, h, w) or (M, h, w, 3) of the rows ``thumbnail_index`` (default ``0..M-1``).
    """
    emb = _to_numpy(embeddings, "embeddings").astype(np.float32, copy=False)
    lab = _to_numpy(labels, "labels")
    if lab.ndim == 2 and lab.shape[1] >= 1:
        lab = lab[:, 0]  # PML's testers keep labels as (N, 1)
    if emb.ndim != 2 or lab.ndim != 1 or len(emb) != len(lab):
        raise ValueError(f"embeddings must be (N, D) and labels (N,), got {emb.shape} and {lab.shape}")
    if not np.all(np.isfinite(emb)):
        raise ValueError("embeddings contain NaN or inf")
    if retrieval_distance not in ("cosine", "euclidean"):
        raise ValueError(f"retrieval_distance must be 'cosine' or 'euclidean', got {retrieval_distance!r}")
    arrays: dict[str, np.ndarray] = {
        "embeddings": emb,
        "labels": lab.astype(np.int64),
        "retrieval_distance": np.array(retrieval_distance),
    }
    if class_names is not None:
        names = np.array([str(c) for c in class_names])
        if lab.size and (lab.min() < 0 or lab.max() >= len(names)):
            raise ValueError(f"class_names has {len(names)} names but labels range over {lab.min()}..{lab.max()}")
        arrays["class_names"] = names
    if thumbnails is not None:
        thumbs = _to_numpy(thumbnails, "thumbnails")
        if thumbs.dtype != np.uint8 or thumbs.ndim not in (3, 4) or (thumbs.ndim == 4 and thumbs.shape[3] != 3):
            raise ValueError(f"thumbnails must be uint8 (M, h, w) or (M, h, w, 3), got {thumbs.dtype} {thumbs.shape}")
        index = np.arange(len(thumbs)) if thumbnail_index is None else np.asarray(thumbnail_index, dtype=np.int64)
        if index.shape != (len(thumbs),) or (index.size and (index.min() < 0 or index.max() >= len(emb))):
            raise ValueError(f"thumbnail_index must hold {len(thumbs)} row numbers in 0..{len(emb) - 1}")
        if len(thumbs) > MAX_THUMBNAILS or max(thumbs.shape[1:3]) > THUMBNAIL_SIZE:
            raise ValueError(
                f"thumbnails are bounded to {MAX_THUMBNAILS} images of at most {THUMBNAIL_SIZE} px a "
                f"side, got {thumbs.shape}; make them with make_thumbnails()"
            )
        arrays["thumbnails"], arrays["thumbnail_index"] = thumbs, index
    path = Path(out) / TEST_ARTIFACTS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_test_artifacts(run_dir: PathLike) -> Optional[dict[str, Any]]:
    """The arrays of ``RUN_DIR/test_embeddings.npz`` as a dict, or None when the run has none."""
    path = Path(run_dir) / TEST_ARTIFACTS
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    data["retrieval_distance"] = str(data.get("retrieval_distance", "cosine"))
    n_classes = int(data["labels"].max()) + 1 if len(data["labels"]) else 0
    if "class_names" not in data:
        data["class_names"] = np.array([str(i) for i in range(n_classes)])
    return data


def thumbnail_sample(n: int, seed: int = 0, limit: int = MAX_THUMBNAILS) -> np.ndarray:
    """Rows that get a thumbnail: all of them up to ``limit``, else a seeded sorted sample."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def make_thumbnails(dataset: Any, indices: Iterable[int], size: int = THUMBNAIL_SIZE) -> Optional[np.ndarray]:
    """uint8 thumbnails of ``dataset[indices]`` for the report, or None for feature vectors.

    Image files (a dataset with ``paths``) are read again with PIL, without the model's
    normalisation; in-memory images (``x`` of shape (N, C, H, W), e.g. digits) are scaled to
    0..255 by their global range. Images are shrunk to at most ``size`` pixels a side.
    """
    indices = [int(i) for i in indices]
    paths = getattr(dataset, "paths", None)
    if paths is not None:
        from PIL import Image

        out = []
        for i in indices:
            with Image.open(paths[i]) as img:
                img = img.convert("RGB")
                img.thumbnail((size, size))
                canvas = Image.new("RGB", (size, size), (255, 255, 255))  # one shape for every thumbnail
                canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
                out.append(np.asarray(canvas, dtype=np.uint8))
        return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)
    x = getattr(dataset, "x", None)
    if x is None or getattr(x, "ndim", 0) != 4:
        return None  # feature vectors: the gallery shows labels and scores
    import torch

    imgs = torch.as_tensor(x[indices]).float()
    lo, hi = float(torch.as_tensor(x).min()), float(torch.as_tensor(x).max())
    imgs = (imgs - lo) / max(hi - lo, 1e-12)
    if max(imgs.shape[-2:]) > size:
        scale = size / max(imgs.shape[-2:])
        hw = (max(1, round(imgs.shape[-2] * scale)), max(1, round(imgs.shape[-1] * scale)))
        imgs = torch.nn.functional.interpolate(imgs, size=hw, mode="area")
    arr = (imgs.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    if arr.shape[1] == 1:
        return arr[:, 0]
    if arr.shape[1] == 3:
        return arr.transpose(0, 2, 3, 1).copy()
    return None


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as exc:
        raise TypeError(f"{name} must be an array or tensor, got {type(value).__name__}") from exc
