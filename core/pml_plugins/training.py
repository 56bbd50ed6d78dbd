"""Deprecated alias of :mod:`pml_plugins.training_protocol` (renamed so it is not confused with the
main job's training loop in :mod:`pml_plugins.pipeline`); import ``TrainingContext`` /
``TrainingSetup`` from ``pml_plugins``."""

from __future__ import annotations

import sys
import warnings

from . import training_protocol

warnings.warn(
    "pml_plugins.training is deprecated: use pml_plugins.training_protocol (or import TrainingContext / "
    "TrainingSetup from pml_plugins)",
    DeprecationWarning,
    stacklevel=2,
)
# the old name is the same module object, so attribute reads and monkeypatches reach the real one
sys.modules[__name__] = training_protocol
