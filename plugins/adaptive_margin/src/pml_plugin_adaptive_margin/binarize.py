"""Binarised embeddings for indexing: the paper's "bits" rows (section 3, Tables 1-3).

The function lives in the core (``pml_plugins.binarize_embeddings``) because the main job's
``--eval-binarize`` uses it for any loss; this module keeps the plugin's import path.
"""

from __future__ import annotations

from pml_plugins import binarize_embeddings

__all__ = ["binarize_embeddings"]
