"""``/api/runs``: list runs, run detail, metrics since a step, expert-load heatmaps, figures."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from moe_lab.dashboard.figures import run_figures
from moe_lab.dashboard.protocol import ErrorResponse, RunDetail, RunList
from moe_lab.dashboard.service import DashboardService

__all__ = ["router"]

router = APIRouter(prefix="/api", tags=["runs"], responses={404: {"model": ErrorResponse}})


def _svc(request: Request) -> DashboardService:
    svc: DashboardService = request.app.state.service
    return svc


@router.get("/health")
def health(request: Request) -> dict[str, Any]:
    """Liveness and where the runs come from (the store URL with its password redacted)."""
    svc = _svc(request)
    return {
        "status": "ok",
        "store": svc.store.url,
        "runs_dir": str(svc.runs_dir) if svc.runs_dir else None,
        "poll_ms": svc.settings.poll_ms,
    }


@router.get("/runs", response_model=RunList)
def list_runs(request: Request) -> dict[str, Any]:
    """Every run with its status, last step, latest loss and any problems of its directory."""
    return _svc(request).list_runs()


@router.get("/runs/{run_id}", response_model=RunDetail)
def run_detail(request: Request, run_id: int) -> dict[str, Any]:
    """One run: config, summary, metric keys, MoE shape (layers x experts) and problems."""
    return _svc(request).run_detail(run_id)


@router.get("/runs/{run_id}/metrics")
def run_metrics(
    request: Request,
    run_id: int,
    since_step: Annotated[int | None, Query(ge=-1, description="only steps after this one")] = None,
    keys: Annotated[str | None, Query(description="comma-separated metric keys")] = None,
) -> dict[str, Any]:
    """Training and eval points after ``since_step`` (poll with the last step seen for live updates)."""
    key_list = [k for k in keys.split(",") if k] if keys else None
    return _svc(request).metrics(run_id, since_step=since_step, keys=key_list)


@router.get("/runs/{run_id}/routing")
def run_routing(
    request: Request,
    run_id: int,
    since_step: Annotated[int | None, Query(ge=-1)] = None,
    max_points: Annotated[int | None, Query(ge=2, le=10000)] = None,
) -> dict[str, Any]:
    """Expert-load heatmap data: per layer ``z[expert][i]`` at ``steps[i]``."""
    return _svc(request).routing(run_id, since_step=since_step, max_points=max_points)


@router.get("/runs/{run_id}/figures")
def run_figs(
    request: Request, run_id: int, max_points: Annotated[int | None, Query(ge=2, le=10000)] = None
) -> dict[str, Any]:
    """Plotly figures: loss, eval, one expert-load heatmap per layer, entropy, load balance, drop rate."""
    svc = _svc(request)
    svc.sync()
    rec = svc.run(run_id)
    train, evals, routing = svc.records(rec, max_points or svc.settings.max_points)
    return {
        "run_id": rec.id,
        "name": rec.name,
        "status": rec.status,
        "last_step": rec.last_step,
        "figures": run_figures(train, evals, routing),
        "problems": svc.problems(rec.name),
    }
