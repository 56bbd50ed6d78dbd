"""Deprecated alias of :mod:`pml_plugins.distributed_losses` (renamed so it is not confused with the
main job's DDP plumbing in :mod:`pml_plugins.pipeline.ddp`)."""

from __future__ import annotations

import sys
import warnings

from . import distributed_losses

warnings.warn(
    "pml_plugins.distributed is deprecated: use pml_plugins.distributed_losses", DeprecationWarning, stacklevel=2
)
# the old name is the same module object, so attribute reads and monkeypatches reach the real one
sys.modules[__name__] = distributed_losses
