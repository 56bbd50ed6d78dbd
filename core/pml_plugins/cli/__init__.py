"""The ``pml-plugins`` command line: one module per subcommand, each with ``add_parser``."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# Subcommand modules under pml_plugins.cli, in the order `--help` shows them.
COMMANDS = ("list", "info", "train", "compare", "evaluate", "embed", "report", "new-plugin")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="pml-plugins",
        description="Plugin-based deep-metric-learning losses, miners and metrics for pytorch-metric-learning.",
    )
    parser.add_argument("--version", action="version", version=f"pml-plugins {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name.replace('-', '_')}_command")
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        # a training run stopped by Ctrl-C / SIGTERM says what it saved and how to resume
        print(str(exc) or "interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, LookupError, FileNotFoundError) as exc:
        # user errors: one clear line, no stack trace
        print(f"pml-plugins {args.command}: error: {exc}", file=sys.stderr)
        return 2
