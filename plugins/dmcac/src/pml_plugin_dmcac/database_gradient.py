"""Full retrieval with a gradient into the encoder through every database row (section 3.4, eq. 6).

The paper: "in this approach we receive a full gradient signal from the database to the
encoder". That needs the database embedded by the current encoder *inside* the step's graph.
Keeping the activations of all D database images for backward does not fit in memory at the
paper's sizes (hundreds of 224 x 224 ViT passes), so :class:`DatabaseEncoder` computes the same
gradient in two passes, the way activation checkpointing does:

1. forward: embed the database in chunks without a graph (eval mode) and hand the (D, F) rows to
   the loss as a tensor that requires grad;
2. backward: autograd hands back dL/dZ_D; each chunk is embedded again, now with a graph, and
   ``torch.autograd.backward(rows_chunk, dL/dZ_D[chunk])`` adds its share to the encoder's
   ``.grad``. The chunk's activations are freed before the next chunk.

The result equals backpropagating through one big forward pass (a test checks this in
float64), at the cost of two forward passes and one backward pass over the database per step,
and memory of the database inputs (kept from pass 1), the (D, F) rows and their gradient, plus
one chunk's activations. Both passes run the encoder in eval mode (no dropout, batch-norm
running statistics), so they compute the same rows.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from tqdm.auto import tqdm


class _DatabaseRows(torch.autograd.Function):
    """Rows from ``encoder`` in forward; the encoder's own two-pass backward in backward."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, encoder: DatabaseEncoder) -> torch.Tensor:
        ctx.encoder = encoder
        return encoder.embed_without_graph()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.encoder.backward_through_encoder(grad)
        return None, None


class DatabaseEncoder:
    """Embeds a database with gradient for ``DMCACLoss(retrieval="full")``, chunk by chunk.

    Args:
        dataset: the database split, single-view ``(input, label)`` items with the evaluation
            transform (deterministic, so both passes see the same inputs).
        encode: ``encode(x) -> embeddings`` *with* autograd (e.g. ``embedder(trunk(x))``).
        modules: the models inside ``encode``; they are put in eval mode for both passes and
            their train/eval flags restored after each.
        batch_size: images per chunk (bounds the activation memory of the backward pass).
        device: where inputs go.
        num_workers: DataLoader workers of the forward pass.
        progress: show a tqdm bar over the chunks.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        encode: Callable[[torch.Tensor], torch.Tensor],
        modules: Iterable[torch.nn.Module] = (),
        batch_size: int = 256,
        device: Optional[torch.device] = None,
        num_workers: int = 0,
        progress: bool = False,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if len(dataset) == 0:
            raise ValueError("the database is empty: full retrieval needs at least one database row")
        self.dataset, self.encode, self.modules = dataset, encode, list(modules)
        self.batch_size, self.device, self.num_workers, self.progress = batch_size, device, int(num_workers), progress
        self._inputs: list[torch.Tensor] = []
        self.labels: Optional[torch.Tensor] = None
        self.num_passes = 0  # forward passes over the database (one per training step)

    def __len__(self) -> int:
        return len(self.dataset)

    def rows(self) -> torch.Tensor:
        """(D, F) database rows of the current encoder, differentiable w.r.t. its parameters."""
        anchor = torch.zeros((), requires_grad=True)  # makes autograd call _DatabaseRows.backward
        return _DatabaseRows.apply(anchor, self)

    # -- the two passes -------------------------------------------------------------------------
    def _eval_mode(self) -> list[bool]:
        flags = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()
        return flags

    def _restore(self, flags: list[bool]) -> None:
        for m, flag in zip(self.modules, flags):
            m.train(flag)

    def embed_without_graph(self) -> torch.Tensor:
        """Pass 1: every database row, no graph; keeps the inputs for pass 2."""
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )
        self._inputs, chunks, labels = [], [], []
        flags = self._eval_mode()
        try:
            with torch.no_grad():
                for x, y in tqdm(
                    loader, desc="DMCAC database (full retrieval)", leave=False, disable=None if self.progress else True
                ):
                    self._inputs.append(x)
                    chunks.append(self.encode(x.to(self.device) if self.device is not None else x))
                    labels.append(torch.as_tensor(y))
        finally:
            self._restore(flags)
        self.labels = torch.cat(labels).long()
        self.num_passes += 1
        return torch.cat(chunks)

    def backward_through_encoder(self, grad: torch.Tensor) -> None:
        """Pass 2: re-embed chunk by chunk with a graph and backpropagate ``grad`` (dL/dZ_D)."""
        if not self._inputs:
            raise RuntimeError("DatabaseEncoder: backward without a forward pass (or a second backward)")
        flags = self._eval_mode()
        try:
            start = 0
            with torch.enable_grad():
                for x in self._inputs:
                    stop = start + len(x)
                    out = self.encode(x.to(self.device) if self.device is not None else x)
                    torch.autograd.backward(out, grad[start:stop].to(out.dtype))
                    start = stop
        finally:
            self._restore(flags)
            self._inputs = []  # one backward per forward, as autograd's own graphs
