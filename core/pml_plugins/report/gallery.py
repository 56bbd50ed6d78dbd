"""The retrieval gallery: queries with their nearest neighbours, right and wrong marked by a
sign (✓ / ✗) and a border style (solid / dashed) as well as by colour."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np

from .html import array_png, esc, img
from .retrieval import QueryResults

#: queries in the gallery: a seeded sample, and the worst by AP@R
GALLERY_RANDOM = 8
GALLERY_WORST = 8
#: neighbours shown per query
GALLERY_K = 8


def choose_queries(
    results: QueryResults,
    *,
    n_random: int = GALLERY_RANDOM,
    n_worst: int = GALLERY_WORST,
    seed: int = 0,
    allowed: Optional[np.ndarray] = None,
) -> tuple[list[int], list[int]]:
    """Positions in ``results.queries``: ``(seeded sample, worst by AP@R)``, disjoint.

    ``allowed`` (row numbers) restricts both to queries that can be shown, e.g. with a thumbnail.
    """
    pos = np.flatnonzero(np.isfinite(results.ap_at_r))
    if allowed is not None:
        pos = pos[np.isin(results.queries[pos], allowed)]
    worst = pos[np.argsort(results.ap_at_r[pos], kind="stable")[:n_worst]].tolist()
    rest = np.setdiff1d(pos, worst)
    rng = np.random.default_rng(seed)
    sample = sorted(rng.choice(rest, size=min(n_random, len(rest)), replace=False).tolist()) if len(rest) else []
    return sample, worst


def _cell(kind: str, name: str, detail: str, thumb: Optional[np.ndarray], alt: str) -> str:
    mark = {"query": "", "ok": "✓", "bad": "✗"}[kind]
    text = f'<span class="mark">{mark}</span> {esc(name)}<br>{esc(detail)}' if mark else f"{esc(name)}<br>{esc(detail)}"
    if thumb is not None:
        return f'<div class="cell {kind}">{img(array_png(thumb), alt, cls="thumb", title=alt)}<span>{text}</span></div>'
    box = {"query": "qtext", "ok": "oktext", "bad": "badtext"}[kind]
    return f'<div class="cell"><div class="box {box}" title="{esc(alt)}">{text}</div></div>'


def gallery_html(
    results: QueryResults,
    positions: Sequence[int],
    labels: np.ndarray,
    class_names: Sequence[str],
    thumbnails: Mapping[int, np.ndarray],
    k: int = GALLERY_K,
    distance: str = "cosine",
) -> str:
    """One row per query: the query, then its first ``k`` neighbours (thumbnail, or label and score)."""
    score_name = "cos" if distance == "cosine" else "dist"
    rows = []
    for p in positions:
        q = int(results.queries[p])
        qname = str(class_names[labels[q]])
        cells = [
            (
                f'<div class="rowhead">AP@R {results.ap_at_r[p]:.2f}<br>R@1 '
                f"{'✓' if results.hits[p, 0] else '✗'}<br>#{q}</div>"
            ),
            _cell("query", f"query {qname}", f"R={results.r[p]}", thumbnails.get(q), f"query #{q}, class {qname}"),
        ]
        for j in range(min(k, results.neighbours.shape[1])):
            n = int(results.neighbours[p, j])
            ok = bool(results.hits[p, j])
            name = str(class_names[labels[n]])
            alt = f"neighbour {j + 1} of query #{q}: #{n}, class {name}, {'correct' if ok else 'wrong'}"
            cells.append(
                _cell("ok" if ok else "bad", name, f"{score_name} {results.scores[p, j]:.3f}", thumbnails.get(n), alt)
            )
        rows.append(f'<div class="grow">{"".join(cells)}</div>')
    return f'<div class="gallery">{"".join(rows)}</div>'
