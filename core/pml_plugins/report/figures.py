"""The report's matplotlib figures, returned as PNG bytes: curves, metrics against k, the
embedding map and the comparison's per-loss plots."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from .html import figure_png

#: most points the embedding map projects (a seeded, class-stratified sample beyond that)
MAX_MAP_POINTS = 2_000
_MARKERS = "os^Dv<>phX*P"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _numeric(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def training_curves(records: Sequence[Mapping[str, Any]]) -> Optional[bytes]:
    """Loss, validation metrics, learning rates and seconds per epoch; None without records."""
    if not records:
        return None
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(records)]
    groups: dict[str, dict[str, list]] = {"loss": {}, "validation": {}, "learning rate": {}, "seconds": {}}
    for i, r in enumerate(records):
        for key, value in r.items():
            if key == "epoch":
                continue
            if key == "lr" and isinstance(value, Mapping):
                for name, v in value.items():
                    groups["learning rate"].setdefault(str(name), [None] * len(records))[i] = _numeric(v)
                continue
            v = _numeric(value)
            if v is None and value is not None:
                continue
            group = (
                "learning rate"
                if key.startswith("lr")
                else "seconds"
                if key.startswith("seconds")
                else "loss"
                if "loss" in key
                else "validation"
            )
            groups[group].setdefault(key, [None] * len(records))[i] = v
    groups = {g: s for g, s in groups.items() if any(v is not None for vs in s.values() for v in vs)}
    plt = _plt()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.2), dpi=90, squeeze=False)
    for ax, (group, series) in zip(axes[0], groups.items()):
        for j, (name, values) in enumerate(series.items()):
            pts = [(e, v) for e, v in zip(epochs, values) if v is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=_MARKERS[j % len(_MARKERS)], label=name)
        if group == "learning rate" and all(v is None or v > 0 for vs in series.values() for v in vs):
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(group)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def metrics_vs_k(metrics: Mapping[str, Any]) -> Optional[bytes]:
    """Recall@k and nDCG@k against k (log2 axis); None when the metrics have neither."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=90)
    drawn = False
    for (prefix, label), marker in zip((("recall_at_", "Recall@k"), ("ndcg_at_", "nDCG@k")), "os"):
        pts = sorted(
            (int(k[len(prefix) :]), 100 * v)
            for k, v in metrics.items()
            if k.startswith(prefix) and k[len(prefix) :].isdigit() and _numeric(v) is not None
        )
        if pts:
            drawn = True
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
            ks = [p[0] for p in pts]
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("k")
    ax.set_ylabel("%")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return figure_png(fig)


def map_sample(labels: np.ndarray, limit: int = MAX_MAP_POINTS, seed: int = 0) -> np.ndarray:
    """Rows the map shows: all up to ``limit``, else the same share of every class (seeded)."""
    n = len(labels)
    if n <= limit:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    if len(classes) * 2 > limit:  # many small classes: a plain seeded sample
        return np.sort(rng.choice(n, size=limit, replace=False))
    keep = []
    for c in classes:
        rows = np.flatnonzero(labels == c)
        take = max(1, round(limit * len(rows) / n))
        keep.append(rng.choice(rows, size=min(take, len(rows)), replace=False))
    return np.sort(np.concatenate(keep))[: max(limit, 0)] if keep else np.arange(0)


def project_2d(
    embeddings: np.ndarray, *, distance: str = "cosine", seed: int = 0, method: str = "auto"
) -> tuple[np.ndarray, str]:
    """2-D coordinates of ``embeddings``: UMAP when installed (``auto``), else scikit-learn's t-SNE."""
    x = np.asarray(embeddings, dtype=np.float32)
    if distance == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if method not in ("auto", "umap", "tsne"):
        raise ValueError(f"method must be 'auto', 'umap' or 'tsne', got {method!r}")
    if method in ("auto", "umap"):
        try:
            import umap

            return umap.UMAP(n_components=2, random_state=seed).fit_transform(x), "UMAP"
        except ImportError:
            if method == "umap":
                raise
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if x.shape[1] > 50 and len(x) > 50:  # the usual PCA first step: faster, and t-SNE sees the main structure
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    if len(x) < 5:
        return np.pad(x[:, :2], ((0, 0), (0, max(0, 2 - x.shape[1])))), "raw"
    # cheaper than sklearn's defaults (1000 iterations, perplexity 30, angle 0.5), about 3x faster
    # on digits, and the classes' layout is the same for a picture: the map settles within 500
    # iterations, and perplexity 20 / a coarser Barnes-Hut angle change detail, not clusters
    tsne = TSNE(
        n_components=2,
        perplexity=float(min(20.0, (len(x) - 1) / 3)),
        angle=0.8,
        init="pca",
        random_state=seed,
        max_iter=500,
    )
    return tsne.fit_transform(x), "t-SNE"


def embedding_map(xy: np.ndarray, labels: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    """Points coloured and shaped by class, each class named at its median point."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 6.2), dpi=90)
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    many = len(classes) > 20
    if many:  # one colour per class from a cycle, one scatter call (thousands of classes stay fast)
        index = np.searchsorted(classes, labels)
        ax.scatter(xy[:, 0], xy[:, 1], s=9, c=[cmap(i % cmap.N) for i in index], marker="o", alpha=0.75, linewidths=0)
    for j, c in enumerate(classes):
        pts = xy[labels == c]
        color = cmap(j % cmap.N)
        if not many:
            ax.scatter(
                pts[:, 0],
                pts[:, 1],
                s=14,
                color=color,
                marker=_MARKERS[j % len(_MARKERS)],
                alpha=0.75,
                linewidths=0,
                label=str(class_names[c]),
            )
        if len(classes) <= 60:  # names beyond that would cover the map
            mx, my = np.median(pts, axis=0)
            ax.annotate(
                str(class_names[c]),
                (mx, my),
                fontsize=9,
                weight="bold",
                ha="center",
                va="center",
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": color, "alpha": 0.85},
            )
    if not many:
        ax.legend(fontsize=8, markerscale=1.5, loc="best", title="class")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def compare_plots(
    names: Sequence[str],
    values: Mapping[str, Sequence[Optional[float]]],
    errors: Mapping[str, Sequence[Optional[float]]],
) -> Optional[bytes]:
    """One panel per metric: a point per loss, with its 95% interval as error bar where known."""
    metrics = [m for m in values if any(v is not None for v in values[m])]
    if not metrics or not names:
        return None
    plt = _plt()
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(max(4.0, 0.35 * len(names) + 2) * len(metrics) / 1.4, 3.9), dpi=90, squeeze=False
    )
    pos = np.arange(len(names))
    for ax, m in zip(axes[0], metrics):
        ys = np.array([np.nan if v is None else 100 * v for v in values[m]])
        es = np.array([np.nan if e is None else 100 * e for e in errors.get(m, [None] * len(names))])
        has = np.isfinite(es)
        ax.errorbar(pos[has], ys[has], yerr=es[has], fmt="o", capsize=4, color="C0", label="mean ± 95% CI")
        ax.plot(pos[~has], ys[~has], "s", color="C1", label="single run" if (~has).any() else None)
        ax.set_xticks(pos)
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("%")
        ax.set_title(m)
        ax.grid(alpha=0.3, axis="y")
        if has.any() and (~has).any():
            ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)
