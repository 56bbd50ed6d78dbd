"""The kNN layer's progress bars (a leaf module: the searches and the calculator share it)."""

from __future__ import annotations

import tqdm

__all__ = ["progress_bar"]


def progress_bar(total: int, blocks: int, progress: bool | None, desc: str, unit: str = "query") -> tqdm.tqdm:
    """A tqdm bar over ``total`` items done in ``blocks`` steps.

    ``progress``: True shows it, False hides it, None shows it only for work of several blocks
    and only on a terminal (tqdm's ``disable=None``).
    """
    disable = (not progress) if progress is not None else (None if blocks > 1 else True)
    return tqdm.tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False, dynamic_ncols=True)
