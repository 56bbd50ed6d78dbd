"""The comparison protocol: seeds, class-disjoint validation, equal-budget tuning, one test per model.

After Musgrave, Belongie & Lim, "A Metric Learning Reality Check" (ECCV 2020):

- **Seeds.** Every loss trains with seeds ``0..N-1``; the same seed gives every loss the same
  initial weights, the same validation classes and the same batches (for the same sampler), so
  runs pair up by seed.
- **Validation.** ``folds > 1``: the training classes are split into class-disjoint folds (seeded by
  the run seed); each run trains on all folds but one and validates on the held-out one after every
  epoch. ``folds == 1``: a held-out ``val_classes`` fraction of the training classes validates.
  The reported model is the epoch with the best validation metric (``primary``), never chosen by
  test; the test split is evaluated once per selected model. With folds, a seed's test value is
  the mean over its fold models (Musgrave's "separated" evaluation).
- **Tuning.** ``tune > 0``: the same number of Optuna trials per loss over the loss's declared
  space (:mod:`.tuning`), then the best setting is retrained with every seed and tested.

Runs live in ``OUT/runs/<loss>/seed<k>/`` (``.../seed<k>/fold<j>/`` with folds; the floor is the
loss ``untrained``). :func:`run_protocol` returns one :class:`LossSummary` per row.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .. import registry as reg
from .. import search_space as space_mod
from . import data as data_mod
from . import stats
from .config import TrainConfig
from .outputs import RunResult
from .selection import EpochSelection
from .train import run_training

FLOOR = "untrained (floor)"


@dataclass
class Protocol:
    """How losses are compared (the CLI's ``--seeds``, ``--folds``, ``--val-classes``, ``--tune``, ``--primary``)."""

    seeds: int = 3
    folds: int = 1
    val_classes: float = 0.2
    tune: int = 0
    primary: str = "map_at_r"
    alpha: float = 0.05

    def __post_init__(self) -> None:
        for name, low in (("seeds", 1), ("folds", 1), ("tune", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if (
            isinstance(self.val_classes, bool)
            or not isinstance(self.val_classes, (int, float))
            or not 0 <= self.val_classes < 1
        ):
            raise ValueError(f"val-classes must be a fraction in [0, 1), got {self.val_classes!r}")
        if self.tune and not self.validates:
            raise ValueError("--tune selects settings on validation classes: use --folds >= 2 or --val-classes > 0")

    @property
    def validates(self) -> bool:
        return self.folds > 1 or self.val_classes > 0

    def held_out(self, num_train_classes: int, seed: int) -> list[Optional[np.ndarray]]:
        """The validation classes of each run of ``seed``: one entry per fold; ``[None]`` without
        validation."""
        classes = np.arange(num_train_classes)
        if self.folds > 1:
            return data_mod.class_folds(classes, self.folds, seed)
        if self.val_classes > 0:
            return [data_mod.validation_classes(classes, self.val_classes, seed)]
        return [None]


@dataclass
class RunRecord:
    """One run: a loss at one seed (and fold)."""

    label: str
    loss: Optional[str]
    seed: int
    fold: Optional[int]
    result: RunResult
    seconds: float = 0.0
    #: finished in an earlier invocation with the same settings: read back, not trained again
    reused: bool = False

    @property
    def ok(self) -> bool:
        return self.result.error is None

    @property
    def zero_loss_epochs(self) -> list:
        return list(self.result.extra.get("zero_loss_epochs", []))


@dataclass
class LossSummary:
    """One row of the comparison: a loss (or the floor) over all its runs."""

    label: str
    loss: Optional[str]
    runs: list = field(default_factory=list)
    #: the setting that was tested: constructor arguments and loss_lr (tuned or given)
    params: dict = field(default_factory=dict)
    tuning: Optional[dict] = None
    #: filled by :func:`summarize`
    means: dict = field(default_factory=dict)
    ci95: dict = field(default_factory=dict)
    per_seed: dict = field(default_factory=dict)
    tied_with_best: Optional[bool] = None
    is_best: bool = False
    p_value: float = math.nan
    error: Optional[str] = None

    @property
    def is_floor(self) -> bool:
        return self.loss is None

    @property
    def status(self) -> str:
        if self.is_floor:
            return "floor"
        ok = [r for r in self.runs if r.ok]
        if not ok:
            return "error"
        return "partial" if len(ok) < len(self.runs) else "ok"

    @property
    def n_seeds(self) -> int:
        return len({r.seed for r in self.runs if r.ok})

    @property
    def warning(self) -> str:
        zero = [r for r in self.runs if r.zero_loss_epochs]
        if not zero:
            return ""
        return f"loss 0 for a whole epoch in {len(zero)}/{len(self.runs)} run(s): those epochs trained nothing"


# -- running ------------------------------------------------------------------------------------
def run_dir(out: Path, loss_dir: str, seed: int, fold: Optional[int]) -> Path:
    """``OUT/runs/<loss>/seed<k>[/fold<j>]``."""
    path = Path(out) / "runs" / loss_dir / f"seed{seed}"
    return path / f"fold{fold}" if fold is not None else path


def execute(
    cfg: TrainConfig,
    label: str,
    *,
    loss: Optional[str],
    seed: int,
    fold: Optional[int],
    held_out: Optional[np.ndarray],
    progress: bool,
    write_files: bool = True,
    report: Optional[Callable[[int, float], None]] = None,
    primary: str = "map_at_r",
) -> RunRecord:
    """One run; an exception (other than Ctrl-C and Optuna's pruning) becomes an error record.

    A run that finished before in ``cfg.out`` with the same settings and validation classes is
    kept (``record.reused``); an interrupted one continues from its checkpoint (which holds the
    epoch selection so far when the run validates)."""
    start = time.perf_counter()
    validates = held_out is not None and loss is not None
    selection = EpochSelection(held_out=held_out.tolist(), metric=primary, report=report) if validates else None
    if write_files and cfg.out:
        finished = finished_run(cfg, label)
        wanted = [int(c) for c in held_out] if validates else None
        if finished is not None and finished.extra.get("val_classes") == wanted:
            return RunRecord(label=label, loss=loss, seed=seed, fold=fold, result=finished, reused=True)
    try:
        result = run_training(
            cfg,
            progress=progress,
            name=label,
            write_checkpoint=loss is not None and write_files,
            selection=selection,
            resume="auto" if write_files else False,
            resume_hint="the same pml-plugins compare command",
        )
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one failing loss must not end the comparison
        if type(exc).__name__ == "TrialPruned":
            raise
        message = f"{type(exc).__name__}: {exc}".strip()
        result = RunResult(name=label, error=message, config=cfg.to_dict())
        if write_files and cfg.out:
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            (Path(cfg.out) / "error.txt").write_text(traceback.format_exc())
    return RunRecord(label=label, loss=loss, seed=seed, fold=fold, result=result, seconds=time.perf_counter() - start)


def finished_run(cfg: TrainConfig, label: str) -> Optional[RunResult]:
    """The result in ``cfg.out`` when a run with the same settings finished there (metrics.json is
    written last), else None."""
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
    return RunResult(
        name=label,
        metrics=record.get("metrics") or {},
        config=config,
        out=cfg.out,
        seconds_per_epoch=record.get("seconds_per_epoch"),
        train_seconds=record.get("train_seconds") or 0.0,
        peak_memory_mb=record.get("peak_memory_mb"),
        memory_kind=record.get("memory_kind") or "",
        extra={k: v for k, v in record.items() if k not in known},
    )


def split_loss_args(args: dict) -> tuple[dict, Optional[float]]:
    """A setting -> (constructor arguments, loss_lr or None)."""
    args = dict(args)
    return args, args.pop(space_mod.LOSS_LR, None)


def tune_loss(
    base: TrainConfig,
    name: str,
    label: str,
    fixed_args: dict,
    protocol: Protocol,
    out: Path,
    num_train_classes: int,
    *,
    progress: bool,
    log: Callable[[str], None],
) -> dict:
    """Optuna over the loss's declared space with the first seed on every fold; returns
    ``{"params": best setting, "value": best validation value, "trials": n, "space": text}``."""
    from . import tuning

    space = space_mod.entry_search_space(reg.get_entry("loss", name))
    if not space:
        log(f"[tune {label}] no search space declared: trained with its defaults")
        return {"params": {}, "value": None, "trials": 0, "space": "none declared"}
    seed = 0
    plans = protocol.held_out(num_train_classes, seed)
    epochs = max(base.epochs, 1)

    def objective(trial: Any) -> float:
        setting = space_mod.suggest(trial, space)
        loss_args, loss_lr = split_loss_args({**fixed_args, **setting})
        values = []
        for j, held in enumerate(plans):

            def report(epoch: int, value: float, j: int = j) -> None:
                trial.report(value, step=j * epochs + epoch)
                if trial.should_prune():
                    import optuna

                    raise optuna.TrialPruned()

            cfg = dataclasses.replace(
                base,
                loss=name,
                loss_args=loss_args,
                seed=seed,
                out=None,
                loss_lr=loss_lr if loss_lr is not None else base.loss_lr,
            )
            record = execute(
                cfg,
                label,
                loss=name,
                seed=seed,
                fold=j if protocol.folds > 1 else None,
                held_out=held,
                progress=progress,
                write_files=False,
                report=report,
                primary=protocol.primary,
            )
            if not record.ok:
                raise RuntimeError(record.result.error)
            values.append(record.result.extra["val_metrics"][f"val_{protocol.primary}"])
        return float(np.mean(values))

    # what the trials depend on (not the trial budget or the number of final seeds: a larger
    # --tune continues the same study)
    setting = {
        "loss": reg.get_entry("loss", name).qualified_name,
        "fixed": fixed_args,
        "space": space_mod.describe_space(space),
        "protocol": {k: v for k, v in dataclasses.asdict(protocol).items() if k not in ("tune", "seeds", "alpha")},
        "base": {k: v for k, v in base.to_dict().items() if k not in ("out", "seed")},
    }
    params, value, done = tuning.tune(label, protocol.tune, out, setting, objective, log=log)
    if params is None:
        raise RuntimeError(f"tuning {label}: none of the {len(done)} trials completed (all failed or were pruned)")
    log(
        f"[tune {label}] best of {len(done)} trials: validation {100 * value:.1f} with "
        + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    )
    return {"params": params, "value": value, "trials": len(done), "space": space_mod.describe_space(space)}


def run_protocol(
    base: TrainConfig,
    losses: Sequence[tuple[str, str, dict]],
    out: Path,
    protocol: Protocol,
    *,
    floors: Sequence[tuple[str, str]] = (),
    progress: bool = True,
    say: Callable[[str], None] = print,
    on_update: Optional[Callable[[list], None]] = None,
) -> list[LossSummary]:
    """Run the protocol. ``losses``: ``(label, loss name, fixed constructor args[, config overrides])``;
    ``floors``: ``(label, retrieval distance)`` of the untrained rows. ``on_update(summaries)`` is called
    after every run (to rewrite the result files), also with the partial rows on Ctrl-C."""
    out = Path(out)
    splits = data_mod.load_data(base.dataset) if protocol.validates else None
    num_train = splits.num_train_classes if splits is not None else 0
    # every seed's validation classes, planned (and checked: enough classes for the folds) before any run
    plans = {
        seed: protocol.held_out(num_train, seed) if protocol.validates else [None] for seed in range(protocol.seeds)
    }
    summaries: list[LossSummary] = []
    total = len(floors) * protocol.seeds + len(losses) * protocol.seeds * protocol.folds
    done = 0

    def update() -> None:
        summarize(summaries, protocol)
        if on_update is not None:
            on_update(summaries)

    for label, distance in floors:
        row = LossSummary(label=label, loss=None)
        summaries.append(row)
        for seed in range(protocol.seeds):
            dirname = "untrained" if distance == "cosine" else f"untrained_{distance}"
            cfg = dataclasses.replace(
                base,
                loss=None,
                loss_args={},
                epochs=0,
                miner=None,
                seed=seed,
                retrieval_distance=distance,
                out=str(run_dir(out, dirname, seed, None)),
            )
            record = execute(cfg, label, loss=None, seed=seed, fold=None, held_out=None, progress=progress)
            row.runs.append(record)
            done += 1
            _say_run(say, done, total, record)
            update()
    for item in losses:
        label, name, fixed_args = item[:3]
        # a 4th element: settings of this loss's runs other than its arguments (e.g. pretrain_epochs)
        loss_base = dataclasses.replace(base, **item[3]) if len(item) > 3 and item[3] else base
        row = LossSummary(label=label, loss=name)
        summaries.append(row)
        args = dict(fixed_args)
        if protocol.tune:
            try:
                row.tuning = tune_loss(
                    loss_base, name, label, args, protocol, out, num_train, progress=progress, log=say
                )
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                row.error = f"{type(exc).__name__}: {exc}"
                say(f"{label}: tuning FAILED ({row.error.splitlines()[0][:160]})")
                done += protocol.seeds * protocol.folds
                update()
                continue
            args.update(row.tuning["params"])
        loss_args, loss_lr = split_loss_args(args)
        row.params = {**loss_args, **({space_mod.LOSS_LR: loss_lr} if loss_lr is not None else {})}
        for seed in range(protocol.seeds):
            for j, held in enumerate(plans[seed]):
                fold = j if protocol.folds > 1 else None
                cfg = dataclasses.replace(
                    loss_base,
                    loss=name,
                    loss_args=loss_args,
                    seed=seed,
                    loss_lr=loss_lr if loss_lr is not None else base.loss_lr,
                    out=str(run_dir(out, _safe(name), seed, fold)),
                )
                record = execute(
                    cfg,
                    label,
                    loss=name,
                    seed=seed,
                    fold=fold,
                    held_out=held,
                    progress=progress,
                    primary=protocol.primary,
                )
                row.runs.append(record)
                done += 1
                _say_run(say, done, total, record)
                if record.zero_loss_epochs:
                    say(
                        f"warning: {label} seed {seed}{'' if fold is None else f' fold {fold}'}: the loss was 0 for "
                        f"every iteration of epoch(s) {_ranges(record.zero_loss_epochs)}: those epochs trained "
                        f"nothing (marked in the table)"
                    )
                update()
    return summaries


def _say_run(say: Callable[[str], None], i: int, total: int, record: RunRecord) -> None:
    where = f"seed {record.seed}" + ("" if record.fold is None else f" fold {record.fold}")
    if record.reused:
        say(f"[{i}/{total}] {record.label}: done before (same settings), kept ({where})")
        return
    if not record.ok:
        say(f"[{i}/{total}] {record.label} {where}: FAILED ({record.result.error.splitlines()[0][:160]})")
        return
    m = record.result.metrics
    val = record.result.extra.get("val_metrics", {})
    val_text = (
        f"  val MAP@R {100 * val['val_map_at_r']:.1f} (epoch {record.result.extra.get('best_epoch')})"
        if "val_map_at_r" in val
        else ""
    )
    say(
        f"[{i}/{total}] {record.label} {where}: R@1 {100 * m.get('recall_at_1', math.nan):.1f}  "
        f"MAP@R {100 * m.get('map_at_r', math.nan):.1f}{val_text}  ({record.seconds:.1f} s)"
    )


def _ranges(epochs: Sequence[int]) -> str:
    epochs = sorted(epochs)
    return (
        f"{epochs[0]}-{epochs[-1]}"
        if len(epochs) > 2 and epochs[-1] - epochs[0] == len(epochs) - 1
        else ", ".join(str(e) for e in epochs)
    )


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


# -- statistics over runs -------------------------------------------------------------------------
def seed_values(row: LossSummary, key: str) -> dict[int, float]:
    """A metric per seed: the run's value, or with folds the mean over the seed's fold models.
    Validation keys (``val_*``) come from the selected epoch."""
    by_seed: dict[int, list] = {}
    for r in row.runs:
        if not r.ok:
            continue
        value = r.result.extra.get("val_metrics", {}).get(key) if key.startswith("val_") else r.result.metrics.get(key)
        if value is not None:
            by_seed.setdefault(r.seed, []).append(float(value))
    return {s: float(np.mean(v)) for s, v in sorted(by_seed.items())}


def metric_keys(rows: Sequence[LossSummary]) -> list[str]:
    return sorted({k for row in rows for r in row.runs if r.ok for k in r.result.metrics})


def val_keys(rows: Sequence[LossSummary]) -> list[str]:
    return sorted({k for row in rows for r in row.runs if r.ok for k in r.result.extra.get("val_metrics", {})})


def summarize(rows: Sequence[LossSummary], protocol: Protocol) -> None:
    """Means, 95 % intervals over seeds and the ties with the best loss on ``protocol.primary``."""
    keys = metric_keys(rows) + val_keys(rows)
    for row in rows:
        row.means, row.ci95, row.per_seed = {}, {}, {}
        for key in keys:
            values = seed_values(row, key)
            if values:
                row.per_seed[key] = values
                row.means[key] = stats.mean(list(values.values()))
                row.ci95[key] = stats.ci95(list(values.values()))
    # ties: losses with every seed (a partial row cannot be paired), the floor excluded
    seeds = list(range(protocol.seeds))
    candidates = {
        row.label: [row.per_seed.get(protocol.primary, {}).get(s, math.nan) for s in seeds]
        for row in rows
        if not row.is_floor and row.status == "ok"
    }
    tied = stats.tied_with_best(candidates, alpha=protocol.alpha) if candidates else {}
    best = stats.best_of(candidates)
    for row in rows:
        row.tied_with_best = tied.get(row.label)
        row.is_best = row.label == best
        row.p_value = (
            stats.paired_pvalue(candidates[row.label], candidates[best])
            if best is not None and row.label in candidates and row.label != best
            else math.nan
        )
