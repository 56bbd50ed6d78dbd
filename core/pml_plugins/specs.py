"""What the registry knows about a loss, miner or metric: typed, frozen, documented specs.

A plugin describes each thing it registers with a spec::

    register(MyLoss, name="my_loss", spec=pml_plugins.LossSpec(
        summary="One line on what it does", paper="Author et al., Venue 2024",
        tags=("proxy",), loss_optimizer=True, loss_lr=1e-2))

The keyword form of plugin API 1.0 (``register(MyLoss, name="my_loss", summary=..., loss_lr=...)``)
still works: :func:`spec_from_metadata` converts the keywords to the spec. A keyword that is not
a field of the spec is dropped with a ``UserWarning`` that names the plugin, the key and the
closest field ("did you mean ...").

Adding a field is one line plus its docstring in the class below (and, where a wrong type would
only fail later, a check in ``_check``); consumers read ``entry.spec.<field>``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping, Optional, Tuple, Union

__all__ = ["Spec", "LossSpec", "MinerSpec", "MetricSpec", "KINDS", "SPEC_OF_KIND", "spec_from_metadata"]


def _frozen_mapping(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
    return MappingProxyType(dict(value))


def _optional(value: Any, types: tuple, name: str, what: str) -> None:
    # True is an int: a bool is only accepted where bool is one of the types
    if value is not None and ((isinstance(value, bool) and bool not in types) or not isinstance(value, types)):
        raise TypeError(f"{name} must be {what} or None, got {value!r}")


@dataclass(frozen=True)
class Spec:
    """Fields every registered thing has; the base of :class:`LossSpec`, :class:`MinerSpec`, :class:`MetricSpec`."""

    summary: str = ""
    """One line shown by ``pml-plugins list`` / ``info``."""
    paper: str = ""
    """The reference to cite (authors, title, venue, the section or equations implemented)."""
    tags: Tuple[str, ...] = ()
    """Free-form labels (``"proxy"``, ``"pair"``, ``"classification"``, ...); a single str is one tag."""

    #: Old metadata spellings accepted by :func:`spec_from_metadata`: ``{old: field}``.
    ALIASES: ClassVar[Mapping[str, str]] = MappingProxyType({})
    #: Old spellings accepted with a ``DeprecationWarning`` (a subset of :attr:`ALIASES`).
    DEPRECATED_ALIASES: ClassVar[frozenset] = frozenset()

    def __post_init__(self) -> None:
        tags = self.tags
        if isinstance(tags, str):
            tags = (tags,)
        if not all(isinstance(t, str) for t in tags):
            raise TypeError(f"tags must be a tuple of str, got {self.tags!r}")
        object.__setattr__(self, "tags", tuple(tags))
        for name in ("summary", "paper"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {getattr(self, name)!r}")
        self._check()

    def _check(self) -> None:
        """Per-kind checks and normalisation (frozen: assign with ``object.__setattr__``)."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The fields of this spec, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def as_dict(self, *, include_none: bool = False) -> dict[str, Any]:
        """The fields as a plain dict (``None`` values left out unless ``include_none``); not a deep copy."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return out if include_none else {k: v for k, v in out.items() if v is not None}

    def replace(self, **changes: Any) -> Spec:
        """A copy with ``changes`` (the spec is frozen)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class LossSpec(Spec):
    """What a registered loss declares: what the training loop must provide, paper settings, DDP semantics.

    Every field is optional; the defaults describe a loss that needs nothing beyond embeddings
    and labels.
    """

    sampler: Optional[str] = None
    """``"m_per_class"`` when the loss needs batches with several samples per class (the main job then
    uses PML's ``MPerClassSampler``); ``None``: any batch."""
    samples_per_class: Optional[int] = None
    """The m of an m-per-class batch the loss prefers (the main job uses it unless ``--m`` is given and
    falls back to a divisor of the batch size that fits). Old spellings ``m_per_class`` and ``m`` are
    accepted with a ``DeprecationWarning``."""
    multi_view: bool = False
    """The loss expects each sample as consecutive augmented views (B*A rows)."""
    database_refresh: bool = False
    """The loss keeps a database of embeddings that the training loop must refresh."""
    loss_optimizer: Optional[bool] = None
    """The loss owns parameters that need their own optimizer. ``None``: inferred at registration (a
    loss whose constructor takes ``num_classes`` has one), so a registered entry always holds a bool."""
    loss_lr: Optional[float] = None
    """The learning rate for the loss's own parameters (the paper's, when it gives one); the main job
    uses it unless ``--loss-lr`` is given."""
    loss_lr_note: Optional[str] = None
    """Where ``loss_lr`` comes from when the paper gives none, or why it differs (shown by ``pml-plugins info``)."""
    retrieval_distance: str = "cosine"
    """The geometry retrieval should use for embeddings trained with this loss: ``"cosine"`` or ``"euclidean"``."""
    supports_ref_emb: bool = True
    """False when the loss rejects ``ref_emb`` (the drop-in ``CrossBatchMemory`` / ``SelfSupervisedLoss`` of
    :mod:`pml_plugins.wrappers` then refuse it up front)."""
    distributed: Optional[str] = None
    """What happens under DDP, proven by a test for every loss of this repository (see
    :data:`pml_plugins.distributed_losses.DISTRIBUTED_SEMANTICS`): ``"gradient_equivalent"`` (with the core's
    rank-ordered wrapper the gradients equal one process on the global batch), ``"batch_dependent"``
    (ranks stay in sync, the value differs; ``distributed_note`` says how), ``"unsupported"`` (the trainer
    refuses the loss). ``None``: not declared, the loss still runs. Checked when training starts."""
    distributed_note: Optional[str] = None
    """One or two sentences on the loss's distributed semantics (shown by ``pml-plugins info``)."""
    distributed_efficient: bool = False
    """The loss supports PML's efficient mode (``DistributedLossWrapper(efficient=True)``: local embeddings as
    queries, the gathered batch as ``ref_emb``); without it ``--distributed-efficient`` is refused."""
    demo_loss_args: Optional[Mapping[str, Any]] = None
    """Loss arguments ``pml-plugins compare`` uses on its bundled digits data (five training classes) when the
    user gives none for this loss, for a loss whose defaults are meant for 100+ classes; the row is named with
    them, and ``--loss-arg`` / per-loss arguments replace them."""
    demo_pretrain_epochs: Optional[int] = None
    """Epochs of classification pre-training ``pml-plugins compare`` uses on its bundled digits data instead
    of ``pretrain_epochs`` (unless ``--pretrain-epochs`` is given); the row is named with it."""
    origin: Optional[str] = None
    """Where this implementation's settings come from (the paper, the authors' released code, ...), for a
    loss registered in several presets (shown by ``pml-plugins info``)."""
    pretrain_epochs: Optional[int] = None
    """Epochs of classification pre-training the paper runs before the loss (a linear classifier on the
    embeddings trained with cross-entropy, then dropped); the main job runs them unless
    ``--pretrain-epochs`` is given."""
    needs_class_distances: bool = False
    """The loss takes ``class_distances`` (C x C, from another modality): the main job builds them from one
    text per training class with ``class_distances_from_texts`` and passes them to the constructor."""
    class_distances_from_texts: Optional[Callable[..., Any]] = None
    """``fn(texts: list[str]) -> (C, C)`` distances in [0, 1], for ``needs_class_distances``."""
    class_text_model: Optional[str] = None
    """What ``class_distances_from_texts`` embeds texts with (recorded in the run folder)."""
    training_setup: Optional[Callable[..., Any]] = None
    """``training_setup(loss, context) -> TrainingSetup`` for losses that need data handling in the main job
    (see :mod:`pml_plugins.training_protocol`); keyword arguments the constructor does not take become its
    ``context.options``."""
    search_space: Optional[Mapping[str, Any]] = None
    """What ``pml-plugins compare --tune`` searches for this loss: ``{argument: (low, high)}``,
    ``(low, high, "log")``, ``(low, high, "int")`` or ``{"choices": [...]}`` per constructor argument, plus
    ``loss_lr`` for the loss's own parameters (format: :mod:`pml_plugins.search_space`, checked at
    registration; shown by ``pml-plugins info``)."""
    conformance: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    """Options for :func:`pml_plugins.testing.check_loss` when the kit runs on the installed plugin
    (e.g. ``{"num_views": 2}``, ``{"samples_per_class": 2}``)."""
    conformance_factory: Optional[Callable[[int, int], Any]] = None
    """``conformance_factory(num_classes, embedding_size) -> loss``: a small ready-to-use instance for the
    kit and the distributed checks, for losses that need more than constructor arguments."""

    ALIASES: ClassVar[Mapping[str, str]] = MappingProxyType(
        {"m_per_class": "samples_per_class", "m": "samples_per_class"}
    )
    DEPRECATED_ALIASES: ClassVar[frozenset] = frozenset({"m_per_class", "m"})

    def _check(self) -> None:
        if self.sampler is not None and self.sampler != "m_per_class":
            raise ValueError(f"sampler must be 'm_per_class' or None, got {self.sampler!r}")
        spc = self.samples_per_class
        if spc is not None and (isinstance(spc, bool) or not isinstance(spc, int) or spc < 1):
            raise ValueError(f"samples_per_class must be a positive integer or None, got {spc!r}")
        for name in ("multi_view", "database_refresh", "supports_ref_emb", "distributed_efficient"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _optional(self.loss_optimizer, (bool,), "loss_optimizer", "a bool")
        lr = self.loss_lr
        if lr is not None:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
                raise ValueError(f"loss_lr must be a finite number > 0 or None, got {lr!r}")
            object.__setattr__(self, "loss_lr", float(lr))
        if self.retrieval_distance not in ("cosine", "euclidean"):
            raise ValueError(f"retrieval_distance must be 'cosine' or 'euclidean', got {self.retrieval_distance!r}")
        for name in ("loss_lr_note", "distributed", "distributed_note"):
            _optional(getattr(self, name), (str,), name, "a str")
        for name in ("pretrain_epochs", "demo_pretrain_epochs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0 or None, got {value!r}")
        if not isinstance(self.needs_class_distances, bool):
            raise TypeError(f"needs_class_distances must be a bool, got {self.needs_class_distances!r}")
        for name in ("origin", "class_text_model"):
            _optional(getattr(self, name), (str,), name, "a str")
        for name in ("training_setup", "conformance_factory", "class_distances_from_texts"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"{name} must be callable or None, got {getattr(self, name)!r}")
        if self.demo_loss_args is not None:
            object.__setattr__(self, "demo_loss_args", _frozen_mapping(self.demo_loss_args, "demo_loss_args"))
        object.__setattr__(self, "conformance", _frozen_mapping(self.conformance, "conformance"))
        if self.search_space is not None:
            from .search_space import parse_search_space  # imported here: the spec module stays import-light

            parse_search_space(self.search_space)  # a bad range fails at registration, naming the entry
            object.__setattr__(self, "search_space", _frozen_mapping(self.search_space, "search_space"))


@dataclass(frozen=True)
class MinerSpec(Spec):
    """What a registered miner declares (today: the common fields)."""


@dataclass(frozen=True)
class MetricSpec(Spec):
    """What a registered metric declares to :class:`pml_plugins.AccuracyCalculator`."""

    requires_knn: bool = True
    """Run the kNN search and pass its results (``knn_labels``, ``relevance``, ...)."""
    requires_clustering: bool = False
    """Run k-means and pass ``cluster_labels``."""
    k: Optional[Union[int, str]] = None
    """How many neighbours the metric needs (an int, or ``"max_bin_count"``); ``None``: PML's ``k``. The
    single search uses the largest k needed; an invalid value is ignored with a warning by the calculator."""

    def _check(self) -> None:
        for name in ("requires_knn", "requires_clustering"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")


#: The kinds of things a plugin registers, in hook order.
KINDS = ("loss", "miner", "metric")
#: The spec class of each registry kind.
SPEC_OF_KIND: Mapping[str, type] = MappingProxyType({"loss": LossSpec, "miner": MinerSpec, "metric": MetricSpec})


def spec_from_metadata(
    kind: str, metadata: Mapping[str, Any], *, plugin: str = "?", name: str = "?", stacklevel: int = 2
) -> Spec:
    """Convert the keyword metadata of plugin API 1.0 to the spec of ``kind``.

    Fields are taken as they are; an old spelling in ``ALIASES`` is renamed (with a
    ``DeprecationWarning`` for the deprecated ones); any other key is dropped with a ``UserWarning``
    naming ``plugin``, the key and the closest field. ``stacklevel`` is the warnings' (2: the caller).
    """
    cls = SPEC_OF_KIND[kind]
    fields = cls.field_names()
    values: dict[str, Any] = {}
    renamed: dict[str, str] = {}
    for key, value in metadata.items():
        target = key if key in fields else cls.ALIASES.get(key)
        if target is None:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(fields)}"
            warnings.warn(
                f"pml-plugins: plugin {plugin!r} registered the {kind} {name!r} with the unknown "
                f"metadata key {key!r} ({hint}); the key is ignored",
                UserWarning,
                stacklevel=stacklevel,
            )
            continue
        if target in values and values[target] != value:
            raise TypeError(
                f"the {kind} {name!r} of plugin {plugin!r} gives {target} twice with different values "
                f"({renamed.get(target, target)}={values[target]!r}, {key}={value!r})"
            )
        if key in cls.DEPRECATED_ALIASES:
            warnings.warn(
                f"pml-plugins: plugin {plugin!r} registered the {kind} {name!r} with {key}=...; "
                f"the field is {target} ({cls.__name__}.{target})",
                DeprecationWarning,
                stacklevel=stacklevel,
            )
        values[target] = value
        renamed[target] = key
    return cls(**values)
