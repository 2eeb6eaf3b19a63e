"""``moe-lab report RUN_DIR [-o report.html] [--png DIR]``: one self-contained offline HTML report of a run."""

from __future__ import annotations

import argparse

from moe_lab.cli.main import CLIError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "report",
        help="write a self-contained HTML report (losses, expert load, entropy, drops, cost) of a run",
        description=(
            "Read RUN_DIR (metrics.jsonl, routing.jsonl, config.yaml, summary.json) and write one HTML file "
            "that works offline (plotly.js inlined), optionally also one PNG per figure."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `moe-lab train`")
    p.add_argument("-o", "--output", default=None, help="HTML path (default: RUN_DIR/reports/report.html)")
    p.add_argument("--png", metavar="DIR", default=None, help="also write one PNG per figure into DIR")
    p.add_argument("--title", default=None, help="report title (default: the run name)")
    p.add_argument("--no-cost", action="store_true", help="leave out the cost model section")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moe_lab.analytics.records import RunDirError
    from moe_lab.analytics.report import build_report

    try:
        path = build_report(
            args.run_dir, args.output, args.png, title=args.title, include_cost=not args.no_cost
        )
    except (RunDirError, ImportError) as err:
        raise CLIError(str(err)) from None
    print(f"report: {path}")
    if args.png:
        print(f"png: {args.png}")
    return 0
