"""Moved to :mod:`pml_plugins.knn.self_search`; this module keeps the old import path working."""

from __future__ import annotations

from .knn.self_search import DEFAULT_BLOCK_SIZE, symmetric_self_search

__all__ = ["symmetric_self_search", "DEFAULT_BLOCK_SIZE"]
