"""``pml-plugins new-plugin NAME [--dir PATH]``: generate a complete loss-plugin package.

The package (``PATH/NAME/``) holds a pyproject with the ``pml_plugins`` entry point, a loss
that subclasses PML's ``BaseMetricLossFunction`` and already computes a correct loss, the
``plugin.py`` with the hook implementation, tests that run the conformance kit, and a README.
Its tests pass as generated; the guide ``docs/writing-a-plugin.md`` walks from there to your loss.
"""

from __future__ import annotations

import argparse
import keyword
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

#: (template file under pml_plugins/templates/plugin, output path relative to the package root)
FILES = (
    ("pyproject.toml.tmpl", "pyproject.toml"),
    ("README.md.tmpl", "README.md"),
    ("__init__.py.tmpl", "src/${module}/__init__.py"),
    ("loss.py.tmpl", "src/${module}/${loss_module}.py"),
    ("plugin.py.tmpl", "src/${module}/plugin.py"),
    ("test_loss.py.tmpl", "tests/test_${name}_loss.py"),
)

_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


@dataclass(frozen=True)
class PluginNames:
    """Every name derived from the NAME the user typed."""

    name: str  # entry-point / plugin name and the registered loss name: my_margin
    dist: str  # distribution: pml-plugin-my-margin
    module: str  # import package: pml_plugin_my_margin
    class_name: str  # loss class: MyMarginLoss
    loss_module: str  # module of the loss class: my_margin_loss

    def as_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


def plugin_names(raw: str) -> PluginNames:
    """Derive the plugin's names from ``raw`` (``my-margin``, ``my_margin`` or ``MyMargin``)."""
    text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", raw.strip()).lower().replace("-", "_")
    if not _NAME_RE.match(text):
        raise ValueError(
            f"plugin name {raw!r} must start with a letter and contain only letters, digits, '-' or '_' "
            f"(e.g. 'my_margin')"
        )
    if text in {"builtin", "pml_plugins"} or keyword.iskeyword(text):
        raise ValueError(f"plugin name {raw!r} is reserved; choose another")
    stem = text[: -len("_loss")] if text.endswith("_loss") and text != "loss" else text
    class_name = "".join(part.capitalize() for part in stem.split("_")) + "Loss"
    return PluginNames(
        name=text,
        dist="pml-plugin-" + text.replace("_", "-"),
        module="pml_plugin_" + text,
        class_name=class_name,
        loss_module=stem + "_loss",
    )


def render(names: PluginNames, destination: Path) -> list[Path]:
    """Write the package into ``destination`` (which must not exist or be empty); return the files."""
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise ValueError(f"{destination} already exists and is not an empty directory; choose another --dir or NAME")
    values = names.as_dict()
    templates = resources.files("pml_plugins") / "templates" / "plugin"
    written = []
    for template_name, relative in FILES:
        text = Template((templates / template_name).read_text(encoding="utf-8")).substitute(values)
        path = destination / Template(relative).substitute(values)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "new-plugin",
        help="generate a loss-plugin package (pyproject, loss, plugin.py, conformance tests, README)",
        description="Generate a complete, installable loss-plugin package in PATH/NAME.",
    )
    p.add_argument("name", metavar="NAME", help="plugin name, e.g. my_margin (-> pml-plugin-my-margin, MyMarginLoss)")
    p.add_argument(
        "--dir",
        default=".",
        metavar="PATH",
        help="parent folder of the new package (default: the current folder; in this repository: plugins)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = plugin_names(args.name)
    from .. import registry as reg

    try:  # a name already taken would be ambiguous the moment the plugin is installed
        taken = reg.get_entry("loss", names.name).qualified_name
    except reg.AmbiguousNameError:
        taken = "several plugins"
    except reg.UnknownNameError:
        taken = None
    if taken is not None:
        raise ValueError(f"the loss name {names.name!r} is already registered by {taken}; choose another NAME")
    destination = Path(args.dir) / names.name
    written = render(names, destination)
    print(f"created {names.dist} in {destination}/ (plugin {names.name!r}, loss class {names.class_name}):")
    for path in written:
        print(f"  {path.relative_to(destination)}")
    print("\nnext steps:")
    print(f"  cd {destination}")
    print("  pip install -e .             # registers the entry point")
    print("  python -m pytest             # hand value, loop reference, conformance kit")
    print(f"  pml-plugins info {names.name}")
    return 0
