"""Plugin discovery and the name registry for losses, miners and metrics.

Discovery iterates the ``pml_plugins`` entry-point group itself (instead of pluggy's
``load_setuptools_entrypoints``, which stops at the first plugin that fails to import and
silently drops a duplicate entry-point name), so one broken plugin is recorded and skipped
while every other plugin still loads.

One cohesive thing, kept in one module on purpose: the :class:`Registry` (discovery, error
isolation, lookup, building), the :class:`Registrar` its hooks call, and the module-level
functions that front the process-wide instance. What it reads of the environment and of the
installed distributions is in :mod:`pml_plugins.discovery`; name spelling in
:mod:`pml_plugins.names`; the argument rules in :mod:`pml_plugins.arguments`; what an entry
declares in :mod:`pml_plugins.specs`.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import os
import threading
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional

import pluggy

from . import hookspecs
from .arguments import describe_signature, resolve_arguments, signature_parameters
from .discovery import (
    BUILTIN_PLUGIN,
    ENTRY_POINT_GROUP,
    ENV_ALLOW,
    ENV_BLOCK,
    ENV_DISABLE_AUTOLOAD,
    PLUGIN_API_VERSION,
    PluginRecord,
    api_version_supported,
    core_requirement,
    dist_version,
    entry_points,
    split_env_list,
)
from .names import normalize_name, snake_case
from .specs import KINDS, SPEC_OF_KIND, LossSpec, Spec, spec_from_metadata

# names other modules and users import from here (they moved to leaf modules)
__all__ = [
    "BUILTIN_PLUGIN",
    "ENTRY_POINT_GROUP",
    "ENV_ALLOW",
    "ENV_BLOCK",
    "ENV_DISABLE_AUTOLOAD",
    "KINDS",
    "PLUGIN_API_VERSION",
    "PluginRecord",
    "api_version_supported",
    "describe_signature",
    "normalize_name",
    "snake_case",
    "PluginError",
    "UnknownNameError",
    "AmbiguousNameError",
    "RegistrationError",
    "Entry",
    "BuildResult",
    "Registrar",
    "Registry",
    "registry",
    "load_plugins",
    "register_plugin",
    "unregister_plugin",
    "plugin_info",
    "list_losses",
    "list_miners",
    "list_metrics",
    "get_loss",
    "get_miner",
    "get_metric",
    "get_entry",
    "create_loss",
    "create_miner",
    "create_metric",
]

_HOOK_OF_KIND = {"loss": "register_losses", "miner": "register_miners", "metric": "register_metrics"}


class PluginError(Exception):
    """Base class of the registry's errors."""


class UnknownNameError(PluginError, KeyError, ValueError):
    """No loss / miner / metric is registered under this name."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class AmbiguousNameError(PluginError, LookupError, ValueError):
    """Several plugins registered the same short name; use ``plugin:name``."""


class RegistrationError(PluginError, TypeError):
    """A plugin tried to register something invalid."""


@dataclass(frozen=True)
class Entry:
    """One registered loss, miner or metric: its object, who registered it, and its :class:`~pml_plugins.specs.Spec`."""

    kind: str
    name: str
    obj: Any
    plugin: str
    distribution: str | None = None
    version: str | None = None
    aliases: tuple[str, ...] = ()
    #: What the plugin declared: a :class:`~pml_plugins.LossSpec`, :class:`~pml_plugins.MinerSpec` or
    #: :class:`~pml_plugins.MetricSpec` (the defaults when it declared nothing).
    spec: Spec = field(default_factory=Spec)

    @property
    def qualified_name(self) -> str:
        return f"{self.plugin}:{self.name}"

    @property
    def metadata(self) -> Mapping[str, Any]:
        """Deprecated (plugin API 1.1): read ``entry.spec.<field>``. A read-only view of the spec's fields."""
        warnings.warn(
            "Entry.metadata is deprecated; read entry.spec.<field> (pml_plugins.LossSpec / MinerSpec / MetricSpec)",
            DeprecationWarning,
            stacklevel=2,
        )
        return MappingProxyType(self.spec.as_dict())

    @property
    def requires_optimizer(self) -> bool:
        """Whether the loss owns parameters that need their own optimizer."""
        return bool(getattr(self.spec, "loss_optimizer", False))

    def needs(self) -> dict[str, Any]:
        """What a training loop must provide for this entry (a summary of the loss's spec)."""
        spec = self.spec if isinstance(self.spec, LossSpec) else LossSpec()
        return {
            "sampler": spec.sampler,
            "multi_view": spec.multi_view,
            "database_refresh": spec.database_refresh,
            "loss_optimizer": self.requires_optimizer if self.kind == "loss" else False,
            "loss_lr": spec.loss_lr,
            "retrieval_distance": spec.retrieval_distance,
        }


@dataclass(frozen=True)
class BuildResult:
    """What :meth:`Registry.build` made: the object, its entry, the arguments it got, the options left."""

    obj: Any
    entry: Entry
    #: the keyword arguments the constructor was called with
    arguments: dict
    #: arguments the constructor does not take, kept for the loss's ``training_setup`` (``with_options``)
    options: dict


def _base_class_for(kind: str) -> type | None:
    if kind == "loss":
        from pytorch_metric_learning.losses import BaseMetricLossFunction

        return BaseMetricLossFunction
    if kind == "miner":
        from pytorch_metric_learning.miners import BaseMiner

        return BaseMiner
    return None


class Registrar:
    """The ``register`` callable handed to a plugin's hooks.

    ``register(obj, name=None, aliases=(), spec=None, **metadata)``: ``obj`` is a loss class, a
    miner class or a metric callable; ``name`` defaults to the snake-cased class name without the
    ``Loss``/``Miner`` suffix; ``spec`` is a :class:`~pml_plugins.LossSpec` (miners:
    ``MinerSpec``, metrics: ``MetricSpec``). Keyword ``metadata`` (plugin API 1.0) is converted
    to the spec instead (:func:`~pml_plugins.specs.spec_from_metadata`): an unknown key is dropped
    with a ``UserWarning``. Registrations are staged and committed only when the hook returns
    without error.
    """

    def __init__(self, registry: Registry, plugin: PluginRecord, kind: str):
        self._registry = registry
        self._plugin = plugin
        self._kind = kind
        self.staged: list[Entry] = []

    def __call__(
        self, obj: Any, name: str | None = None, aliases: Iterable[str] = (), spec: Spec | None = None, **metadata: Any
    ) -> Any:
        kind = self._kind
        base = _base_class_for(kind)
        if base is not None:
            if not (inspect.isclass(obj) and issubclass(obj, base)):
                raise RegistrationError(
                    f"plugin {self._plugin.name!r} registered {obj!r} as a {kind}, but a {kind} "
                    f"must be a subclass of pytorch_metric_learning's {base.__name__}"
                )
        elif not callable(obj):
            raise RegistrationError(
                f"plugin {self._plugin.name!r} registered {obj!r} as a metric, but it is not callable"
            )
        if name is None:
            suffix = {"loss": "Loss", "miner": "Miner"}.get(kind, "")
            name = snake_case(getattr(obj, "__name__", ""), suffix)
        if isinstance(aliases, str):
            aliases = (aliases,)
        name = normalize_name(name)
        if ":" in name:
            raise RegistrationError(f"{kind} name {name!r} must not contain ':' (reserved for plugin:name)")
        alias_names = tuple(dict.fromkeys(normalize_name(a) for a in aliases if normalize_name(a) != name))
        spec = self._spec(obj, name, spec, metadata)
        entry = Entry(
            kind=kind,
            name=name,
            obj=obj,
            plugin=self._plugin.name,
            distribution=self._plugin.distribution,
            version=self._plugin.version,
            aliases=alias_names,
            spec=spec,
        )
        for existing in self.staged + self._registry._entries_of_plugin(self._plugin.name, kind):
            taken = {existing.name, *existing.aliases}
            if taken & {name, *alias_names}:
                raise RegistrationError(
                    f"plugin {self._plugin.name!r} registered the {kind} name(s) "
                    f"{sorted(taken & {name, *alias_names})} twice"
                )
        self.staged.append(entry)
        return obj

    def _spec(self, obj: Any, name: str, spec: Spec | None, metadata: Mapping[str, Any]) -> Spec:
        kind, cls = self._kind, SPEC_OF_KIND[self._kind]
        if spec is not None and metadata:
            raise RegistrationError(
                f"plugin {self._plugin.name!r} registered the {kind} {name!r} with spec= and "
                f"metadata keywords {sorted(metadata)}; put them all in the spec"
            )
        if spec is None:
            try:
                spec = spec_from_metadata(kind, metadata, plugin=self._plugin.name, name=name, stacklevel=4)
            except (TypeError, ValueError) as exc:
                raise RegistrationError(f"plugin {self._plugin.name!r} registered the {kind} {name!r}: {exc}") from exc
        elif type(spec) is not cls:
            raise RegistrationError(
                f"plugin {self._plugin.name!r} registered the {kind} {name!r} with a "
                f"{type(spec).__name__}; a {kind} takes a pml_plugins.{cls.__name__}"
            )
        if isinstance(spec, LossSpec) and spec.loss_optimizer is None:
            # a loss whose constructor takes num_classes owns class weights / proxies
            spec = spec.replace(loss_optimizer="num_classes" in signature_parameters(obj))
        return spec


class Registry:
    """Plugins, and the losses / miners / metrics they registered, looked up by name."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.reset()

    # -- state ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every plugin and registration; the next lookup discovers them again."""
        with getattr(self, "_lock", threading.RLock()):
            self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
            self.pm.add_hookspecs(hookspecs)
            self.plugins: dict[str, PluginRecord] = {}
            self._entries: dict[str, list[Entry]] = {k: [] for k in KINDS}
            self._loaded = False
            self._warned: set[str] = set()

    def _entries_of_plugin(self, plugin: str, kind: str) -> list[Entry]:
        return [e for e in self._entries[kind] if e.plugin == plugin]

    # -- discovery -----------------------------------------------------------------------
    def load_plugins(
        self,
        allow: Iterable[str] | None = None,
        block: Iterable[str] | None = None,
        *,
        autoload: bool | None = None,
    ) -> list[dict[str, Any]]:
        """Discover plugins through the ``pml_plugins`` entry-point group.

        Args:
            allow: if given, only these plugin names load (overrides ``PML_PLUGINS_ALLOW``).
                With autoload disabled, the allowed plugins still load, like pytest's ``-p``.
            block: plugin names never to load (overrides ``PML_PLUGINS_BLOCK``); ``builtin``
                blocks PML's own losses and miners.
            autoload: load entry points at all (default: unless ``PML_PLUGINS_DISABLE_AUTOLOAD``
                is set to a non-empty value).
        Returns:
            :meth:`plugin_info` after loading.
        """
        with self._lock:
            allow_set = (
                {normalize_name(a) for a in allow} if allow is not None else split_env_list(os.environ.get(ENV_ALLOW))
            )
            block_set = (
                {normalize_name(b) for b in block}
                if block is not None
                else (split_env_list(os.environ.get(ENV_BLOCK)) or set())
            )
            if autoload is None:
                autoload = not os.environ.get(ENV_DISABLE_AUTOLOAD)
            self._loaded = True
            if BUILTIN_PLUGIN not in block_set and BUILTIN_PLUGIN not in self.plugins:
                from . import builtin

                self._add_plugin(
                    builtin,
                    PluginRecord(
                        name=BUILTIN_PLUGIN,
                        distribution="pml-plugins",
                        version=dist_version("pml-plugins"),
                        module=builtin.__name__,
                    ),
                )
            for ep in entry_points():
                name = normalize_name(ep.name)
                if name in block_set or name == BUILTIN_PLUGIN:
                    continue
                if allow_set is not None and name not in allow_set:
                    continue
                if not autoload and allow_set is None:
                    continue
                dist = getattr(ep, "dist", None)
                dist_name = dist.metadata["Name"] if dist is not None else None
                ep_version = dist.version if dist is not None else None
                plugin_name = name
                if plugin_name in self.plugins:
                    if (
                        self.plugins[plugin_name].distribution == dist_name
                        and self.plugins[plugin_name].module == ep.value
                    ):
                        continue  # the same entry point seen twice (e.g. loaded already)
                    # two distributions use the same entry-point name: keep both, qualified
                    plugin_name = f"{name}@{normalize_name(dist_name or 'unknown')}"
                    if plugin_name in self.plugins:
                        continue
                record = PluginRecord(
                    name=plugin_name,
                    distribution=dist_name,
                    version=ep_version,
                    module=ep.value,
                    requires_core=core_requirement(dist),
                )
                try:
                    obj = ep.load()
                except Exception as exc:  # a broken plugin must not break the host
                    self._record_error(record, f"import failed: {type(exc).__name__}: {exc}")
                    self.plugins[plugin_name] = record
                    continue
                self._add_plugin(obj, record)
            return self.plugin_info()

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.load_plugins()

    def register_plugin(self, plugin: Any, name: str | None = None) -> str:
        """Register a module or object holding hook implementations, in-process.

        For notebooks and tests: no packaging or entry point needed. Returns the plugin name.
        """
        with self._lock:
            self._ensure_loaded()
            if name is None:
                name = getattr(plugin, "__name__", None) or type(plugin).__name__
            name = normalize_name(name)
            if name in self.plugins:
                raise PluginError(
                    f"a plugin named {name!r} is already registered; pass name=... or unregister it first"
                )
            record = PluginRecord(name=name, module=getattr(plugin, "__name__", type(plugin).__name__))
            self._add_plugin(plugin, record)
            if record.errors and not record.loaded:
                raise PluginError(f"plugin {name!r} could not be registered: {'; '.join(record.errors)}")
            return name

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin and everything it registered."""
        with self._lock:
            name = normalize_name(name)
            if name not in self.plugins:
                raise UnknownNameError(f"no plugin named {name!r}; plugins: {sorted(self.plugins)}")
            obj = self.pm.get_plugin(name)
            if obj is not None:
                self.pm.unregister(obj, name=name)
            del self.plugins[name]
            for kind in KINDS:
                self._entries[kind] = [e for e in self._entries[kind] if e.plugin != name]

    def _add_plugin(self, obj: Any, record: PluginRecord) -> None:
        self.plugins[record.name] = record
        api = getattr(obj, "pml_plugins_api_version", None)
        record.api_version = api
        if api is not None and not api_version_supported(api):
            self._record_error(
                record,
                f"plugin API version {api} is not supported by pml-plugins "
                f"{dist_version('pml-plugins')} (API version {PLUGIN_API_VERSION}); "
                f"install a release of {record.distribution or record.name} built for API {PLUGIN_API_VERSION}",
            )
            return
        try:
            self.pm.register(obj, name=record.name)
        except Exception as exc:
            self._record_error(record, f"registration failed: {type(exc).__name__}: {exc}")
            return
        record.loaded = True
        for kind in KINDS:
            hook = getattr(self.pm.hook, _HOOK_OF_KIND[kind])
            for impl in hook.get_hookimpls():
                if impl.plugin_name != record.name:
                    continue
                registrar = Registrar(self, record, kind)
                try:
                    impl.function(register=registrar)
                except Exception as exc:
                    self._record_error(record, f"{_HOOK_OF_KIND[kind]} failed: {type(exc).__name__}: {exc}")
                    continue
                self._entries[kind].extend(registrar.staged)
                record.registered[kind].extend(e.name for e in registrar.staged)

    def _record_error(self, record: PluginRecord, message: str) -> None:
        record.errors.append(message)
        key = f"{record.name}: {message}"
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"pml-plugins: plugin {record.name!r} skipped: {message}", RuntimeWarning, stacklevel=3)

    # -- lookup --------------------------------------------------------------------------
    def entries(self, kind: str) -> list[Entry]:
        self._check_kind(kind)
        self._ensure_loaded()
        return list(self._entries[kind])

    def names(self, kind: str, pattern: str | None = None) -> list[str]:
        """Short names, or ``plugin:name`` where a short name is ambiguous; sorted."""
        result = []
        entries = self.entries(kind)
        counts: dict[str, int] = {}
        for e in entries:
            counts[e.name] = counts.get(e.name, 0) + 1
        for e in entries:
            result.append(e.qualified_name if counts[e.name] > 1 else e.name)
        if pattern is not None:
            pat = normalize_name(pattern)
            result = [n for n in result if fnmatch.fnmatch(n, pat) or fnmatch.fnmatch(n.split(":")[-1], pat)]
        return sorted(set(result))

    def ambiguous_names(self, kind: str) -> dict[str, list[Entry]]:
        by_name: dict[str, list[Entry]] = {}
        for e in self.entries(kind):
            for n in (e.name, *e.aliases):
                by_name.setdefault(n, []).append(e)
        return {n: es for n, es in by_name.items() if len({x.plugin for x in es}) > 1}

    def get_entry(self, kind: str, name: str) -> Entry:
        """Look a name up: ``name``, an alias, or ``plugin:name``."""
        self._check_kind(kind)
        if isinstance(name, Entry):
            return name
        key = normalize_name(name)
        entries = self.entries(kind)
        if ":" in key:
            plugin, short = key.split(":", 1)
            matches = [e for e in entries if e.plugin == plugin and short in (e.name, *e.aliases)]
            if matches:
                return matches[0]
        else:
            matches = [e for e in entries if e.name == key]
            if not matches:
                matches = [e for e in entries if key in e.aliases]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                who = ", ".join(f"{e.qualified_name} (from {e.distribution or e.plugin})" for e in matches)
                raise AmbiguousNameError(
                    f"the {kind} name {name!r} is registered by several plugins: {who}. "
                    f"Use a qualified name such as {matches[0].qualified_name!r}."
                )
        candidates = sorted({n for e in entries for n in (e.name, *e.aliases, e.qualified_name)})
        close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        errors = [p.name for p in self.plugins.values() if p.errors]
        broken = f" (plugins that failed to load: {', '.join(errors)})" if errors else ""
        raise UnknownNameError(
            f"unknown {kind} {name!r}.{hint} See `pml-plugins list` for all {len(candidates)} names{broken}."
        )

    def get(self, kind: str, name: str) -> Any:
        return self.get_entry(kind, name).obj

    def create(self, kind: str, name: str, **kwargs: Any) -> Any:
        """Instantiate the registered class ``name`` with ``kwargs`` (see :meth:`build`)."""
        return self.build(kind, name, kwargs).obj

    def build(
        self,
        kind: str,
        name: str,
        arguments: Optional[Mapping[str, Any]] = None,
        *,
        offered: Optional[Mapping[str, Any]] = None,
        with_options: bool = False,
    ) -> BuildResult:
        """Instantiate the registered class ``name``: the one place a loss, miner or metric is built from a name.

        The rules (:func:`pml_plugins.arguments.resolve_arguments`): the class takes the keyword
        arguments of its ``__init__`` and of the PML base classes it forwards ``**kwargs`` to; an
        unknown or missing argument is a ``TypeError`` naming the closest argument and showing
        the signature, as is a ``TypeError`` the constructor raises.

        Args:
            arguments: keyword arguments for the constructor.
            offered: values passed only when the constructor takes them and ``arguments`` does not
                give them (the main job and the conformance kit offer ``num_classes`` / ``embedding_size``).
            with_options: for a loss with a ``training_setup``, arguments the constructor does not
                take are returned as ``options`` (its training options) instead of refused.
        """
        entry = self.get_entry(kind, name)
        obj = entry.obj
        if not inspect.isclass(obj):
            raise PluginError(f"the {kind} {entry.name!r} is a function, not a class; call get_{kind}() instead")
        keep = with_options and callable(getattr(entry.spec, "training_setup", None))
        kwargs, options = resolve_arguments(kind, entry.name, obj, arguments, offered=offered, keep_unknown=keep)
        try:
            built = obj(**kwargs)
        except TypeError as exc:
            raise TypeError(f"{obj.__name__}: {exc}; signature: {obj.__name__}{describe_signature(obj)}") from exc
        return BuildResult(obj=built, entry=entry, arguments=kwargs, options=options)

    def plugin_info(self) -> list[dict[str, Any]]:
        """Every plugin: name, distribution, version, what it registered, load errors."""
        self._ensure_loaded()
        return [p.as_dict() for p in self.plugins.values()]

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


#: The process-wide registry behind the module-level functions.
registry = Registry()


def load_plugins(
    allow: Iterable[str] | None = None,
    block: Iterable[str] | None = None,
    *,
    autoload: bool | None = None,
    reload: bool = False,
) -> list[dict[str, Any]]:
    """Discover plugins now (otherwise done lazily on first use). ``reload=True`` starts over."""
    if reload:
        registry.reset()
    return registry.load_plugins(allow, block, autoload=autoload)


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register a plugin module or object in-process (no packaging needed)."""
    return registry.register_plugin(plugin, name)


def unregister_plugin(name: str) -> None:
    """Remove an in-process or discovered plugin and everything it registered."""
    registry.unregister_plugin(name)


def plugin_info() -> list[dict[str, Any]]:
    """Plugins, their distributions and versions, what each registered, and load errors."""
    return registry.plugin_info()


def list_losses(pattern: str | None = None) -> list[str]:
    """Registered loss names, optionally filtered by a glob ``pattern`` (``"proxy*"``)."""
    return registry.names("loss", pattern)


def list_miners(pattern: str | None = None) -> list[str]:
    """Registered miner names, optionally filtered by a glob ``pattern``."""
    return registry.names("miner", pattern)


def list_metrics(pattern: str | None = None) -> list[str]:
    """Registered metric names, optionally filtered by a glob ``pattern``."""
    return registry.names("metric", pattern)


def get_loss(name: str) -> type:
    """The loss class registered as ``name`` (short name, alias or ``plugin:name``)."""
    return registry.get("loss", name)


def get_miner(name: str) -> type:
    """The miner class registered as ``name``."""
    return registry.get("miner", name)


def get_metric(name: str) -> Callable[..., Any]:
    """The metric function registered as ``name``."""
    return registry.get("metric", name)


def get_entry(kind: str, name: str) -> Entry:
    """The full registry :class:`Entry` (plugin, version, spec) for ``name``."""
    return registry.get_entry(kind, name)


def create_loss(name: str, **kwargs: Any) -> Any:
    """Instantiate the loss registered as ``name``; bad kwargs raise ``TypeError`` with the signature."""
    return registry.create("loss", name, **kwargs)


def create_miner(name: str, **kwargs: Any) -> Any:
    """Instantiate the miner registered as ``name``."""
    return registry.create("miner", name, **kwargs)


def create_metric(name: str, **kwargs: Any) -> Any:
    """Instantiate a class-based metric registered as ``name``."""
    return registry.create("metric", name, **kwargs)
