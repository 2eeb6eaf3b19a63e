"""``moe-lab dashboard``: the live web dashboard of training runs (http://127.0.0.1:8080).

Example:
    $ moe-lab dashboard --runs runs                      # watch every run under runs/
    $ moe-lab dashboard --store postgresql+psycopg://moe@db/moe --port 9000
    $ MOE_LAB_STORE_URL=... moe-lab dashboard            # the store URL (with its password) from the env
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_lab.cli.main import CLIError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "dashboard",
        help="serve the live web dashboard (loss curves, expert-load heatmaps, run comparison)",
        description=(
            "Serve the dashboard. With --runs DIR it imports DIR/*/metrics.jsonl into DIR/runs.db as runs "
            "grow; with --store URL (or $MOE_LAB_STORE_URL) it reads a run store written by the run_store "
            "callback. Binds to 127.0.0.1 (this machine only) unless --host says otherwise."
        ),
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--runs", dest="runs_dir", default=None, metavar="DIR", help="runs directory (default: runs)"
    )
    src.add_argument(
        "--store",
        dest="store_url",
        default=None,
        metavar="URL",
        help="run store URL (sqlite:///PATH or postgresql+psycopg://...); prefer $MOE_LAB_STORE_URL for passwords",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--open", dest="open_browser", action="store_true", help="open the page in a browser")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from moe_lab.dashboard import serve
    from moe_lab.tracking import StoreError

    runs_dir = args.runs_dir
    if runs_dir is None and args.store_url is None and not os.environ.get("MOE_LAB_STORE_URL"):
        runs_dir = "runs"
    if runs_dir is not None and not Path(runs_dir).is_dir():
        raise CLIError(f"runs directory not found: {runs_dir} (train a run first, or pass --runs DIR)")
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be between 0 and 65535 (got {args.port})")
    where = f"runs in {runs_dir}" if runs_dir else "the run store"
    print(
        f"moe-lab dashboard: serving {where} on http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True
    )
    try:
        serve(
            runs_dir=runs_dir,
            store_url=args.store_url,
            host=args.host,
            port=args.port,
            open_browser=args.open_browser,
        )
    except StoreError as err:
        raise CLIError(str(err)) from None
    return 0
