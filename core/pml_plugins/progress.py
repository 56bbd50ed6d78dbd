"""Whether long work shows progress bars: a leaf module shared by the commands (imports nothing from the package)."""

from __future__ import annotations

import os
import sys

__all__ = ["ENV_PROGRESS", "force_progress", "show_progress"]

#: Set to anything but ``""`` / ``"0"`` to show progress bars even when stderr is not a terminal.
ENV_PROGRESS = "PML_PLUGINS_PROGRESS"


def force_progress() -> bool:
    """Whether ``PML_PLUGINS_PROGRESS`` asks for progress bars off a terminal (CI logs, notebooks)."""
    return os.environ.get(ENV_PROGRESS, "") not in ("", "0")


def show_progress(no_progress: bool = False) -> bool:
    """Progress bars unless ``no_progress`` (``--no-progress``): on a terminal, or when forced."""
    return not no_progress and (sys.stderr.isatty() or force_progress())
