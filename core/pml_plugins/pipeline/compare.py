"""Compare losses under one protocol (:mod:`.protocol`): one table, CSVs, Markdown, a plot.

Every loss gets the same data, backbone, budget and seeds; the table shows each metric as the
mean over seeds ± the half-width of its 95 % t-interval, marks the losses statistically tied
with the best one, and states the protocol in one line. A loss that fails (bad arguments, NaN, a
bug in a plugin) gets an error row and the comparison goes on. Files are rewritten after every
run, so an interrupted comparison keeps every completed run (``OUT/runs/<loss>/seed<k>/``) and
the table of those runs. Running the same command
again with the same ``--out`` keeps the runs that finished with the same settings (and the same
validation classes) and continues an interrupted run from its checkpoint (``checkpoint.pt`` after
every epoch; with per-epoch validation it holds the best epoch so far, its metrics and weights).
``--tune`` continues its Optuna studies (``OUT/optuna.db``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import tqdm

from .. import registry as reg
from . import class_texts as class_texts_mod
from . import stats
from .config import TrainConfig
from .outputs import metrics_record, write_json, write_text_atomic
from .protocol import FLOOR, LossSummary, Protocol, finished_run, metric_keys, run_protocol, val_keys  # noqa: F401

#: PML's own losses every default comparison includes as references
REFERENCE_LOSSES = ("proxy_anchor", "soft_triple", "normalized_softmax", "contrastive")


def default_losses() -> list[str]:
    """Every installed plugin loss (not PML's built-ins) plus the PML reference losses."""
    names, seen = [], set()
    counts: dict[str, int] = {}
    entries = reg.registry.entries("loss")
    for e in entries:
        counts[e.name] = counts.get(e.name, 0) + 1
    for e in sorted(entries, key=lambda e: (e.plugin, e.name)):
        if e.plugin == reg.BUILTIN_PLUGIN or e.qualified_name in seen:
            continue
        seen.add(e.qualified_name)
        names.append(e.qualified_name if counts[e.name] > 1 else e.name)
    return names + [n for n in REFERENCE_LOSSES if n not in names]


def resolve_losses(names: Sequence[str]) -> list[str]:
    """Check every name up front (unknown names fail before any training) and drop duplicates."""
    out, seen = [], set()
    for name in names:
        entry = reg.get_entry("loss", name)
        if entry.qualified_name not in seen:
            seen.add(entry.qualified_name)
            out.append(name)
    if not out:
        raise ValueError("no losses to compare")
    return out


def demo_loss_args(dataset: str, losses: Sequence[str], per_loss_args: dict) -> dict[str, dict]:
    """The registered ``demo_loss_args`` of each loss on the bundled digits data, unless the
    user gave that loss arguments of their own (they replace the demo's, not merge with them)."""
    if dataset.split(":")[0] != "digits":
        return {}
    out = {}
    for name in losses:
        args = reg.get_entry("loss", name).spec.demo_loss_args  # a mapping: LossSpec checks it
        if args and name not in per_loss_args:
            out[name] = dict(args)
    return out


def demo_pretrain_epochs(dataset: str, name: str, base: TrainConfig) -> Optional[int]:
    """A loss's registered ``demo_pretrain_epochs`` on the bundled digits data, unless the user set
    ``--pretrain-epochs`` (then theirs applies to every loss)."""
    if dataset.split(":")[0] != "digits" or base.pretrain_epochs is not None:
        return None
    return getattr(reg.get_entry("loss", name).spec, "demo_pretrain_epochs", None)  # LossSpec checks it


def _label(name: str, args: Optional[dict]) -> str:
    return f"{name} ({', '.join(f'{k}={v}' for k, v in args.items())})" if args else name


def _distances_note(name: str, base: TrainConfig, user_args: Optional[dict]) -> str:
    """`` [d: text of the digit names]`` for a loss whose class distances the main job builds, so a
    reader sees where they came from (empty when the loss takes none or the user gave them)."""
    entry = reg.get_entry("loss", name)
    if not class_texts_mod.needs_class_distances(entry.spec):
        return ""
    if any((user_args or {}).get(k) is not None for k in class_texts_mod.USER_KEYS):
        return " [d: given]"
    kind = base.dataset.split(":")[0]
    return f" [d: {class_texts_mod.describe_source(kind, base.class_texts)}]"


def run_compare(
    base: TrainConfig,
    losses: Sequence[str],
    out: Path,
    *,
    per_loss_args: Optional[dict] = None,
    protocol: Optional[Protocol] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    lead: bool = True,
) -> list[LossSummary]:
    """Train every loss in ``losses`` under ``protocol`` (default: 3 seeds, validation classes);
    write ``OUT/results.{csv,md,json}``, ``OUT/runs.csv``, ``OUT/comparison.png`` and
    ``OUT/runs/<loss>/seed<k>/``; return the rows (the floor first).

    With ``base.distributed`` every torchrun process calls this; ``lead=False`` on all ranks but
    0, which then train their share of every run and write nothing (their rows have no metrics).
    """
    losses = resolve_losses(losses)
    protocol = protocol or Protocol()
    if base.distributed and protocol.validates:
        raise ValueError(
            "compare --distributed reports the last epoch: use --val-classes 0 and --folds 1 "
            "(per-epoch validation and --tune run in one process)"
        )
    per_loss_args = per_loss_args or {}
    unknown = [k for k in per_loss_args if k not in losses]
    if unknown:
        raise ValueError(f"loss arguments given for {unknown}, which are not compared (losses: {', '.join(losses)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda msg: None) if not lead else (lambda msg: tqdm.tqdm.write(msg)) if progress else log
    # The floor in every geometry the compared losses are evaluated in (L2 losses such as CAM
    # are compared against an L2 floor); a --retrieval-distance flag applies to all.
    distances = (
        [base.retrieval_distance]
        if base.retrieval_distance
        else sorted({reg.get_entry("loss", n).spec.retrieval_distance for n in losses} | {"cosine"})
    )
    floors = [(FLOOR if d == "cosine" else f"{FLOOR[:-1]}, {d})", d) for d in distances]
    demo_args = demo_loss_args(base.dataset, losses, per_loss_args)
    demo_pretrain = {n: demo_pretrain_epochs(base.dataset, n, base) for n in losses}
    plan = []
    for name in losses:
        shown = {
            **(demo_args.get(name) or {}),
            **({"pretrain_epochs": demo_pretrain[name]} if demo_pretrain[name] is not None else {}),
        }
        overrides = {"pretrain_epochs": demo_pretrain[name]} if demo_pretrain[name] is not None else {}
        plan.append(
            (
                _label(name, shown) + _distances_note(name, base, per_loss_args.get(name)),
                name,
                dict(per_loss_args.get(name, demo_args.get(name, {}))),
                overrides,
            )
        )
    latest: list = []

    def write(rows: list) -> None:
        latest[:] = rows
        if lead:
            write_results(rows, out, base, protocol)

    try:
        return run_protocol(base, plan, out, protocol, floors=floors, progress=progress, say=say, on_update=write)
    except KeyboardInterrupt:
        if latest and lead:
            write_results(latest, out, base, protocol)
            log(f"interrupted: the completed runs are in {out} (results.csv holds the rows so far)")
        raise


# -- tables --------------------------------------------------------------------------------------
METRIC_NAMES = {"map_at_r": "MAP@R", "precision_at_1": "P@1", "r_precision": "R-Precision"}


def metric_label(key: str) -> str:
    """``recall_at_1`` -> ``R@1``, ``ndcg_at_8`` -> ``nDCG@8``, ``map_at_r`` -> ``MAP@R``."""
    base = key[4:] if key.startswith("val_") else key
    if base.startswith("recall_at_"):
        text = f"R@{base[10:]}"
    elif base.startswith("ndcg_at_"):
        text = f"nDCG@{base[8:]}"
    else:
        text = METRIC_NAMES.get(base, base)
    return f"val {text}" if key.startswith("val_") else text


def columns(ks: Iterable[int]) -> list[tuple[str, str]]:
    ks = list(ks)
    cols = [(f"recall_at_{k}", f"R@{k}") for k in ks] + [("map_at_r", "MAP@R")]
    cols += [(f"ndcg_at_{k}", f"nDCG@{k}") for k in ks if k > 1]
    cols += [("mean_average_precision", "mAP"), ("NMI", "NMI")]
    return cols


def _test_classes(rows: Sequence[LossSummary]) -> str:
    import re

    for row in rows:
        for r in row.runs:
            described = r.result.config.get("resolved", {}).get("data", "")
            match = re.search(r"test (\d+) samples / (\d+) classes", described)
            if match:
                return f"{match.group(2)} unseen classes ({match.group(1)} images)"
    return "the unseen test classes"


def caption(base: TrainConfig, protocol: Protocol, rows: Sequence[LossSummary] = ()) -> str:
    """The protocol in one line: seeds, validation and selection, tuning, test classes, the test."""
    primary = metric_label(protocol.primary)
    seeds = (
        f"{protocol.seeds} seed{'s' if protocol.seeds > 1 else ''} (0-{protocol.seeds - 1})"
        if protocol.seeds > 1
        else "1 seed (0): no interval (n/a)"
    )
    if protocol.folds > 1:
        val = (
            f"{protocol.folds} class-disjoint folds of the training classes (train on {protocol.folds - 1}, "
            f"validate on 1)"
        )
    elif protocol.val_classes > 0:
        val = f"{protocol.val_classes:g} of the training classes held out"
    else:
        val = None
    selection = (
        f"validation: {val}, best epoch by validation {primary}" if val else "no validation: last epoch reported"
    )
    tune = (
        (
            f"{protocol.tune} Optuna TPE trials per loss (median pruning) on validation {primary}, best setting "
            f"retrained per seed"
        )
        if protocol.tune
        else "no tuning (registered defaults)"
    )
    fold_test = f", the mean of its {protocol.folds} fold models per seed" if protocol.folds > 1 else ""
    return (
        f"Protocol: {base.dataset}, {seeds}, mean ± 95% t-interval; {selection}; {tune}; test: "
        f"{_test_classes(rows)}, each selected model tested once{fold_test}; tied = p >= {protocol.alpha:g} in a "
        f"{stats.TEST_NAME} against the best {primary}."
    )


def _tied_cell(row: LossSummary) -> str:
    if row.is_floor or row.status != "ok":
        return "-"
    if row.is_best:
        return "best"
    return stats.NA if row.tied_with_best is None else ("yes" if row.tied_with_best else "no")


def _row_error(row: LossSummary) -> Optional[str]:
    if row.error:
        return row.error
    failed = [r for r in row.runs if not r.ok]
    if not failed:
        return None
    r = failed[0]
    where = f"seed {r.seed}" + ("" if r.fold is None else f" fold {r.fold}")
    return f"{where}: {r.result.error}"


def _mean_attr(row: LossSummary, attr: str, agg=None) -> Optional[float]:
    values = [getattr(r.result, attr) for r in row.runs if r.ok and getattr(r.result, attr) is not None]
    if not values:
        return None
    return float(agg(values)) if agg else float(sum(values) / len(values))


def table_rows(rows: Sequence[LossSummary], ks: Iterable[int], protocol: Protocol) -> tuple[list[str], list[list[str]]]:
    cols = columns(ks)
    if any("bits_recall_at_1" in row.means for row in rows):  # --eval-binarize
        cols += [("bits_recall_at_1", "bits R@1"), ("bits_map_at_r", "bits MAP@R")]
    val_key = f"val_{protocol.primary}"
    header = ["loss", *[c[1] for c in cols], metric_label(val_key), "tied", "s/epoch", "peak MB", "status"]
    body = []
    for row in rows:
        error = _row_error(row)
        if row.status == "error":
            cells = ["-"] * (len(cols) + 4) + ["error: " + (error or "").splitlines()[0]]
        else:
            cells = [stats.format_mean_ci(row.means[k], row.ci95[k]) if k in row.means else "-" for k, _ in cols]
            cells.append(stats.format_mean_ci(row.means[val_key], row.ci95[val_key]) if val_key in row.means else "-")
            cells.append(_tied_cell(row))
            spe, peak = _mean_attr(row, "seconds_per_epoch"), _mean_attr(row, "peak_memory_mb", max)
            cells += [f"{spe:.2f}" if spe is not None else "-", f"{peak:.0f}" if peak is not None else "-"]
            status = row.status
            if row.warning:
                status += "; WARNING " + row.warning
            if error:
                status += "; " + error.splitlines()[0]
            cells.append(status)
        body.append([row.label, *cells])
    return header, body


def format_table(
    rows: Sequence[LossSummary],
    ks: Iterable[int],
    protocol: Optional[Protocol] = None,
    base: Optional[TrainConfig] = None,
    max_status: int = 80,
) -> str:
    """The terminal table, the protocol caption on top."""
    protocol = protocol or Protocol()
    header, body = table_rows(rows, ks, protocol)
    body = [row[:-1] + [row[-1] if len(row[-1]) <= max_status else row[-1][: max_status - 3] + "..."] for row in body]
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    lines = [caption(base, protocol, rows)] if base is not None else []
    for j, row in enumerate([header, *body]):
        cells = [
            str(c).ljust(widths[i]) if i in (0, len(row) - 1) else str(c).rjust(widths[i]) for i, c in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: Sequence[LossSummary], ks: Iterable[int], base: TrainConfig, protocol: Protocol) -> str:
    header, body = table_rows(rows, ks, protocol)
    esc = lambda s: str(s).replace("|", "\\|")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 2) + [" --- "]) + "|",
    ]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    setting = (
        f"dataset `{base.dataset}`, backbone `{base.backbone}`, embedding size {base.embedding_size}, "
        f"{base.epochs} epochs, batch {base.batch_size}, {base.optimizer} lr {base.lr:g}"
    )
    tuned = [
        f"- `{row.label}`: " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.params.items())
        for row in rows
        if row.tuning and row.params
    ]
    notes = ("\n\nTuned settings (retrained with every seed):\n\n" + "\n".join(tuned)) if tuned else ""
    return (
        "# Loss comparison\n\n" + caption(base, protocol, rows) + "\n\n" + setting + ". Metrics in % on the test "
        "split (unseen classes), queried against itself, mean ± half-width of the 95% t-interval over seeds; "
        "the floor is the same model untrained.\n\n" + "\n".join(lines) + notes + "\n"
    )


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _num(value: Optional[float], digits: int = 6) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _tied_csv(row: LossSummary) -> str:
    if row.is_floor or row.status != "ok":
        return ""
    return stats.NA if row.tied_with_best is None else str(bool(row.tied_with_best))


def write_results(rows: Sequence[LossSummary], out: Path, base: TrainConfig, protocol: Protocol) -> None:
    """``results.csv`` (a row per loss: mean and ``<key>_ci95`` per metric, ``seeds``, ``tied_with_best``),
    ``runs.csv`` (a row per run), ``results.md``, ``results.json``, ``comparison.png``."""
    keys, vkeys = metric_keys(rows), val_keys(rows)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        [
            "loss",
            "status",
            *[c for k in keys for c in (k, f"{k}_ci95")],
            "seeds",
            "folds",
            *[c for k in vkeys for c in (k, f"{k}_ci95")],
            "tied_with_best",
            "p_value_vs_best",
            "best_epoch",
            "seconds_per_epoch",
            "train_seconds",
            "peak_memory_mb",
            "memory_kind",
            "params",
            "tuning_trials",
            "warning",
            "error",
        ]
    )
    for row in rows:
        epochs = [r.result.extra["best_epoch"] for r in row.runs if r.ok and r.result.extra.get("best_epoch")]
        kinds = {r.result.memory_kind for r in row.runs if r.ok}
        writer.writerow(
            [
                row.label,
                row.status,
                *[c for k in keys for c in (_num(row.means.get(k)), _num(row.ci95.get(k)))],
                row.n_seeds,
                "" if row.is_floor else protocol.folds,  # the floor is not trained
                *[c for k in vkeys for c in (_num(row.means.get(k)), _num(row.ci95.get(k)))],
                _tied_csv(row),
                _num(row.p_value),
                _num(float(sum(epochs) / len(epochs)), 2) if epochs else "",
                _num(_mean_attr(row, "seconds_per_epoch"), 4),
                _num(_mean_attr(row, "train_seconds"), 3),
                _num(_mean_attr(row, "peak_memory_mb", max), 1),
                ",".join(sorted(kinds)),
                json.dumps(row.params, sort_keys=True) if row.params else "",
                row.tuning["trials"] if row.tuning else "",
                row.warning,
                _row_error(row) or "",
            ]
        )
    write_text_atomic(out / "results.csv", buf.getvalue())
    write_text_atomic(out / "runs.csv", runs_csv(rows, keys, vkeys))
    write_text_atomic(out / "results.md", format_markdown(rows, base.ks, base, protocol))
    runs = [
        {**metrics_record(r.result), "seed": r.seed, "fold": r.fold, "loss": row.loss, "error": r.result.error}
        for row in rows
        for r in row.runs
    ]
    summary = [
        {
            "name": row.label,
            "loss": row.loss,
            "status": row.status,
            "means": row.means,
            "ci95": row.ci95,
            "per_seed": row.per_seed,
            "tied_with_best": row.tied_with_best,
            "params": row.params,
            "tuning": row.tuning,
            "warning": row.warning,
            "error": _row_error(row),
        }
        for row in rows
    ]
    write_json(
        out / "results.json",
        {
            "setting": base.to_dict(),
            "protocol": vars(protocol),
            "caption": caption(base, protocol, rows),
            "rows": summary,
            "runs": runs,
        },
    )
    plot_comparison(rows, out / "comparison.png", base.ks, protocol)


def runs_csv(rows: Sequence[LossSummary], keys: Sequence[str], vkeys: Sequence[str]) -> str:
    """One row per (loss, seed[, fold]) with every test metric and the selected epoch's validation metrics."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        [
            "loss",
            "seed",
            "fold",
            "status",
            *keys,
            *vkeys,
            "best_epoch",
            "zero_loss_epochs",
            "final_epoch_loss",
            "seconds_per_epoch",
            "train_seconds",
            "peak_memory_mb",
            "out",
            "error",
        ]
    )
    for row in rows:
        for r in row.runs:
            res, extra = r.result, r.result.extra
            val = extra.get("val_metrics", {})
            status = "error" if not r.ok else ("floor" if row.is_floor else "ok")
            writer.writerow(
                [
                    row.label,
                    r.seed,
                    "" if r.fold is None else r.fold,
                    status,
                    *[_num(res.metrics.get(k)) for k in keys],
                    *[_num(val.get(k)) for k in vkeys],
                    extra.get("best_epoch") or "",
                    " ".join(str(e) for e in extra.get("zero_loss_epochs", [])),
                    _num(extra.get("final_epoch_loss")),
                    _num(res.seconds_per_epoch, 4),
                    _num(res.train_seconds, 3),
                    _num(res.peak_memory_mb, 1),
                    res.out or "",
                    res.error or "",
                ]
            )
    return buf.getvalue()


def plot_comparison(rows: Sequence[LossSummary], path: Path, ks: Iterable[int], protocol: Protocol) -> None:
    """Recall@k and nDCG@k against k (one line per loss, error bars: 95 % intervals; the floor
    dashed) and the primary metric as bars with error bars."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ks = list(ks)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), dpi=100)
    ok = [r for r in rows if r.status != "error" and r.means]
    colors = {}
    zero = lambda v: 0.0 if v is None or math.isnan(v) else 100 * v
    for ax, prefix, title in ((axes[0], "recall_at_", "Recall@k"), (axes[1], "ndcg_at_", "nDCG@k")):
        for r in ok:
            ys = [100 * r.means.get(f"{prefix}{k}", float("nan")) for k in ks]
            err = [zero(r.ci95.get(f"{prefix}{k}")) for k in ks]
            style = (
                dict(color="black", linestyle="--" if r.label == FLOOR else ":", marker="x")
                if r.is_floor
                else dict(marker="o")
            )
            line = ax.errorbar(ks, ys, yerr=err, label=r.label, capsize=3, **style)
            colors[r.label] = line[0].get_color()
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("k")
        ax.set_ylabel("%")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax = axes[2]
    key = protocol.primary
    shown = [r for r in ok if key in r.means][::-1]
    ax.barh(
        [r.label + (" *" if r.is_best or r.tied_with_best else "") for r in shown],
        [100 * r.means[key] for r in shown],
        xerr=[zero(r.ci95.get(key)) for r in shown],
        capsize=3,
        color=[colors.get(r.label, "grey") for r in shown],
    )
    ax.set_xlabel("%")
    ax.set_title(f"{metric_label(key)} (mean ± 95% CI; * best or tied)")
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(alpha=0.3, axis="x")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
