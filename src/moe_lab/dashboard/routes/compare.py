"""``/api/compare``: two runs side by side (overlaid curves, both heatmaps, a table of final numbers)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from moe_lab.dashboard.figures import compare_figures
from moe_lab.dashboard.protocol import ErrorResponse
from moe_lab.dashboard.service import DashboardService

__all__ = ["router"]

router = APIRouter(prefix="/api", tags=["compare"], responses={404: {"model": ErrorResponse}})

_TABLE_KEYS = ("loss", "lm_loss", "aux_loss", "eval_loss", "perplexity", "tokens_per_s", "drop_rate")


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    for r in reversed(records):
        v = r.get(key)
        if isinstance(v, (int, float)):
            return float(v)
    return None


@router.get("/compare")
def compare(
    request: Request,
    a: Annotated[int, Query(description="first run id")],
    b: Annotated[int, Query(description="second run id")],
    max_points: Annotated[int | None, Query(ge=2, le=10000)] = None,
) -> dict[str, Any]:
    """Both runs' summaries, overlaid figures and a table of their latest numbers with the difference."""
    svc: DashboardService = request.app.state.service
    svc.sync()
    ra, rb = svc.run(a), svc.run(b)
    n = max_points or svc.settings.max_points
    da, db = svc.records(ra, n), svc.records(rb, n)
    table = []
    for key in _TABLE_KEYS:
        va = _last(da[1] if key in ("eval_loss", "perplexity") else da[0], key)
        vb = _last(db[1] if key in ("eval_loss", "perplexity") else db[0], key)
        if va is None and vb is None:
            continue
        diff = vb - va if va is not None and vb is not None else None
        table.append({"metric": key, "a": va, "b": vb, "diff": diff})
    return {
        "a": {
            "id": ra.id,
            "name": ra.name,
            "status": ra.status,
            "last_step": ra.last_step,
            "problems": svc.problems(ra.name),
        },
        "b": {
            "id": rb.id,
            "name": rb.name,
            "status": rb.status,
            "last_step": rb.last_step,
            "problems": svc.problems(rb.name),
        },
        "table": table,
        "figures": compare_figures(ra.name, da, rb.name, db),
    }
