"""What the steps of one training run share: :class:`RunState`, built by ``train.run_training``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .. import distributed_losses
from .. import registry as reg
from .config import TrainConfig
from .selection import EpochSelection


@dataclass
class RunState:
    """What the steps of one run share (built by ``train.run_training``, read and extended by each step)."""

    cfg: TrainConfig
    name: str
    device: torch.device
    progress: bool
    log: Optional[Callable[[str], None]]
    env: Optional[distributed_losses.DistributedEnv]
    amp_dtype: Optional[torch.dtype] = None
    entry: Optional[reg.Entry] = None
    backbone: str = ""
    model: Any = None
    splits: Any = None
    trunk: Optional[torch.nn.Module] = None
    embedder: Optional[torch.nn.Module] = None
    resolved: dict = None  # type: ignore[assignment]
    selection: Optional[EpochSelection] = None

    @property
    def lead(self) -> bool:
        """Only rank 0 logs, evaluates and writes."""
        return self.env is None or self.env.rank == 0
