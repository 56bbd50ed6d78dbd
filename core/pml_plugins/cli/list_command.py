"""``pml-plugins list``: plugins, versions, what each registered, load errors."""

from __future__ import annotations

import argparse
import json

from .. import registry as reg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list plugins and the losses, miners and metrics they register")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--kind", choices=["loss", "miner", "metric"], help="only this kind")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = reg.plugin_info()
    ambiguous = {kind: reg.registry.ambiguous_names(kind) for kind in reg.KINDS}
    if args.json:
        print(
            json.dumps(
                {
                    "plugins": info,
                    "ambiguous": {
                        k: {n: [e.qualified_name for e in es] for n, es in v.items()} for k, v in ambiguous.items()
                    },
                },
                indent=2,
            )
        )
        return 0
    from .. import __version__

    print(f"pml-plugins {__version__} (plugin API {reg.PLUGIN_API_VERSION})")
    for plugin in info:
        dist = plugin["distribution"] or "in-process"
        version = plugin["version"] or "-"
        status = "ok" if plugin["loaded"] and not plugin["errors"] else ("errors" if plugin["loaded"] else "FAILED")
        api = f", plugin API {plugin['api_version']}" if plugin.get("api_version") is not None else ""
        if plugin.get("requires_core"):
            api += f", built for pml-plugins {plugin['requires_core']}"
        print(f"\n{plugin['name']}  [{dist} {version}{api}]  {status}")
        for kind, key in (("loss", "losses"), ("miner", "miners"), ("metric", "metrics")):
            if args.kind and args.kind != kind:
                continue
            names = plugin[key]
            if names:
                shown = [f"{n} (ambiguous: use {plugin['name']}:{n})" if n in ambiguous[kind] else n for n in names]
                print(f"  {key:8s} {', '.join(shown)}")
        for error in plugin["errors"]:
            print(f"  error    {error}")
    return 0
