"""The report of one run folder (see :mod:`pml_plugins.report.artifacts` for what it reads)."""

from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import figures
from .artifacts import TEST_ARTIFACTS, load_test_artifacts, read_metrics_jsonl
from .gallery import GALLERY_K, choose_queries, gallery_html
from .html import Raw, esc, img, page, table
from .retrieval import per_class, search

#: section ids of a run report, in order
RUN_SECTIONS = ("setting", "metrics", "curves", "metrics-vs-k", "gallery", "embedding-map", "per-class")

#: most classes the per-class table lists (the worst)
MAX_CLASS_ROWS = 100

_SETTING_KEYS = (
    "loss",
    "loss_args",
    "miner",
    "miner_args",
    "dataset",
    "backbone",
    "embedding_size",
    "epochs",
    "batch_size",
    "sampler",
    "optimizer",
    "lr",
    "loss_lr",
    "weight_decay",
    "seed",
    "retrieval_distance",
    "ks",
)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _setting(run_dir: Path, config: dict) -> str:
    resolved = config.get("resolved", {}) if isinstance(config.get("resolved"), dict) else {}
    rows = [
        (k, _fmt(resolved.get(k, config.get(k))))
        for k in _SETTING_KEYS
        if resolved.get(k, config.get(k)) not in (None, {}, [])
    ]
    for key in ("model", "data", "sampler", "device", "amp", "threads"):
        if resolved.get(key) not in (None, ""):
            rows.append((f"resolved {key}", _fmt(resolved[key])))
    versions = resolved.get("versions") or {}
    rows += [(f"version {k}", v) for k, v in versions.items()]
    for k, v in (resolved.get("machine") or {}).items():
        rows.append((f"machine {k}", _fmt(v)))
    metrics_file = run_dir / "metrics.json"
    when = resolved.get("finished") or (
        _dt.datetime.fromtimestamp(metrics_file.stat().st_mtime).astimezone().isoformat(timespec="seconds")
        if metrics_file.is_file()
        else "unknown"
    )
    rows.append(("finished", when))
    if resolved.get("command"):
        rows.append(("command", " ".join(map(str, resolved["command"]))))
    full = esc(json.dumps(config, indent=2, default=str))
    return (
        table(["setting", "value"], rows, cls="kv")
        + f"<details><summary>config.json</summary><pre>{full}</pre></details>"
    )


def _metrics_table(record: dict) -> str:
    metrics = record.get("metrics") or {}
    if not metrics:
        return '<p class="note">No metrics.json in this folder (the run did not finish).</p>'
    rows = [
        (k, f"{100 * v:.2f}" if isinstance(v, (int, float)) and abs(v) <= 1 else _fmt(v)) for k, v in metrics.items()
    ]
    for key in (
        "seconds_per_epoch",
        "train_seconds",
        "peak_memory_mb",
        "memory_kind",
        "final_epoch_loss",
        "epochs_run",
        "iterations_per_epoch",
    ):
        if record.get(key) is not None:
            rows.append((key, _fmt(record[key])))
    return table(["metric", "value (% for metrics in [0, 1])"], rows)


def build_run_report(run_dir: Path, *, seed: int = 0, map_method: str = "auto") -> str:
    """The HTML of the report of ``run_dir``; reads only files in that folder."""
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json")
    record = _read_json(run_dir / "metrics.json")
    if not config and not record:
        raise FileNotFoundError(f"{run_dir} is not a run folder: it has neither config.json nor metrics.json")
    metrics = record.get("metrics") or {}
    name = record.get("name") or config.get("resolved", {}).get("name") or run_dir.name
    sections = [("setting", "Setting", _setting(run_dir, config)), ("metrics", "Metrics", _metrics_table(record))]

    curves = figures.training_curves(read_metrics_jsonl(run_dir))
    sections.append(
        (
            "curves",
            "Training curves",
            img(curves, "training curves per epoch")
            if curves
            else '<p class="note">No per-epoch log (metrics.jsonl): the run did not train.</p>',
        )
    )
    vs_k = figures.metrics_vs_k(metrics)
    sections.append(
        (
            "metrics-vs-k",
            "Recall@k and nDCG@k against k",
            img(vs_k, "Recall@k and nDCG@k against k") if vs_k else '<p class="note">No Recall@k.</p>',
        )
    )

    data = load_test_artifacts(run_dir)
    if data is None:
        missing = (
            f'<p class="note">This run folder has no {TEST_ARTIFACTS} (the test embeddings), '
            f"so there is nothing to show here; runs of this version write it.</p>"
        )
        sections += [
            ("gallery", "Retrieval gallery", missing),
            ("embedding-map", "Embedding map", missing),
            ("per-class", "Per-class results", missing),
        ]
    else:
        sections += _embedding_sections(data, seed=seed, map_method=map_method)
    intro = f'<p class="note">Run folder <code>{esc(run_dir.resolve())}</code>; report written {esc(_now())}.</p>'
    return page(f"pml-plugins run report: {name}", sections, intro)


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _embedding_sections(data: dict, *, seed: int, map_method: str) -> list[tuple[str, str, str]]:
    emb, labels, names = data["embeddings"], data["labels"], [str(c) for c in data["class_names"]]
    distance = data["retrieval_distance"]
    t0 = time.perf_counter()
    results = search(emb, labels, distance=distance, k=GALLERY_K, seed=seed)
    sampled = (
        f" {len(results.queries)} of the {len(labels)} test samples (a seeded sample) are queries;"
        if len(results.queries) < len(labels)
        else ""
    )
    thumbs: dict[int, np.ndarray] = {}
    if "thumbnails" in data:
        thumbs = {int(i): t for i, t in zip(data["thumbnail_index"], data["thumbnails"])}
    allowed = np.array(sorted(thumbs)) if thumbs and len(thumbs) < len(labels) else None
    sample, worst = choose_queries(results, seed=seed, allowed=allowed)
    gallery = (
        f'<p class="note">The test split queried against itself ({esc(distance)}), each query left out;'
        f"{sampled} neighbours marked <b>✓</b> (same class, solid border) or <b>✗</b> (other class, dashed "
        f"border). AP@R: average precision over the first R neighbours, R = the query's class size - 1.</p>"
        f"<h3>Seeded sample of queries (seed {seed})</h3>"
        + gallery_html(results, sample, labels, names, thumbs, distance=distance)
        + "<h3>Worst queries (lowest AP@R)</h3>"
        + gallery_html(results, worst, labels, names, thumbs, distance=distance)
    )

    rows = figures.map_sample(labels, seed=seed)
    xy, method = figures.project_2d(emb[rows], distance=distance, seed=seed, method=map_method)
    title = (
        f"{method} of {len(rows)} test embeddings"
        + (f" (a class-stratified sample of {len(labels)})" if len(rows) < len(labels) else "")
        + f"; {len(np.unique(labels))} unseen classes"
    )
    emb_map = img(figures.embedding_map(xy, labels[rows], names, title), f"{method} embedding map: {title}")
    emb_map += (
        f'<p class="note">{esc(title)}. The test classes are unseen in training; each is named at its '
        f"median point and drawn with its own colour and marker. At most {figures.MAX_MAP_POINTS} points "
        f"are projected.</p>"
    )

    classes = per_class(results, labels)
    body = []
    for row in classes[:MAX_CLASS_ROWS]:
        confused = ", ".join(f"{names[c]} ({100 * share:.0f}%)" for c, share in row["confused_with"]) or "-"
        body.append(
            (
                names[row["label"]],
                row["queries"],
                f"{100 * row['recall_at_1']:.1f}",
                f"{100 * row['map_at_r']:.1f}" if np.isfinite(row["map_at_r"]) else "-",
                Raw(esc(confused)),
            )
        )
    mean_ap = float(np.nanmean(results.ap_at_r)) if np.isfinite(results.ap_at_r).any() else float("nan")
    per = (
        f'<p class="note">Worst MAP@R first; "most confused with": the classes of the wrong neighbours among '
        f"each class's first R neighbours, as shares of them. Over these queries R@1 "
        f"{100 * results.hits[:, 0].mean():.1f}, MAP@R {100 * mean_ap:.1f} "
        f"({time.perf_counter() - t0:.1f} s for search, gallery and map)."
        + (f" The {MAX_CLASS_ROWS} worst of {len(classes)} classes are shown." if len(classes) > MAX_CLASS_ROWS else "")
        + "</p>"
        + table(["class", "queries", "R@1 %", "MAP@R %", "most confused with"], body, cls="perclass")
    )
    return [
        ("gallery", "Retrieval gallery", gallery),
        ("embedding-map", "Embedding map", emb_map),
        ("per-class", "Per-class results", per),
    ]
