"""Plugin discovery and the name registry for losses, miners and metrics.

Discovery iterates the ``pml_plugins`` entry-point group itself (instead of pluggy's
``load_setuptools_entrypoints``, which stops at the first plugin that fails to import and
silently drops a duplicate entry-point name), so one broken plugin is recorded and skipped
while every other plugin still loads.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib.metadata as importlib_metadata
import inspect
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import pluggy

from . import hookspecs

ENTRY_POINT_GROUP = "pml_plugins"
#: Version of the hook contract; a plugin module may declare ``pml_plugins_api_version``.
PLUGIN_API_VERSION = 1
#: Environment variables that control discovery (mirroring pytest's).
ENV_DISABLE_AUTOLOAD = "PML_PLUGINS_DISABLE_AUTOLOAD"
ENV_ALLOW = "PML_PLUGINS_ALLOW"
ENV_BLOCK = "PML_PLUGINS_BLOCK"
BUILTIN_PLUGIN = "builtin"
KINDS = ("loss", "miner", "metric")
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


def normalize_name(name: str) -> str:
    """Names are case-insensitive and treat ``-`` like ``_``."""
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    return name.strip().lower().replace("-", "_")


def snake_case(class_name: str, suffix: str = "") -> str:
    """``ProxyAnchorLoss`` -> ``proxy_anchor`` (with ``suffix="Loss"``)."""
    if suffix and class_name.endswith(suffix) and class_name != suffix:
        class_name = class_name[: -len(suffix)]
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", class_name)
    return s.lower()


@dataclass(frozen=True)
class Entry:
    """One registered loss, miner or metric."""

    kind: str
    name: str
    obj: Any
    plugin: str
    distribution: str | None = None
    version: str | None = None
    aliases: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def qualified_name(self) -> str:
        return f"{self.plugin}:{self.name}"

    @property
    def requires_optimizer(self) -> bool:
        """Whether the loss owns parameters that need their own optimizer."""
        if "loss_optimizer" in self.metadata:
            return bool(self.metadata["loss_optimizer"])
        params = _signature_parameters(self.obj)
        return "num_classes" in params

    def needs(self) -> dict[str, Any]:
        """What a training loop must provide for this entry."""
        return {
            "sampler": self.metadata.get("sampler"),
            "multi_view": bool(self.metadata.get("multi_view", False)),
            "database_refresh": bool(self.metadata.get("database_refresh", False)),
            "loss_optimizer": self.requires_optimizer if self.kind == "loss" else False,
            "loss_lr": self.metadata.get("loss_lr"),
            "retrieval_distance": self.metadata.get("retrieval_distance", "cosine"),
        }


@dataclass
class PluginRecord:
    """What one plugin is and what it did."""

    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    api_version: int | None = None
    #: The core versions the plugin's distribution declares it was built for (its requirement on pml-plugins).
    requires_core: str | None = None
    errors: list[str] = field(default_factory=list)
    loaded: bool = False
    registered: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "api_version": self.api_version,
            "requires_core": self.requires_core,
            "loaded": self.loaded,
            "losses": list(self.registered["loss"]),
            "miners": list(self.registered["miner"]),
            "metrics": list(self.registered["metric"]),
            "errors": list(self.errors),
        }


def _signature_parameters(obj: Any) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return {}


def _split_env_list(value: str | None) -> set[str] | None:
    if value is None or not value.strip():
        return None
    return {normalize_name(v) for v in value.split(",") if v.strip()}


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

    ``register(obj, name=None, aliases=(), **metadata)``: ``obj`` is a loss class, a miner
    class or a metric callable; ``name`` defaults to the snake-cased class name without the
    ``Loss``/``Miner`` suffix. Registrations are staged and committed only when the hook
    returns without error.
    """

    def __init__(self, registry: "Registry", plugin: PluginRecord, kind: str):
        self._registry = registry
        self._plugin = plugin
        self._kind = kind
        self.staged: list[Entry] = []

    def __call__(self, obj: Any, name: str | None = None, aliases: Iterable[str] = (), **metadata: Any) -> Any:
        kind = self._kind
        base = _base_class_for(kind)
        if base is not None:
            if not (inspect.isclass(obj) and issubclass(obj, base)):
                raise RegistrationError(
                    f"plugin {self._plugin.name!r} registered {obj!r} as a {kind}, but a {kind} "
                    f"must be a subclass of pytorch_metric_learning's {base.__name__}"
                )
        elif not callable(obj):
            raise RegistrationError(f"plugin {self._plugin.name!r} registered {obj!r} as a metric, but it is not callable")
        if name is None:
            suffix = {"loss": "Loss", "miner": "Miner"}.get(kind, "")
            name = snake_case(getattr(obj, "__name__", ""), suffix)
        if isinstance(aliases, str):
            aliases = (aliases,)
        name = normalize_name(name)
        if ":" in name:
            raise RegistrationError(f"{kind} name {name!r} must not contain ':' (reserved for plugin:name)")
        alias_names = tuple(dict.fromkeys(normalize_name(a) for a in aliases if normalize_name(a) != name))
        entry = Entry(
            kind=kind,
            name=name,
            obj=obj,
            plugin=self._plugin.name,
            distribution=self._plugin.distribution,
            version=self._plugin.version,
            aliases=alias_names,
            metadata=MappingProxyType(dict(metadata)),
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
            allow_set = {normalize_name(a) for a in allow} if allow is not None else _split_env_list(os.environ.get(ENV_ALLOW))
            block_set = {normalize_name(b) for b in block} if block is not None else (_split_env_list(os.environ.get(ENV_BLOCK)) or set())
            if autoload is None:
                autoload = not os.environ.get(ENV_DISABLE_AUTOLOAD)
            self._loaded = True
            if BUILTIN_PLUGIN not in block_set and BUILTIN_PLUGIN not in self.plugins:
                from . import builtin

                self._add_plugin(builtin, PluginRecord(name=BUILTIN_PLUGIN, distribution="pml-plugins",
                                                       version=_dist_version("pml-plugins"), module=builtin.__name__))
            for ep in _entry_points():
                name = normalize_name(ep.name)
                if name in block_set or name == BUILTIN_PLUGIN:
                    continue
                if allow_set is not None and name not in allow_set:
                    continue
                if not autoload and allow_set is None:
                    continue
                dist = getattr(ep, "dist", None)
                dist_name = dist.metadata["Name"] if dist is not None else None
                dist_version = dist.version if dist is not None else None
                plugin_name = name
                if plugin_name in self.plugins:
                    if self.plugins[plugin_name].distribution == dist_name and self.plugins[plugin_name].module == ep.value:
                        continue  # the same entry point seen twice (e.g. loaded already)
                    # two distributions use the same entry-point name: keep both, qualified
                    plugin_name = f"{name}@{normalize_name(dist_name or 'unknown')}"
                    if plugin_name in self.plugins:
                        continue
                record = PluginRecord(name=plugin_name, distribution=dist_name, version=dist_version, module=ep.value,
                                      requires_core=_core_requirement(dist))
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
                raise PluginError(f"a plugin named {name!r} is already registered; pass name=... or unregister it first")
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
        if api is not None and api != PLUGIN_API_VERSION:
            self._record_error(
                record,
                f"plugin API version {api} is not supported by pml-plugins "
                f"{_dist_version('pml-plugins')} (API version {PLUGIN_API_VERSION}); "
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
        """Instantiate the registered class ``name`` with ``kwargs``."""
        entry = self.get_entry(kind, name)
        obj = entry.obj
        if not inspect.isclass(obj):
            raise PluginError(f"the {kind} {entry.name!r} is a function, not a class; call get_{kind}() instead")
        signature = describe_signature(obj)
        params = _signature_parameters(obj)
        accepts_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        unknown = [k for k in kwargs if k not in params]
        if unknown and not accepts_var_kw:
            raise TypeError(f"{obj.__name__} got unexpected argument(s) {unknown}; signature: {obj.__name__}{signature}")
        missing = [n for n, p in params.items()
                   if p.default is inspect.Parameter.empty
                   and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
                   and n not in kwargs]
        if missing:
            raise TypeError(f"{obj.__name__} needs argument(s) {missing}; signature: {obj.__name__}{signature}")
        try:
            return obj(**kwargs)
        except TypeError as exc:
            raise TypeError(f"{obj.__name__}: {exc}; signature: {obj.__name__}{signature}") from exc

    def plugin_info(self) -> list[dict[str, Any]]:
        """Every plugin: name, distribution, version, what it registered, load errors."""
        self._ensure_loaded()
        return [p.as_dict() for p in self.plugins.values()]

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def describe_signature(cls: type) -> str:
    """The constructor signature, including the PML base-class keywords it forwards."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return "(...)"
    text = str(sig)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        extra = []
        for base in inspect.getmro(cls)[1:]:
            init = base.__dict__.get("__init__")
            if init is None:
                continue
            for n, p in _signature_parameters(init).items():
                if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n not in sig.parameters and n not in extra:
                    extra.append(n)
        if extra:
            text += f"  [forwarded to the PML base class: {', '.join(extra)}]"
    return text


def _entry_points() -> list[Any]:
    eps = importlib_metadata.entry_points()
    if hasattr(eps, "select"):
        selected = list(eps.select(group=ENTRY_POINT_GROUP))
    else:  # Python < 3.10
        selected = list(eps.get(ENTRY_POINT_GROUP, []))
    return sorted(selected, key=lambda ep: (ep.name, ep.value))


def _core_requirement(dist: Any) -> str | None:
    """The version range a plugin distribution requires of pml-plugins, e.g. ``>=0.1,<0.2``."""
    for requirement in (getattr(dist, "requires", None) or []):
        spec = requirement.split(";", 1)[0].strip()
        match = re.match(r"^([A-Za-z0-9._-]+)\s*(\[[^\]]*\])?\s*\(?([^)]*)\)?$", spec)
        if match and normalize_name(match.group(1)).replace(".", "_") == "pml_plugins":
            return match.group(3).strip() or "any version"
    return None


def _dist_version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


#: The process-wide registry behind the module-level functions.
registry = Registry()


def load_plugins(allow: Iterable[str] | None = None, block: Iterable[str] | None = None, *, autoload: bool | None = None, reload: bool = False) -> list[dict[str, Any]]:
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
    """The full registry :class:`Entry` (plugin, version, metadata) for ``name``."""
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
