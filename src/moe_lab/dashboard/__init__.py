"""Live web dashboard for moe-lab runs: a FastAPI app with a JSON API and a plotly page (served locally).

It reads a :class:`moe_lab.tracking.RunStore` and, given a runs directory, imports the run folders'
``metrics.jsonl`` / ``routing.jsonl`` into ``<runs dir>/runs.db`` as they grow, so a run shows up live
while it trains. ``moe-lab dashboard --runs runs`` starts it on http://127.0.0.1:8080.

Example:
    >>> from moe_lab.dashboard import DashboardSettings, create_app
    >>> app = create_app(DashboardSettings(runs_dir=None, store_url="sqlite://"))
    >>> # serve(runs_dir="runs", port=8080)
"""

from __future__ import annotations

from moe_lab.dashboard.app import create_app, serve
from moe_lab.dashboard.settings import DashboardSettings

__all__ = ["DashboardSettings", "create_app", "serve"]
