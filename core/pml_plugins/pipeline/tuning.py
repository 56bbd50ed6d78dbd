"""Equal-budget hyper-parameter search with Optuna (``compare --tune TRIALS``).

Every loss gets the same number of trials over the space it declares (:mod:`pml_plugins.search_space`):
Optuna's TPE sampler (seeded) proposes a setting, the loss trains with the first seed on every
fold, and the objective is the validation metric of the selected epoch, averaged over folds.
Optuna's median pruner stops a trial whose per-epoch validation metric falls below the median
of earlier trials at the same epoch. Studies live in one SQLite file (``OUT/optuna.db``), one
per loss and setting, so a killed tuning run continues where it stopped: finished (complete,
pruned or failed) trials are kept and only the missing ones run. The sampler is re-seeded with
the number of finished trials before each trial, so a resumed study proposes what an
uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

#: trials drawn at random before TPE models the results (at most half the budget)
MAX_STARTUP_TRIALS = 10
#: trials that finish before the median pruner stops anything
PRUNER_STARTUP_TRIALS = 3


def _optuna():
    try:
        import optuna
    except ImportError:  # pragma: no cover - optuna is in the train extra
        raise ImportError(
            "compare --tune needs Optuna: pip install 'pml-plugins[train]' (or pip install optuna)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def study_name(label: str, setting: dict) -> str:
    """``<loss>-<hash of the setting>``: another setting (epochs, data, space...) is another study."""
    digest = hashlib.sha1(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{label}-{digest}"


def storage_url(out: Path) -> str:
    return f"sqlite:///{Path(out).resolve() / 'optuna.db'}"


#: user attribute of a trial whose run failed (a NaN, a bad setting): it counts as done
ERROR_ATTR = "error"


def finished_trials(study: Any) -> list:
    """Complete, pruned, and failed-by-its-run trials. A trial that was interrupted (Ctrl-C: failed
    without a recorded run error) or killed (still "running") is not done: it runs again."""
    optuna = _optuna()
    state = optuna.trial.TrialState
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state in (state.COMPLETE, state.PRUNED) or (t.state == state.FAIL and ERROR_ATTR in t.user_attrs)
    ]


def tune(
    name: str,
    trials: int,
    out: Path,
    setting: dict,
    objective: Callable[[Any], float],
    *,
    log: Callable[[str], None] = print,
    seed: int = 0,
) -> tuple[Optional[dict], Optional[float], list]:
    """Run ``trials`` trials of ``objective(trial)`` in the study ``name`` (continuing an existing one).

    Returns ``(best params, best value, finished trials)``; ``(None, None, trials)`` when no trial
    completed (every one failed or was pruned).
    """
    optuna = _optuna()
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"tune must be a positive number of trials, got {trials!r}")
    Path(out).mkdir(parents=True, exist_ok=True)
    study_id = study_name(name, setting)
    storage = storage_url(out)
    study = optuna.create_study(study_name=study_id, storage=storage, direction="maximize", load_if_exists=True)
    done = finished_trials(study)
    if done:
        log(f"[tune {name}] continuing study {study_id} in {out}/optuna.db: {len(done)}/{trials} trials done")
    startup = max(1, min(MAX_STARTUP_TRIALS, trials // 2))
    while len(done) < trials:
        # re-seeded per trial: the proposal depends on the finished trials only, not on restarts
        sampler = optuna.samplers.TPESampler(seed=seed + len(done), n_startup_trials=startup)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=1)
        study = optuna.load_study(study_name=study_id, storage=storage, sampler=sampler, pruner=pruner)
        study.optimize(_recording_errors(objective), n_trials=1)
        trial = study.trials[-1]
        done = finished_trials(study)
        shown = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        state = trial.state.name.lower()
        value = f"{100 * trial.value:.1f}" if trial.value is not None and math.isfinite(trial.value) else "-"
        log(f"[tune {name}] trial {len(done)}/{trials}: {state}, validation {value} ({shown})")
    complete = [t for t in done if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    if not complete:
        return None, None, done
    best = max(complete, key=lambda t: (t.value, -t.number))  # ties: the earlier trial
    return dict(best.params), float(best.value), done


def _recording_errors(objective: Callable[[Any], float]) -> Callable[[Any], float]:
    """A failing run fails its trial (recorded, counted as done); pruning and Ctrl-C pass through."""
    optuna = _optuna()

    def wrapped(trial: Any) -> float:
        try:
            return objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            trial.set_user_attr(ERROR_ATTR, f"{type(exc).__name__}: {exc}"[:2000])
            return math.nan  # Optuna marks a NaN objective as a failed trial

    return wrapped


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
