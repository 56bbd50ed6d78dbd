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
``supports_ref_emb`` (bool)
    Set False when the loss rejects ``ref_emb`` (the drop-in ``CrossBatchMemory`` /
    ``SelfSupervisedLoss`` of :mod:`pml_plugins.wrappers` then refuse it up front).
``distributed`` (str)
    What happens under DDP (``pml-plugins train --distributed``, see
    :mod:`pml_plugins.distributed`), a test proves it for every plugin loss of this repository:

    * ``"gradient_equivalent"``: with the core's rank-ordered ``DistributedLossWrapper``
      (``efficient=False``) and :func:`pml_plugins.distributed.average_loss_gradients`, the
      gradients on every rank (model after DDP's averaging, the loss's own parameters) equal
      the single-process gradients on the gathered global batch; ranks stay identical.
    * ``"batch_dependent"``: runs distributed and ranks stay in sync, but the value differs from
      a single process on the global batch; ``distributed_note`` must say how.
    * ``"unsupported"``: the trainer refuses the loss with an error naming it (give the reason
      in ``distributed_note``).

    Absent: the loss still runs, reported as "not declared".
``distributed_note`` (str)
    One or two sentences on the loss's distributed semantics (shown by ``pml-plugins info``).
``distributed_efficient`` (bool, default False)
    The loss supports PML's efficient mode (``DistributedLossWrapper(efficient=True)``: local
    embeddings as queries, the gathered batch as ``ref_emb``). Without it,
    ``--distributed-efficient`` is refused with an error naming the loss.
``demo_loss_args`` (dict)
    Loss arguments ``pml-plugins compare`` uses on its bundled digits data (``digits``,
    ``digits:raw``: five training classes) when the user gives none for this loss, for a loss
    whose defaults are meant for 100+ training classes and overfit five. The row is named with
    them (``group_loss (ce_weight=0)``); ``--loss-arg``/per-loss arguments replace them.
``search_space`` (dict)
    What ``pml-plugins compare --tune`` searches: ``{argument: (low, high[, "log"][, "int"])}`` or
    ``{"choices": [...]}`` per constructor argument, plus ``loss_lr`` for the loss's own parameters
    (format: :mod:`pml_plugins.search_space`; shown by ``pml-plugins info``).
``training_setup`` (callable)
    ``training_setup(loss, context) -> TrainingSetup`` for losses that need data handling
    in the main job (see :mod:`pml_plugins.training`).
``conformance`` (dict)
    Options for :func:`pml_plugins.testing.check_loss` when the kit runs on the installed
    plugin (e.g. ``{"num_views": 2}``, ``{"samples_per_class": 2}``).
``conformance_factory`` (callable)
    ``conformance_factory(num_classes, embedding_size) -> loss``: a small ready-to-use instance
    for the kit, for losses that need more than constructor arguments (e.g. a database).

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

    ``register(fn, name="my_metric", **metadata)``: ``fn`` is a function, or a class whose
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
    ``K`` is at least the ``k`` the metric declared (capped at the number of references). Keep it vectorised (no loop over queries).

    ``fn`` returns either the final value (a float, or anything JSON-friendly), or a 1-D
    tensor of one score per query: the calculator then averages it over the queries that
    are not lone (with the kNN) and not NaN, per class first with ``avg_of_avgs``, or
    per class with ``return_per_class``, exactly as it does its own metrics.

    Metadata the calculator reads (besides ``summary``/``paper``/``tags``):

    ``requires_knn`` (bool, default True)
        Run the kNN search and pass its results.
    ``requires_clustering`` (bool, default False)
        Run k-means and pass ``cluster_labels``.
    ``k`` (int or ``"max_bin_count"``, default: PML's ``k``)
        How many neighbours the metric needs; the single search uses the largest k needed.

    Example::

        @pml_plugins.hookimpl
        def register_metrics(register):
            def precision_at_5(relevance, **kwargs):
                return relevance[:, :5].sum(1).double() / 5
            register(precision_at_5, name="precision_at_5", k=5, summary="P@5")
    """
