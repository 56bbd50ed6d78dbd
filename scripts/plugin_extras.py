"""Print the optional-dependency extras of a pyproject.toml, comma-separated, for scripts/dev-install.sh.

Extras named ``gpu`` / ``cuda`` are left out (no GPU wheels on CPU machines). Runs on Python 3.9+:
``tomllib`` (3.11+), else ``tomli``, else a minimal reader of the one table it needs (the dev
install runs before anything is installed, so it cannot count on ``tomli``).
Usage: ``python scripts/plugin_extras.py plugins/NAME/pyproject.toml``
"""

from __future__ import annotations

import re
import sys
from typing import List

SKIPPED = ("gpu", "cuda")


def _extras_minimal(text: str) -> List[str]:
    """Keys of ``[project.optional-dependencies]``: the ``name = [...]`` lines of that table."""
    names, inside = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            header = re.match(r"^\[\s*([^\[\]]+?)\s*\]$", stripped)
            if header or not inside:  # a table header; an array line inside the table is not one
                inside = bool(header) and header.group(1) == "project.optional-dependencies"
                continue
        match = re.match(r'^([A-Za-z0-9_.-]+|"[^"]+")\s*=', line) if inside else None
        if match:
            names.append(match.group(1).strip('"'))
    return names


def extras(text: str) -> List[str]:
    """The extras of the pyproject ``text`` in file order, without the GPU ones."""
    try:
        import tomllib as toml
    except ModuleNotFoundError:
        try:
            import tomli as toml  # type: ignore[no-redef]
        except ModuleNotFoundError:
            toml = None
    names = (
        list(toml.loads(text).get("project", {}).get("optional-dependencies", {}))
        if toml is not None
        else _extras_minimal(text)
    )
    return [n for n in names if n not in SKIPPED]


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        print(",".join(extras(f.read())))
