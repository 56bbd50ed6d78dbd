"""Compare losses: same data, backbone, seed and budget for each; one table, CSV, Markdown, plot.

A loss that fails (bad arguments, NaN, a bug in a plugin) gets an error row and the comparison
goes on. Files are rewritten after every run, so an interrupted comparison keeps every
completed run (each under ``OUT/runs/<loss>/``) and the table of those runs. Running the same
command again with the same ``--out`` keeps the runs that finished with the same settings and
continues an interrupted run from its checkpoint (``checkpoint.pt`` after every epoch).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import tqdm

from .. import registry as reg
from . import class_texts as class_texts_mod
from .config import TrainConfig
from .train import RunResult, metrics_record, run_training, write_json

#: PML's own losses every default comparison includes as references
REFERENCE_LOSSES = ("proxy_anchor", "soft_triple", "normalized_softmax", "contrastive")
FLOOR = "untrained (floor)"


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


def is_floor(r: RunResult) -> bool:
    """Whether ``r`` is the untrained floor row (the baseline every loss is compared with)."""
    return r.name.startswith(FLOOR[:-1])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


def run_compare(base: TrainConfig, losses: Sequence[str], out: Path, *, per_loss_args: Optional[dict] = None,
                progress: bool = True, log: Callable[[str], None] = print, lead: bool = True) -> list[RunResult]:
    """Train every loss in ``losses`` with ``base``'s settings; write ``OUT/results.{csv,md}``,
    ``OUT/comparison.png`` and ``OUT/runs/<loss>/``; return the rows (the floor first).

    With ``base.distributed`` every torchrun process calls this; ``lead=False`` on all ranks but
    0, which then train their share of every run and write nothing (their rows have no metrics).
    """
    losses = resolve_losses(losses)
    per_loss_args = per_loss_args or {}
    unknown = [k for k in per_loss_args if k not in losses]
    if unknown:
        raise ValueError(f"loss arguments given for {unknown}, which are not compared (losses: {', '.join(losses)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[RunResult] = []
    say = (lambda msg: None) if not lead else (lambda msg: tqdm.tqdm.write(msg)) if progress else log
    # The floor in every geometry the compared losses are evaluated in (L2 losses such as CAM
    # are compared against an L2 floor); a --retrieval-distance flag applies to all.
    distances = [base.retrieval_distance] if base.retrieval_distance else sorted(
        {reg.get_entry("loss", n).spec.retrieval_distance for n in losses} | {"cosine"})
    floors = [(FLOOR if d == "cosine" else f"{FLOOR[:-1]}, {d})", None, d) for d in distances]
    demo_args = demo_loss_args(base.dataset, losses, per_loss_args)
    demo_pretrain = {n: demo_pretrain_epochs(base.dataset, n, base) for n in losses}
    runs = floors + [(_label(name, {**(demo_args.get(name) or {}),
                                    **({"pretrain_epochs": demo_pretrain[name]} if demo_pretrain[name] is not None
                                       else {})})
                      + _distances_note(name, base, per_loss_args.get(name)), name, base.retrieval_distance)
                     for name in losses]
    try:
        for i, (label, loss, distance) in enumerate(runs):
            run_dir = (
                _safe(loss) if loss else ("untrained" if distance in (None, "cosine") else f"untrained_{distance}")
            )
            loss_args = dict(per_loss_args.get(loss, demo_args.get(loss, {}))) if loss else {}
            pretrain = demo_pretrain.get(loss) if loss else None
            cfg = dataclasses.replace(base, loss=loss, loss_args=loss_args,
                                      pretrain_epochs=base.pretrain_epochs if pretrain is None else pretrain,
                                      epochs=base.epochs if loss else 0, miner=base.miner if loss else None,
                                      retrieval_distance=distance, out=str(out / "runs" / run_dir))
            start = time.perf_counter()
            finished = finished_run(cfg, label)
            if finished is not None:  # the same command again: this run is done
                rows.append(finished)
                say(f"[{i + 1}/{len(runs)}] {label}: done before (same settings), kept")
                continue
            try:
                # an interrupted run with the same settings continues from its checkpoint
                result = run_training(cfg, progress=progress, name=label, write_checkpoint=loss is not None,
                                      resume="auto", resume_hint="the same pml-plugins compare command")
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one failing loss must not end the comparison
                message = f"{type(exc).__name__}: {exc}".strip()
                result = RunResult(name=label, error=message, config=cfg.to_dict())
                if lead:
                    Path(cfg.out).mkdir(parents=True, exist_ok=True)
                    (Path(cfg.out) / "error.txt").write_text(traceback.format_exc())
                say(f"[{i + 1}/{len(runs)}] {label}: FAILED ({message.splitlines()[0][:160]})")
            else:
                m = result.metrics
                say(f"[{i + 1}/{len(runs)}] {label}: R@1 {100 * m.get('recall_at_1', float('nan')):.1f}  "
                    f"MAP@R {100 * m.get('map_at_r', float('nan')):.1f}  ({time.perf_counter() - start:.1f} s)")
            rows.append(result)
            if lead:
                write_results(rows, out, base)
    except KeyboardInterrupt:
        if rows and lead:
            write_results(rows, out, base)
            log(f"interrupted: the {len(rows)} completed run(s) are in {out}")
        raise
    return rows


def finished_run(cfg: TrainConfig, label: str) -> Optional[RunResult]:
    """The result in ``cfg.out`` when a run with the same settings finished there (metrics.json is
    written last), else None."""
    import json

    from .resume import differences

    folder = Path(cfg.out)
    try:
        record = json.loads((folder / "metrics.json").read_text())
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(config, dict) or differences(config, cfg.to_dict()):
        return None
    known = {"name", "metrics", "seconds_per_epoch", "train_seconds", "peak_memory_mb", "memory_kind"}
    return RunResult(name=label, metrics=record.get("metrics") or {}, config=config, out=cfg.out,
                     seconds_per_epoch=record.get("seconds_per_epoch"),
                     train_seconds=record.get("train_seconds") or 0.0, peak_memory_mb=record.get("peak_memory_mb"),
                     memory_kind=record.get("memory_kind") or "",
                     extra={k: v for k, v in record.items() if k not in known})


# -- tables --------------------------------------------------------------------------------------
def columns(ks: Iterable[int]) -> list[tuple[str, str]]:
    ks = list(ks)
    cols = [(f"recall_at_{k}", f"R@{k}") for k in ks] + [("map_at_r", "MAP@R")]
    cols += [(f"ndcg_at_{k}", f"nDCG@{k}") for k in ks if k > 1]
    cols += [("mean_average_precision", "mAP"), ("NMI", "NMI")]
    return cols


def table_rows(rows: Sequence[RunResult], ks: Iterable[int]) -> tuple[list[str], list[list[str]]]:
    cols = columns(ks)
    if any("bits_recall_at_1" in r.metrics for r in rows if not r.error):  # --eval-binarize
        cols += [("bits_recall_at_1", "bits R@1"), ("bits_map_at_r", "bits MAP@R")]
    header = ["loss", *[c[1] for c in cols], "s/epoch", "peak MB", "status"]
    body = []
    for r in rows:
        if r.error:
            cells = ["-"] * len(cols) + ["-", "-", "error: " + r.error.splitlines()[0]]
        else:
            cells = [f"{100 * r.metrics[k]:.1f}" if k in r.metrics else "-" for k, _ in cols]
            cells += [f"{r.seconds_per_epoch:.2f}" if r.seconds_per_epoch is not None else "-",
                      f"{r.peak_memory_mb:.0f}" if r.peak_memory_mb is not None else "-",
                      "floor" if is_floor(r) else "ok"]
        body.append([r.name, *cells])
    return header, body


def format_table(rows: Sequence[RunResult], ks: Iterable[int], max_status: int = 60) -> str:
    header, body = table_rows(rows, ks)
    body = [row[:-1] + [row[-1] if len(row[-1]) <= max_status else row[-1][: max_status - 3] + "..."] for row in body]
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    lines = []
    for j, row in enumerate([header, *body]):
        cells = [
            str(c).ljust(widths[i]) if i in (0, len(row) - 1) else str(c).rjust(widths[i]) for i, c in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: Sequence[RunResult], ks: Iterable[int], base: TrainConfig) -> str:
    header, body = table_rows(rows, ks)
    esc = lambda s: str(s).replace("|", "\\|")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 2) + [" --- "]) + "|",
    ]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    setting = (f"dataset `{base.dataset}`, backbone `{base.backbone}`, embedding size {base.embedding_size}, "
               f"{base.epochs} epochs, batch {base.batch_size}, {base.optimizer} lr {base.lr:g}, seed {base.seed}")
    return ("# Loss comparison\n\n" + setting + ". Metrics in % on the test split (unseen classes), queried "
            "against itself. The floor is the same model untrained.\n\n" + "\n".join(lines) + "\n")


def write_results(rows: Sequence[RunResult], out: Path, base: TrainConfig) -> None:
    """``results.csv`` (every metric, full errors), ``results.md``, ``results.json``, ``comparison.png``."""
    metric_keys = sorted({k for r in rows for k in r.metrics})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["loss", "status", *metric_keys, "seconds_per_epoch", "train_seconds", "peak_memory_mb",
                     "memory_kind", "error"])
    for r in rows:
        status = "error" if r.error else ("floor" if is_floor(r) else "ok")
        writer.writerow([r.name, status, *[f"{r.metrics[k]:.6f}" if k in r.metrics else "" for k in metric_keys],
                         "" if r.seconds_per_epoch is None else f"{r.seconds_per_epoch:.4f}", f"{r.train_seconds:.3f}",
                         "" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.1f}", r.memory_kind, r.error or ""])
    _atomic_write(out / "results.csv", buf.getvalue())
    _atomic_write(out / "results.md", format_markdown(rows, base.ks, base))
    write_json(out / "results.json", {"setting": base.to_dict(),
                                      "runs": [{**metrics_record(r), "error": r.error} for r in rows]})
    plot_comparison(rows, out / "comparison.png", base.ks)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_comparison(rows: Sequence[RunResult], path: Path, ks: Iterable[int]) -> None:
    """Recall@k and nDCG@k against k, one line per loss; the floor dashed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ks = list(ks)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=100)
    ok = [r for r in rows if not r.error]
    colors = {}
    for ax, prefix, title in ((axes[0], "recall_at_", "Recall@k"), (axes[1], "ndcg_at_", "nDCG@k")):
        for r in rows:
            if r.error:
                continue
            ys = [100 * r.metrics.get(f"{prefix}{k}", float("nan")) for k in ks]
            style = (
                dict(color="black", linestyle="--" if r.name == FLOOR else ":", marker="x")
                if is_floor(r)
                else dict(marker="o")
            )
            line, = ax.plot(ks, ys, label=r.name, **style)
            colors[r.name] = line.get_color()
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("k")
        ax.set_ylabel("%")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax = axes[2]
    ax.barh([r.name for r in ok][::-1], [100 * r.metrics.get("map_at_r", float("nan")) for r in ok][::-1],
            color=[colors.get(r.name, "grey") for r in ok][::-1])
    ax.set_xlabel("%")
    ax.set_title("MAP@R")
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(alpha=0.3, axis="x")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
