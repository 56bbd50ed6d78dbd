"""Where plugins come from: the entry-point group, the environment switches, the API version, what a plugin did.

The registry (:mod:`pml_plugins.registry`) iterates these entry points itself, one plugin at a
time (see its docstring for why); this module holds what it reads of the environment and of the
installed distributions, and :class:`PluginRecord`, its account of each plugin.
"""

from __future__ import annotations

import importlib.metadata as importlib_metadata
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .names import normalize_name
from .specs import KINDS

ENTRY_POINT_GROUP = "pml_plugins"
#: Version of the hook contract, ``"major.minor"``. A plugin module may declare the version it was
#: written for as ``pml_plugins_api_version`` (an int major, or ``"major.minor"``); it loads when the
#: major is the core's and the minor at most the core's. 1.1 added typed specs (``register(..., spec=)``).
PLUGIN_API_VERSION = "1.1"
#: Environment variables that control discovery (mirroring pytest's).
ENV_DISABLE_AUTOLOAD = "PML_PLUGINS_DISABLE_AUTOLOAD"
ENV_ALLOW = "PML_PLUGINS_ALLOW"
ENV_BLOCK = "PML_PLUGINS_BLOCK"
BUILTIN_PLUGIN = "builtin"


def parse_api_version(value: Any) -> Optional[tuple[int, int]]:
    """``1`` -> (1, 0); ``"1.1"`` / ``(1, 1)`` -> (1, 1); None when it is not a version."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return (value, 0)
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value
    if isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?", value.strip()):
        major, _, minor = value.strip().partition(".")
        return (int(major), int(minor or 0))
    return None


def api_version_supported(declared: Any) -> bool:
    """Whether a plugin written for API ``declared`` loads in this core (same major, minor not newer)."""
    mine, theirs = parse_api_version(PLUGIN_API_VERSION), parse_api_version(declared)
    return theirs is not None and mine is not None and theirs[0] == mine[0] and theirs[1] <= mine[1]


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


def split_env_list(value: str | None) -> set[str] | None:
    """``"a, b"`` -> ``{"a", "b"}`` (normalised names); None for an unset or empty variable."""
    if value is None or not value.strip():
        return None
    return {normalize_name(v) for v in value.split(",") if v.strip()}


def entry_points() -> list[Any]:
    """The ``pml_plugins`` entry points of every installed distribution, sorted by name."""
    eps = importlib_metadata.entry_points()
    if hasattr(eps, "select"):
        selected = list(eps.select(group=ENTRY_POINT_GROUP))
    else:  # Python < 3.10
        selected = list(eps.get(ENTRY_POINT_GROUP, []))
    return sorted(selected, key=lambda ep: (ep.name, ep.value))


def core_requirement(dist: Any) -> str | None:
    """The version range a plugin distribution requires of pml-plugins, e.g. ``>=0.1,<0.2``."""
    for requirement in getattr(dist, "requires", None) or []:
        spec = requirement.split(";", 1)[0].strip()
        match = re.match(r"^([A-Za-z0-9._-]+)\s*(\[[^\]]*\])?\s*\(?([^)]*)\)?$", spec)
        if match and normalize_name(match.group(1)).replace(".", "_") == "pml_plugins":
            return match.group(3).strip() or "any version"
    return None


def dist_version(dist: str) -> str | None:
    """The installed version of the distribution ``dist``, None when it is not installed."""
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None
