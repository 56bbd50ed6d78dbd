"""The main job: data, models, training with PML trainers, evaluation, comparison."""

from __future__ import annotations

from .config import TrainConfig, build_config, load_config_file
from .train import RunResult, build_loss, run_training

__all__ = ["TrainConfig", "RunResult", "build_config", "load_config_file", "build_loss", "run_training"]
