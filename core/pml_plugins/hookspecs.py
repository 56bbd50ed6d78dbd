"""Hook specifications: the whole contract between the core and a plugin.

A plugin is a module (named by an entry point in the ``pml_plugins`` group) that
implements any of these hooks with ``@pml_plugins.hookimpl``::

    import pml_plugins
    from .my_loss import MyLoss

    @pml_plugins.hookimpl
    def register_losses(register):
        register(MyLoss, name="my_loss", aliases=("ml",),
                 summary="One line on what it does", paper="Author et al., Venue 2024",
                 tags=("proxy",), loss_optimizer=True)

Each hook receives one argument, ``register``, a callable with the signature
``register(obj, name=None, aliases=(), **metadata)`` (see :class:`pml_plugins.registry.Registrar`).
Known metadata keys, all optional:

``summary`` (str)
    One line shown by ``pml-plugins list`` / ``info``.
``paper`` (str)
    The reference to cite.
``tags`` (tuple of str)
    Free-form labels ("proxy", "pair", "classification", ...).
``sampler`` (str or None)
    ``"m_per_class"`` when the loss needs batches with several samples per class.
``multi_view`` (bool)
    The loss expects each sample as consecutive augmented views (B*A rows).
``database_refresh`` (bool)
    The loss keeps a database of embeddings that the training loop must refresh.
``loss_optimizer`` (bool)
    The loss owns parameters that need their own optimizer (inferred when absent).
``loss_lr`` (float)
    The learning rate the paper uses for those parameters.
``retrieval_distance`` (``"cosine"`` or ``"euclidean"``)
    Which geometry retrieval should use for embeddings trained with this loss.

Anything else is stored as-is and shown by ``pml-plugins info``.
"""
from __future__ import annotations

import pluggy

PROJECT_NAME = "pml_plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_losses(register):  # type: ignore[empty-body]
    """Register loss classes, each a subclass of PML's ``BaseMetricLossFunction``."""


@hookspec
def register_miners(register):  # type: ignore[empty-body]
    """Register miner classes, each a subclass of PML's ``BaseMiner``."""


@hookspec
def register_metrics(register):  # type: ignore[empty-body]
    """Register retrieval metrics for :class:`pml_plugins.AccuracyCalculator`.

    A metric is a callable ``fn(knn_labels, query_labels, **context) -> float``; see
    :mod:`pml_plugins.metrics` for the context it receives and the metadata it may declare.
    """
