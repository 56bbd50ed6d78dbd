"""``training_setup``: what the main job calls to train DMCAC with PML's trainers."""
from __future__ import annotations

from typing import Any

import torch

from pml_plugins import TrainingContext, TrainingSetup
from pml_plugins.knn import INDEXES

from .data import MultiViewDataset, dataset_labels, multi_view_collate, split_query_database
from .refresh import DatabaseRefresher, make_embed_fn
from .retrieval import build_faiss_index

#: ``TrainingContext.options`` this setup reads, with their defaults.
OPTION_DEFAULTS = {
    "database_fraction": 0.2,  # the paper's 80/20 stratified query/database split (section 4.1)
    "refresh_every": 1,  # epochs between database refreshes (the paper: 15; see the docs)
    "refresh_every_iterations": None,  # or refresh every N iterations instead
    "refresh_batch_size": 256,
    "view_transform": None,  # callable for views 1..A-1 (default RandAugment / TensorViewAugment)
    # None: the core's kNN layer per step; "flat" / "ivf" / "hnsw" / "pq": a core KNNIndex built per refresh
    "index": None,
    "progress": None,  # None: the main job's setting (context.progress: off-terminal, --no-progress, DDP rank > 0)
}


def training_setup(loss: Any, context: TrainingContext) -> TrainingSetup:
    """Split the training set into query/database, serve the queries as A-view items in the B*A
    layout, and keep the loss's database fresh.

    * ``split_query_database`` (stratified, seed = ``context.seed``): the queries become the
      training dataset, wrapped in :class:`MultiViewDataset` with ``loss.num_views`` views;
    * ``multi_view_collate`` flattens a batch of B items to B*A rows;
    * a :class:`DatabaseRefresher` embeds the database split with ``context.embed`` before
      training (``before_training``) and every ``refresh_every`` epochs (``end_of_epoch_hook``),
      or every ``refresh_every_iterations`` iterations (``end_of_iteration_hook``);
    * the refresher's counters and database go into training checkpoints (``state_dict`` /
      ``load_state_dict``), so ``train --resume`` continues with the same database.

    ``context.options`` may override :data:`OPTION_DEFAULTS`.
    """
    num_views = int(getattr(loss, "num_views", 1))
    given = dict(context.options)
    if "views" in given:  # the main job's generic name; A is the loss's own num_views argument
        if int(given.pop("views")) != num_views:
            raise ValueError(f"DMCAC takes its number of views from the loss: num_views={num_views} "
                             f"(set it as a loss constructor argument, e.g. --loss-arg num_views=6)")
    unknown = set(given) - set(OPTION_DEFAULTS)
    options = {**OPTION_DEFAULTS, **{k: v for k, v in given.items() if k in OPTION_DEFAULTS}}
    if unknown:
        raise ValueError(f"unknown DMCAC training options {sorted(unknown)}; known: {sorted(OPTION_DEFAULTS)}")
    labels = dataset_labels(context.train_dataset)
    query_idx, database_idx = split_query_database(labels, options["database_fraction"], seed=context.seed)
    database = torch.utils.data.Subset(context.train_dataset, database_idx.tolist())
    embed = context.embed or make_embed_fn(context.trunk, context.embedder, context.device)
    every_iterations = options["refresh_every_iterations"]
    kind = options["index"]
    if kind is not None and kind not in INDEXES:
        raise ValueError(f"option index must be None or one of {INDEXES}, got {kind!r}")
    index_factory = None if kind is None else (lambda emb: build_faiss_index(emb, kind=kind))
    refresher = DatabaseRefresher(
        loss, database, embed,
        every_epochs=None if every_iterations else options["refresh_every"],
        every_iterations=every_iterations,
        batch_size=int(options["refresh_batch_size"]), num_workers=context.num_workers, device=context.device,
        modules=[m for m in (context.trunk, context.embedder) if m is not None], index_factory=index_factory,
        progress=context.progress if options["progress"] is None else bool(options["progress"]),
        rank=context.rank, world_size=context.world_size,  # under DDP each rank embeds a slice
    )
    queries = MultiViewDataset(context.train_dataset, num_views, indices=query_idx,
                               view_transform=options["view_transform"])
    return TrainingSetup(
        train_dataset=queries,
        collate_fn=multi_view_collate,
        end_of_epoch_hook=refresher.end_of_epoch_hook if not every_iterations else None,
        end_of_iteration_hook=refresher.end_of_iteration_hook if every_iterations else None,
        before_training=refresher.refresh,
        views_per_sample=num_views,
        **_checkpoint_hooks(refresher),
    )


def _checkpoint_hooks(refresher: DatabaseRefresher) -> dict:
    """The refresher's state for training checkpoints, where this pml_plugins takes it."""
    fields = getattr(TrainingSetup, "__dataclass_fields__", {})
    if "state_dict" not in fields:  # an older pml_plugins without checkpoint hooks
        return {}
    return {"state_dict": refresher.state_dict, "load_state_dict": refresher.load_state_dict}
