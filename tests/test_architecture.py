"""The core's module graph: no import cycles, no private names taken from another module.

Imports are read with ``ast`` (nothing is imported), at module level and inside functions alike:
a lazy import hides a cycle from the interpreter, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "core" / "pml_plugins"
PACKAGE = "pml_plugins"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(CORE.rglob("*.py")):
        parts = path.relative_to(CORE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _base(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if level == 0:
        return target or ""
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([target] if target else []))


def _imports(module: str) -> list[tuple[str, str | None]]:
    """``(imported module, name taken from it or None)`` for every import in ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, path.name == "__init__.py", node.level, node.module)
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, None) if sub in MODULES else (base, alias.name))
    return out


def _module_aliases(module: str) -> dict[str, str]:
    """Local names bound to core modules (``from .. import registry as reg`` -> ``{"reg": "pml_plugins.registry"}``)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _base(module, path.name == "__init__.py", node.level, node.module)
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    out[alias.asname or alias.name] = f"{base}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES and alias.asname:
                    out[alias.asname] = alias.name
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {target for target, _ in _imports(m) if target in MODULES and target != m} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles():
    # the checker itself: a two-cycle, a three-cycle beside a chain, and a graph without one
    assert _cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_graph_sees_relative_and_lazy_imports():
    graph = _graph()
    assert "pml_plugins.hookspecs" in graph["pml_plugins.registry"]  # from . import hookspecs
    assert "pml_plugins.builtin" in graph["pml_plugins.registry"]  # imported inside load_plugins
    assert "pml_plugins.registry" in graph["pml_plugins.pipeline.builders"]  # from .. import registry as reg


def test_no_import_cycle_among_core_modules():
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles among core modules: {cycles}"


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for module in MODULES:
        for target, name in _imports(module):
            if name and name.startswith("_") and not name.startswith("__") and target != module:
                bad.append(f"{module}: from {target} import {name}")
        aliases = _module_aliases(module)
        for node in ast.walk(ast.parse(MODULES[module].read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{module}: {node.value.id}.{node.attr} ({aliases[node.value.id]})")
    assert not bad, "private names used across modules:\n" + "\n".join(sorted(set(bad)))


@pytest.mark.parametrize(
    "old, new",
    [
        ("pml_plugins.distributed", "pml_plugins.distributed_losses"),
        ("pml_plugins.training", "pml_plugins.training_protocol"),
        ("pml_plugins.pipeline.distributed", "pml_plugins.pipeline.ddp"),
    ],
)
def test_renamed_modules_keep_their_old_path_with_a_deprecation_warning(old, new):
    import importlib
    import sys
    import warnings

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)  # one module object: patches through the old name work
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)
