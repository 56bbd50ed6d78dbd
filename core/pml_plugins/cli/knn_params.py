"""The ``--knn-param NAME=VALUE`` option of ``pml-plugins evaluate``."""

from __future__ import annotations

from typing import Any, Iterable

__all__ = ["parse_index_params"]


def parse_index_params(items: Iterable[str]) -> dict[str, Any]:
    """``["nlist=4096", "nprobe=32"]`` -> ``{"nlist": 4096, "nprobe": 32}`` (the CLI's ``--knn-param``).

    Values are ints; ``none`` is None (``train_size=none``: train on every row). The names are
    checked later, against the chosen index, by ``pml_plugins.knn.check_index_params``.

    Raises:
        ValueError: an item without ``=`` or with a value that is not an int (the item is named).
    """
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            raise ValueError(f"kNN index parameter {item!r} must be NAME=VALUE, e.g. nprobe=32")
        if value.lower() == "none":
            out[name] = None
            continue
        try:
            out[name] = int(value)
        except ValueError:
            raise ValueError(f"kNN index parameter {name!r} must be an integer, got {value!r}") from None
    return out
