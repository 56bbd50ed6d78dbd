"""``pml-plugins report``: one self-contained offline HTML report of a run or a comparison."""

from __future__ import annotations

import argparse
import time

_EPILOG = """examples:
  pml-plugins report pml-plugins-runs/proxy_anchor          # writes .../report.html
  pml-plugins report pml-plugins-compare --out ~/cmp.html   # a comparison, and a report per run
  pml-plugins report runs/st --tensorboard                  # also TensorBoard events in runs/st/tensorboard
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write an offline HTML report of a run or comparison folder",
        description="Write one self-contained HTML file (images inline, no script, nothing fetched "
        "from the network) for a run folder (setting, metrics, training curves, "
        "Recall@k / nDCG@k against k, retrieval gallery, embedding map, per-class "
        "results) or a comparison folder (table with intervals, per-loss plots, a "
        "link to each run's own report, which is written too).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("directory", metavar="RUN_OR_COMPARE_DIR", help="the --out folder of train or compare")
    p.add_argument("--out", metavar="FILE", help="the HTML file to write (default RUN_OR_COMPARE_DIR/report.html)")
    p.add_argument("--seed", type=int, default=0, help="seed of the gallery's query sample and the map (default 0)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the search and the map (default 1)")
    p.add_argument(
        "--tensorboard", action="store_true", help="also write TensorBoard events of a run folder to DIR/tensorboard"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report import write_report, write_tensorboard
    from ..report.compare_report import is_compare_dir

    start = time.perf_counter()
    path = write_report(args.directory, args.out, seed=args.seed, threads=args.threads)
    print(
        f"wrote {path} ({path.stat().st_size / 1024:.0f} KB, {time.perf_counter() - start:.1f} s); "
        f"open it in a browser, it needs no network"
    )
    if args.tensorboard:
        if is_compare_dir(args.directory):
            raise ValueError("--tensorboard takes a run folder, not a comparison folder")
        logdir = write_tensorboard(args.directory)
        print(f"wrote TensorBoard events to {logdir}: tensorboard --logdir {logdir}")
    return 0
