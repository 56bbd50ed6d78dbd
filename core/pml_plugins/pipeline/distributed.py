"""Deprecated alias of :mod:`pml_plugins.pipeline.ddp` (the main job's DDP plumbing; renamed so it is not
confused with the losses' DDP semantics in :mod:`pml_plugins.distributed_losses`)."""

from __future__ import annotations

import sys
import warnings

from . import ddp

warnings.warn(
    "pml_plugins.pipeline.distributed is deprecated: use pml_plugins.pipeline.ddp", DeprecationWarning, stacklevel=2
)
# the old name is the same module object, so attribute reads and monkeypatches reach the real one
sys.modules[__name__] = ddp
