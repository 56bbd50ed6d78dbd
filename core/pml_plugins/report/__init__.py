"""Offline HTML reports of runs and comparisons, the per-epoch log, and TensorBoard events.

:func:`write_report` turns a run folder (or a comparison folder) into one self-contained
``report.html``: every image inline as a data URI, no script, no font or style from the
network. It reads only what the folder holds; the run-folder contract (``metrics.jsonl``,
``test_embeddings.npz``) is in :mod:`pml_plugins.report.artifacts`, whose writers the
training loop calls.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional

from .artifacts import (
    MAX_THUMBNAILS,
    METRICS_JSONL,
    TEST_ARTIFACTS,
    THUMBNAIL_SIZE,
    append_metrics_line,
    load_test_artifacts,
    make_thumbnails,
    read_metrics_jsonl,
    save_test_artifacts,
    thumbnail_sample,
)
from .tensorboard import TENSORBOARD_DIR, TensorBoardLogger, write_tensorboard

REPORT_FILE = "report.html"


@contextlib.contextmanager
def _threads(n: int):
    """Limit torch's and the BLAS/OpenMP pools' threads: the report's work is small, and on a
    busy machine oversubscribed OpenMP threads (t-SNE) run several times slower than one."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            yield
        else:
            with threadpool_limits(limits=n):
                yield
    finally:
        torch.set_num_threads(previous)


def write_report(
    directory: Any, out: Optional[Any] = None, *, seed: int = 0, run_reports: bool = True, threads: int = 1
) -> Path:
    """Write the report of a run folder or a comparison folder; returns the file written.

    ``out`` defaults to ``DIRECTORY/report.html``. For a comparison (a folder with
    ``results.csv``) each loss's run under ``runs/`` (its first seed) gets its own report first
    (``run_reports``), and the comparison's report links to them.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder (expected a run or comparison output folder)")
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    target = Path(out) if out is not None else directory / REPORT_FILE
    with _threads(threads):
        text = _build(directory, target, seed, run_reports)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    return target


def _build(directory: Path, target: Path, seed: int, run_reports: bool) -> str:
    from .compare_report import build_compare_report, is_compare_dir, report_targets
    from .run_report import build_run_report

    if is_compare_dir(directory):
        if run_reports:
            for run in report_targets(directory):
                (run / REPORT_FILE).write_text(build_run_report(run, seed=seed), encoding="utf-8")
        text = build_compare_report(directory, link_base=target.parent)
    else:
        text = build_run_report(directory, seed=seed)
    return text


__all__ = [
    "MAX_THUMBNAILS",
    "METRICS_JSONL",
    "REPORT_FILE",
    "TENSORBOARD_DIR",
    "TEST_ARTIFACTS",
    "THUMBNAIL_SIZE",
    "TensorBoardLogger",
    "append_metrics_line",
    "load_test_artifacts",
    "make_thumbnails",
    "read_metrics_jsonl",
    "save_test_artifacts",
    "thumbnail_sample",
    "write_report",
    "write_tensorboard",
]
