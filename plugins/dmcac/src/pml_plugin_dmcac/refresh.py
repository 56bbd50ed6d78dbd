"""Re-embed the training database with the current model and hand it to the loss (section 3.4)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from tqdm.auto import tqdm

from pml_plugins.distributed_losses import gather_in_rank_order, is_distributed
from pml_plugins.validation import check_positive_int


def make_embed_fn(
    trunk: torch.nn.Module, embedder: Optional[torch.nn.Module] = None, device: Optional[torch.device] = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``embed(x)``: trunk (+ embedder) in eval mode, without grad; restores the train flags."""

    def embed(x: torch.Tensor) -> torch.Tensor:
        modules = [m for m in (trunk, embedder) if m is not None]
        flags = [m.training for m in modules]
        try:
            for m in modules:
                m.eval()
            with torch.no_grad():
                out = trunk(x.to(device) if device is not None else x)
                return embedder(out) if embedder is not None else out
        finally:
            for m, flag in zip(modules, flags):
                m.train(flag)

    return embed


class DatabaseRefresher:
    """Embeds the database split with the current model every N epochs (or iterations) and calls
    ``loss.set_database``. Use it as PML trainer ``end_of_epoch_hook`` / ``end_of_iteration_hook``
    (it returns None, so it never stops training) and call :meth:`refresh` once before training.

    Args:
        loss: the DMCACLoss (anything with ``set_database(embeddings, labels)``).
        dataset: the database split: single-view ``(input, label)`` items (no augmentation).
        embed: ``embed(batch) -> embeddings`` in eval mode without grad (e.g. the main job's
            ``TrainingContext.embed`` or :func:`make_embed_fn`).
        every_epochs: refresh at the end of every N-th epoch (None: never at epoch ends).
        every_iterations: refresh after every N-th iteration (None: never at iteration ends).
        batch_size, num_workers, device: how the database is batched and where inputs go.
        modules: models whose train/eval flags are restored after a refresh (belt and braces
            around an ``embed`` that does not restore them itself).
        index_factory: optional ``index_factory(embeddings) -> index`` (e.g. a FAISS IVF index)
            passed to ``set_database`` with the new embeddings.
        progress: show a tqdm bar.
        rank, world_size: under DDP (``world_size > 1`` with ``torch.distributed`` initialised),
            each rank embeds one contiguous slice of the database and the slices are
            all-gathered in rank order, so every rank holds the same full database for 1 /
            world_size of the embedding work. The model copies are identical on every rank, so
            this equals one process embedding it all (up to float rounding of batch sizes).
    """

    def __init__(
        self,
        loss: Any,
        dataset: torch.utils.data.Dataset,
        embed: Callable[[torch.Tensor], torch.Tensor],
        every_epochs: Optional[int] = 1,
        every_iterations: Optional[int] = None,
        batch_size: int = 256,
        num_workers: int = 0,
        device: Optional[torch.device] = None,
        modules: Iterable[torch.nn.Module] = (),
        index_factory: Optional[Callable[[torch.Tensor], Any]] = None,
        progress: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        check_positive_int("every_epochs", every_epochs, allow_none=True)
        check_positive_int("every_iterations", every_iterations, allow_none=True)
        self.loss, self.dataset, self.embed = loss, dataset, embed
        self.every_epochs, self.every_iterations = every_epochs, every_iterations
        self.batch_size, self.num_workers, self.device = int(batch_size), int(num_workers), device
        self.modules, self.index_factory, self.progress = list(modules), index_factory, progress
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(
                f"rank and world_size must satisfy 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}"
            )
        self.rank, self.world_size = rank, world_size
        self.num_refreshes = 0
        self._epochs = 0
        self._iterations = 0

    def refresh(self) -> None:
        """Embed every database item (eval mode, no grad, batched) and call ``set_database``."""
        sharded = self.world_size > 1 and is_distributed()
        if sharded and len(self.dataset) < self.world_size:
            raise ValueError(
                f"the database has {len(self.dataset)} rows, fewer than the {self.world_size} processes "
                f"that share its refresh"
            )
        bounds = _shard_bounds(len(self.dataset), self.world_size if sharded else 1)
        start, stop = bounds[self.rank if sharded else 0]
        embeddings, labels = self._embed(torch.utils.data.Subset(self.dataset, range(start, stop)))
        if sharded:  # the collective runs where the embeddings are (CUDA under nccl, CPU under gloo)
            embeddings, labels = _gather_shards(embeddings, labels, bounds)
        index = self.index_factory(embeddings) if self.index_factory is not None else None
        if index is not None:
            self.loss.set_database(embeddings, labels, index=index)
        else:
            self.loss.set_database(embeddings, labels)
        self.num_refreshes += 1

    def _embed(self, dataset: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        flags = [m.training for m in self.modules]
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )
        chunks, labels = [], []
        try:
            with torch.no_grad():
                for batch in tqdm(
                    loader, desc="DMCAC database refresh", disable=None if self.progress else True, leave=False
                ):
                    x, y = batch[0], batch[1]
                    if self.device is not None:
                        x = x.to(self.device)
                    chunks.append(self.embed(x).detach())
                    labels.append(torch.as_tensor(y))
        finally:
            for m, flag in zip(self.modules, flags):
                m.train(flag)
        return torch.cat(chunks), torch.cat(labels).long()

    def state_dict(self) -> dict:
        """The refresh counters and the loss's current database (tensors and ints only), for a
        training checkpoint; a FAISS index is not saved but rebuilt by :meth:`load_state_dict`."""
        db = getattr(self.loss, "db_embeddings", None)
        labels = getattr(self.loss, "db_labels", None)
        return {
            "num_refreshes": self.num_refreshes,
            "epochs": self._epochs,
            "iterations": self._iterations,
            "db_embeddings": db.detach().cpu() if db is not None else None,
            "db_labels": labels.detach().cpu() if labels is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`: the counters, and the database handed back to the loss."""
        self.num_refreshes = int(state["num_refreshes"])
        self._epochs, self._iterations = int(state["epochs"]), int(state["iterations"])
        db, labels = state.get("db_embeddings"), state.get("db_labels")
        if db is not None and labels is not None and len(db) > 0:
            index = self.index_factory(db) if self.index_factory is not None else None
            if index is not None:
                self.loss.set_database(db, labels, index=index)
            else:
                self.loss.set_database(db, labels)
            if isinstance(getattr(self.loss, "db_embeddings", None), torch.Tensor):
                # the saved rows are already normalised; normalising again can move the last bit
                self.loss.db_embeddings = db.to(self.loss.db_embeddings.device)

    def end_of_epoch_hook(self, trainer: Any = None) -> None:
        """PML ``end_of_epoch_hook``: refresh after every ``every_epochs``-th epoch."""
        self._epochs += 1
        if self.every_epochs is not None and self._epochs % self.every_epochs == 0:
            self.refresh()

    __call__ = end_of_epoch_hook  # the refresher itself works as PML's end_of_epoch_hook

    def end_of_iteration_hook(self, trainer: Any = None) -> None:
        """PML ``end_of_iteration_hook``: refresh after every ``every_iterations``-th iteration."""
        self._iterations += 1
        if self.every_iterations is not None and self._iterations % self.every_iterations == 0:
            self.refresh()


def _shard_bounds(n: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` slices of ``range(n)``, one per rank, sizes differing by at most 1."""
    base, extra = divmod(n, world_size)
    bounds, start = [], 0
    for r in range(world_size):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _gather_shards(
    embeddings: torch.Tensor, labels: torch.Tensor, bounds: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's slice, padded to the longest, gathered in rank order; the padding dropped."""
    device = embeddings.device
    longest = max(stop - start for start, stop in bounds)
    pad = longest - len(embeddings)
    gathered = gather_in_rank_order(torch.nn.functional.pad(embeddings.float(), (0, 0, 0, pad)))
    gathered_labels = gather_in_rank_order(torch.nn.functional.pad(labels.to(device), (0, pad)))
    keep = torch.cat(
        [torch.arange(r * longest, r * longest + stop - start, device=device) for r, (start, stop) in enumerate(bounds)]
    )
    return gathered[keep], gathered_labels[keep]
