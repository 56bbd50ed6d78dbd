"""The report of a comparison folder: the table (with 95% intervals when the comparison ran
several seeds), per-loss plots with error bars, and a link to every run's own report."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Optional

from . import figures
from .html import Raw, esc, img, page, table

#: section ids of a comparison report, in order
COMPARE_SECTIONS = ("setting", "comparison", "plots", "runs")
#: test metrics, ``bits_`` ones (--eval-binarize) and ``val_`` ones (a comparison that validates)
_METRIC = re.compile(r"^(bits_|val_)?(recall_at_\d+|map_at_r|ndcg_at_\d+|precision_at_1)$")


_MAIN_SETTING = (
    "losses",
    "dataset",
    "backbone",
    "embedding_size",
    "epochs",
    "batch_size",
    "iterations_per_epoch",
    "optimizer",
    "lr",
    "seed",
    "seeds",
    "device",
    "ks",
)


def _label(metric: str) -> str:
    """``recall_at_4`` -> ``R@4``, ``map_at_r`` -> ``MAP@R``, ``bits_ndcg_at_2`` -> ``bits nDCG@2``,
    ``val_map_at_r`` -> ``val MAP@R``."""
    m = _METRIC.match(metric)
    if not m:
        return metric
    base = m.group(2)
    short = (
        "MAP@R"
        if base == "map_at_r"
        else "P@1"
        if base == "precision_at_1"
        else base.replace("recall_at_", "R@").replace("ndcg_at_", "nDCG@")
    )
    return (m.group(1) or "").replace("_", " ") + short


def is_compare_dir(path: Path) -> bool:
    return (Path(path) / "results.csv").is_file()


def run_dirs(compare_dir: Path) -> list[Path]:
    """Every run folder under ``DIR/runs`` (a folder with config.json, metrics.json or error.txt)."""
    root = Path(compare_dir) / "runs"
    if not root.is_dir():
        return []
    found = {p.parent for pattern in ("config.json", "metrics.json", "error.txt") for p in root.rglob(pattern)}
    return sorted(found)


def report_targets(compare_dir: Path) -> list[Path]:
    """The runs that get their own report: the first folder (seed) of each run name, so a comparison
    over several seeds writes one report per loss, not one per seed."""
    firsts: dict[str, Path] = {}
    for d in run_dirs(compare_dir):
        if (d / "config.json").is_file() or (d / "metrics.json").is_file():
            firsts.setdefault(_run_name(d), d)
    return list(firsts.values())


def _run_name(run_dir: Path) -> str:
    for name in ("metrics.json", "config.json"):
        try:
            data = json.loads((run_dir / name).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        value = data.get("name") or (data.get("resolved") or {}).get("name")
        if value:
            return str(value)
    return run_dir.name


def _float(text: Optional[str]) -> Optional[float]:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _sort_key(metric: str) -> tuple:
    m = _METRIC.match(metric)
    base = m.group(2) if m else metric
    order = 0 if base.startswith("recall") else 1 if base == "map_at_r" else 2 if base.startswith("ndcg") else 3
    digits = re.findall(r"\d+", base)
    return ((m.group(1) or "") if m else "", order, int(digits[0]) if digits else 0)


def build_compare_report(compare_dir: Path, link_base: Optional[Path] = None) -> str:
    """The HTML of the comparison in ``compare_dir`` (reads results.csv, results.json, runs/); links to
    the runs' ``report.html`` are relative to ``link_base`` (the report's folder, default ``compare_dir``)."""
    compare_dir = Path(compare_dir)
    link_base = Path(link_base) if link_base is not None else compare_dir
    with open(compare_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = list(rows[0].keys()) if rows else []
    metrics = sorted((c for c in columns if _METRIC.match(c)), key=_sort_key)
    seeds = "seeds" in columns
    has_ci = any(f"{m}_ci95" in columns for m in metrics)

    dirs = run_dirs(compare_dir)
    by_name: dict[str, list[Path]] = {}
    for d in dirs:
        by_name.setdefault(_run_name(d), []).append(d)

    reported = set(report_targets(compare_dir))

    def link(d: Path) -> Raw:
        # the first seed of each loss has a report; other seeds their metrics; a failed run its traceback
        target = next(
            d / name
            for name, ok in (
                ("report.html", d in reported),
                ("metrics.json", (d / "metrics.json").is_file()),
                ("config.json", (d / "config.json").is_file()),
                ("error.txt", True),
            )
            if ok
        )
        rel = Path(os.path.relpath(target.resolve(), link_base.resolve()))
        suffix = "" if target.name == "report.html" else f" ({target.name})"
        return Raw(f'<a href="{esc(rel.as_posix())}">{esc(d.relative_to(compare_dir).as_posix())}{suffix}</a>')

    header = [
        "loss",
        "status",
        *[_label(m) for m in metrics],
        *(["seeds"] if seeds else []),
        *(["tied with best"] if "tied_with_best" in columns else []),
        "s/epoch",
        "report",
    ]
    body = []
    for r in rows:
        cells = [r.get("loss", ""), r.get("status", "")]
        for m in metrics:
            v, ci = _float(r.get(m)), _float(r.get(f"{m}_ci95"))
            cells.append("-" if v is None else f"{100 * v:.1f}" + (f" ± {100 * ci:.1f}" if ci is not None else ""))
        if seeds:
            cells.append(r.get("seeds", ""))
        if "tied_with_best" in columns:
            cells.append(r.get("tied_with_best", ""))
        spe = _float(r.get("seconds_per_epoch"))
        cells.append("-" if spe is None else f"{spe:.2f}")
        matches = by_name.get(r.get("loss", ""), [])
        cells.append(link(matches[0]) if matches else "-")
        body.append(cells)
    note = "Metrics in % on the test split (unseen classes); " + (
        "± is the 95% confidence interval over the seeds."
        if has_ci
        else "one run per loss (no seeds), so no intervals."
    )
    comparison = f'<p class="note">{note}</p><div class="wide">' + table(header, body) + "</div>"

    ok = [r for r in rows if r.get("status") in ("ok", "floor")]
    recalls = [m for m in metrics if m.startswith("recall_at_")]
    plot_metrics = [m for m in dict.fromkeys(["recall_at_1", *recalls[-1:], "map_at_r"]) if m in metrics]
    png = figures.compare_plots(
        [r["loss"] for r in ok],
        {_label(m): [_float(r.get(m)) for r in ok] for m in plot_metrics},
        {_label(m): [_float(r.get(f"{m}_ci95")) for r in ok] for m in plot_metrics},
    )
    plots = img(png, "per-loss metrics with 95% intervals") if png else '<p class="note">No finished run.</p>'

    many = len(dirs) > len(reported)
    listing = (
        '<p class="note">Each loss\'s first run (seed) has its own report; the other seeds link to their '
        "metrics.json.</p>"
        if many
        else ""
    )
    listing += table(
        ["run", "report", "status"],
        [(_run_name(d), link(d), "error (see error.txt)" if (d / "error.txt").is_file() else "ok") for d in dirs],
    )
    setting = ""
    try:
        results = json.loads((compare_dir / "results.json").read_text())
        values = {
            k: v
            for k, v in (results.get("setting") or {}).items()
            if v not in (None, {}, []) and k not in ("loss", "loss_args", "out")
        }  # per run, not shared
        values = {"losses": ", ".join(r.get("loss", "") for r in rows), **values}
        items = [(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in values.items()]
        main = [kv for kv in items if kv[0] in _MAIN_SETTING]
        setting = (
            table(["setting", "value"], main, cls="kv")
            + "<details><summary>every option</summary>"
            + table(["setting", "value"], items, cls="kv")
            + "</details>"
        )
    except (OSError, json.JSONDecodeError):
        setting = '<p class="note">No results.json.</p>'
    if (compare_dir / "runs.csv").is_file():
        setting += '<p class="note">Every seed\'s metrics: <code>runs.csv</code> next to this report.</p>'
    sections = [
        ("setting", "Setting", setting),
        ("comparison", "Comparison", comparison),
        ("plots", "Per-loss plots", plots),
        ("runs", "Runs", listing),
    ]
    return page(
        f"pml-plugins comparison: {compare_dir.resolve().name}",
        sections,
        f'<p class="note">Comparison folder <code>{esc(compare_dir.resolve())}</code>.</p>',
    )
