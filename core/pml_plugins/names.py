"""How registry names are spelled: a leaf module (no imports from the package) shared by the
registry and the built-in plugin."""

from __future__ import annotations

import re

__all__ = ["normalize_name", "snake_case"]


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
