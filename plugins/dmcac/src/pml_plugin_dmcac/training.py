"""``training_setup``: what the main job calls to train DMCAC with PML's trainers."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from pml_plugins import TrainingContext, TrainingSetup
from pml_plugins.knn import INDEXES

from .data import MultiViewDataset, dataset_labels, multi_view_collate, split_query_database
from .database_gradient import DatabaseEncoder
from .refresh import DatabaseRefresher, make_embed_fn
from .retrieval import build_faiss_index

#: ``TrainingContext.options`` this setup reads, with their defaults.
OPTION_DEFAULTS = {
    "database_fraction": 0.2,  # the paper's 80/20 stratified query/database split (section 4.1)
    "refresh_every_epochs": 1,  # epochs between database refreshes (the paper: 15, section 3.4)
    "refresh_every_iterations": None,  # or refresh every N iterations instead
    # retrieval="full": embed the database with the current encoder at every step and pass the
    # gradient through every row (section 3.4, eq. 6); False keeps refreshed constant rows
    "database_gradient": True,
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
      training (``before_training``) and every ``refresh_every_epochs`` epochs
      (``end_of_epoch_hook``), or every ``refresh_every_iterations`` iterations
      (``end_of_iteration_hook``);
    * the database items come from ``context.train_eval_dataset`` (the training split with the
      evaluation transform) when the caller gives it, so the database is embedded from the
      original images, not from augmented crops;
    * ``loss.retrieval == "full"`` with ``database_gradient`` (the default): a
      :class:`DatabaseEncoder` re-embeds the database in every step and the gradient reaches the
      encoder through every row (no refreshes needed); not under DDP.
    * the refresher's counters and database go into training checkpoints (``state_dict`` /
      ``load_state_dict``), so ``train --resume`` continues with the same database.

    ``context.options`` may override :data:`OPTION_DEFAULTS` (``refresh_every`` is accepted as
    the old name of ``refresh_every_epochs``).
    """
    num_views = int(getattr(loss, "num_views", 1))
    given = dict(context.options)
    if "views" in given:  # the main job's generic name; A is the loss's own num_views argument
        if int(given.pop("views")) != num_views:
            raise ValueError(
                f"DMCAC takes its number of views from the loss: num_views={num_views} "
                f"(set it as a loss constructor argument, e.g. --loss-arg num_views=6)"
            )
    if "refresh_every" in given:  # the option's old name
        if "refresh_every_epochs" in given:
            raise ValueError("give refresh_every_epochs or its old name refresh_every, not both")
        given["refresh_every_epochs"] = given.pop("refresh_every")
    unknown = set(given) - set(OPTION_DEFAULTS)
    options = {**OPTION_DEFAULTS, **{k: v for k, v in given.items() if k in OPTION_DEFAULTS}}
    if unknown:
        raise ValueError(f"unknown DMCAC training options {sorted(unknown)}; known: {sorted(OPTION_DEFAULTS)}")
    labels = dataset_labels(context.train_dataset)
    query_idx, database_idx = split_query_database(labels, options["database_fraction"], seed=context.seed)
    source = getattr(context, "train_eval_dataset", None)
    if source is None:
        source = context.train_dataset
        if getattr(source, "transform", None) is not None:
            warnings.warn(
                "DMCAC: no train_eval_dataset in the TrainingContext, so the database is embedded with "
                "the training split's own transform (augmented rows); give the training split with the "
                "evaluation transform as TrainingContext.train_eval_dataset",
                stacklevel=2,
            )
    elif len(source) != len(context.train_dataset):
        raise ValueError(
            f"train_eval_dataset has {len(source)} items, train_dataset {len(context.train_dataset)}: "
            f"they must be the same items in the same order"
        )
    database = torch.utils.data.Subset(source, database_idx.tolist())
    embed = context.embed or make_embed_fn(context.trunk, context.embedder, context.device)
    every_epochs = options["refresh_every_epochs"]
    if every_epochs is not None and (
        isinstance(every_epochs, bool) or not isinstance(every_epochs, int) or every_epochs < 1
    ):
        raise ValueError(f"refresh_every_epochs must be a positive integer, got {every_epochs!r}")
    every_iterations = options["refresh_every_iterations"]
    kind = options["index"]
    if kind is not None and kind not in INDEXES:
        raise ValueError(f"option index must be None or one of {INDEXES}, got {kind!r}")
    index_factory = None if kind is None else (lambda emb: build_faiss_index(emb, kind=kind))
    refresher = DatabaseRefresher(
        loss,
        database,
        embed,
        every_epochs=None if every_iterations else every_epochs,
        every_iterations=every_iterations,
        batch_size=int(options["refresh_batch_size"]),
        num_workers=context.num_workers,
        device=context.device,
        modules=[m for m in (context.trunk, context.embedder) if m is not None],
        index_factory=index_factory,
        progress=context.progress if options["progress"] is None else bool(options["progress"]),
        rank=context.rank,
        world_size=context.world_size,  # under DDP each rank embeds a slice
    )
    queries = MultiViewDataset(
        context.train_dataset, num_views, indices=query_idx, view_transform=options["view_transform"]
    )
    if getattr(loss, "retrieval", None) == "full" and options["database_gradient"]:
        if context.world_size > 1:
            raise ValueError(
                'DMCAC retrieval="full" with the database gradient runs in one process only; under '
                "--distributed set the option database_gradient=False (constant, refreshed rows)"
            )
        modules = [m for m in (context.trunk, context.embedder) if m is not None]

        def encode(x: torch.Tensor) -> torch.Tensor:
            out = context.trunk(x)
            return context.embedder(out) if context.embedder is not None else out

        loss.set_database_encoder(
            DatabaseEncoder(
                database,
                encode,
                modules=modules,
                batch_size=int(options["refresh_batch_size"]),
                device=context.device,
                num_workers=context.num_workers,
                progress=context.progress if options["progress"] is None else bool(options["progress"]),
            )
        )
        # every step embeds the database itself: no refreshes
        return TrainingSetup(train_dataset=queries, collate_fn=multi_view_collate, views_per_sample=num_views)
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
