"""What the main job hands to a loss that needs more than embeddings and labels.

A loss that needs special data handling during training (multi-view batches, a database that
must be refreshed, a custom sampler) declares a ``training_setup`` callable in its spec::

    register(DMCACLoss, name="dmcac", spec=pml_plugins.LossSpec(
        multi_view=True, database_refresh=True, training_setup=dmcac_training_setup))

The main job (``pml-plugins train``) calls ``training_setup(loss, context)`` once, before building
PML's trainer, with a :class:`TrainingContext`, and merges the returned :class:`TrainingSetup`
into the trainer. The core never imports the plugin: the callable is all it knows.

A setup that keeps state across epochs (a database, counters) sets ``state_dict`` /
``load_state_dict`` so that ``OUT/checkpoint.pt`` holds it and ``train --resume`` restores it.

(This module was called ``pml_plugins.training``; the old name still imports, with a
``DeprecationWarning``. The main job's training loop is :mod:`pml_plugins.pipeline`.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass
class TrainingContext:
    """The training run as the main job has resolved it (read-only for the plugin)."""

    trunk: torch.nn.Module
    embedder: torch.nn.Module
    train_dataset: torch.utils.data.Dataset
    batch_size: int
    epochs: int
    device: torch.device
    seed: int = 0
    num_workers: int = 0
    #: Run an input batch through trunk + embedder in eval mode, without grad (for refreshes).
    embed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    #: Options the user passed for the loss that are not constructor arguments.
    options: dict[str, Any] = field(default_factory=dict)
    #: Whether the run shows progress bars (False with --no-progress, off a terminal, and on
    #: every DDP rank but 0): a plugin's own bars (e.g. a database refresh) should follow it.
    progress: bool = True
    #: This process's rank and the number of processes (0 and 1 unless trained with --distributed).
    rank: int = 0
    world_size: int = 1
    #: The training split with the evaluation transform (no augmentation), same items in the same
    #: order as ``train_dataset``: what a plugin embeds as a database or reference set. None when
    #: the caller has none; then ``train_dataset`` is all there is.
    train_eval_dataset: Optional[torch.utils.data.Dataset] = None


@dataclass
class TrainingSetup:
    """What a plugin asks of the trainer; every field is optional."""

    #: Replaces the training dataset (e.g. the query split wrapped into multi-view items).
    train_dataset: Optional[torch.utils.data.Dataset] = None
    #: PML trainer ``collate_fn`` (e.g. flattening A views into B*A rows).
    collate_fn: Optional[Callable] = None
    #: A torch sampler (replaces the default m-per-class / random sampler).
    sampler: Optional[torch.utils.data.Sampler] = None
    #: Called by PML's trainer at the end of each epoch / iteration (e.g. a database refresh).
    end_of_epoch_hook: Optional[Callable[[Any], Any]] = None
    end_of_iteration_hook: Optional[Callable[[Any], Any]] = None
    #: Called once before training starts (e.g. embed the database for the first time).
    before_training: Optional[Callable[[], Any]] = None
    #: Rows per sample in a batch (A for multi-view batches); the batch size counts samples.
    views_per_sample: int = 1
    #: What the setup keeps between epochs that the loss's own ``state_dict`` does not hold (e.g.
    #: DMCAC's database and refresh counters), for checkpoints: ``state_dict()`` returns tensors
    #: and plain types only (checkpoints load with ``torch.load(..., weights_only=True)``);
    #: ``load_state_dict(state)`` restores it when a run resumes, instead of ``before_training``.
    state_dict: Optional[Callable[[], dict]] = None
    load_state_dict: Optional[Callable[[dict], Any]] = None
