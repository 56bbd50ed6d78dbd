"""Hook specifications: the whole contract between the core and a plugin.

A plugin is a module (named by an entry point in the ``pml_plugins`` group) that
implements any of these hooks with ``@pml_plugins.hookimpl``::

    import pml_plugins
    from .my_loss import MyLoss

    pml_plugins_api_version = "1.1"

    @pml_plugins.hookimpl
    def register_losses(register):
        register(MyLoss, name="my_loss", aliases=("ml",), spec=pml_plugins.LossSpec(
            summary="One line on what it does", paper="Author et al., Venue 2024",
            tags=("proxy",), loss_optimizer=True, loss_lr=1e-2))

Each hook receives one argument, ``register``, a callable with the signature
``register(obj, name=None, aliases=(), spec=None)`` (see :class:`pml_plugins.registry.Registrar`).
What the registry knows of the entry is its spec, a frozen dataclass documented field by field:
:class:`pml_plugins.LossSpec` (the sampler, multi-view batches, the loss's own optimizer and
learning rate, the retrieval geometry, DDP semantics, a ``training_setup`` for the main job,
options for the conformance kit, ...), :class:`pml_plugins.MinerSpec` and
:class:`pml_plugins.MetricSpec`. Consumers read ``entry.spec.<field>``.

The keyword form of plugin API 1.0, ``register(MyLoss, name="my_loss", summary=..., loss_lr=...)``,
still works: the keywords are converted to the spec; an unknown keyword is dropped with a
``UserWarning`` naming the plugin, the key and the closest field.
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

    ``register(fn, name="my_metric", spec=MetricSpec(...))``: ``fn`` is a function, or a class whose
    instances (made with no arguments) are callable. Every
    ``pml_plugins.AccuracyCalculator()`` then computes it (unless built with
    ``plugin_metrics=False`` or a list of names) and reports it under its registered name,
    which works in ``include=`` / ``exclude=`` like PML's metric names. A name taken by a
    built-in metric (``precision_at_1``, ``ndcg_at_10``, ...) or by another plugin appears
    as ``plugin:name`` instead.

    The calculator calls ``fn(**context)`` once per evaluation (always accept ``**kwargs``)
    with PML's keyword arguments -- ``query``, ``reference``, ``query_labels``,
    ``reference_labels`` (labels keep their integer dtype), ``ref_includes_query``,
    ``label_comparison_fn``, and when the metric needs the kNN: ``knn_labels``,
    ``knn_distances``, ``label_counts``, ``lone_query_labels``, ``not_lone_query_mask`` --
    plus, with the kNN: ``knn_indices`` ``(Q, K)``; ``relevance`` ``(Q, K)`` bool, whether the
    i-th neighbour is relevant to the query (``label_comparison_fn``); ``num_relevant``
    ``(Q,)``, the relevant references of each query (the query itself not counted);
    ``query_label_ids`` ``(Q,)``, each query's row in ``label_counts[0]``; ``k``, the k of
    PML's metrics; and ``cluster_labels`` when it needs clustering. All tensors are on the
    calculator's device, the query's own match already removed from the neighbours, and
    ``K`` is at least the ``k`` the metric declared (capped at the number of references). Keep it
    vectorised (no loop over queries).

    ``fn`` returns either the final value (a float, or anything JSON-friendly), or a 1-D
    tensor of one score per query: the calculator then averages it over the queries that
    are not lone (with the kNN) and not NaN, per class first with ``avg_of_avgs``, or
    per class with ``return_per_class``, exactly as it does its own metrics.

    What the calculator reads of the registration is its :class:`pml_plugins.MetricSpec`
    (``requires_knn``, ``requires_clustering``, ``k``).

    Example::

        @pml_plugins.hookimpl
        def register_metrics(register):
            def precision_at_5(relevance, **kwargs):
                return relevance[:, :5].sum(1).double() / 5
            register(precision_at_5, name="precision_at_5", spec=pml_plugins.MetricSpec(k=5, summary="P@5"))
    """
