"""Plotly figure dicts for the dashboard, built with :mod:`moe_lab.analytics.plots` from store records.

Example:
    >>> from moe_lab.dashboard.figures import run_figures
    >>> figs = run_figures([{"step": 1, "loss": 3.0}], [], [])
    >>> figs["loss"]["data"][0]["y"]
    [3.0]
"""

from __future__ import annotations

import copy
import html
from typing import Any

from moe_lab.analytics import plots

__all__ = ["compare_figures", "run_figures"]

Fig = dict[str, Any]


def _has_router_entropy(routing: list[dict[str, Any]]) -> bool:
    return any("entropy_normalized" in layer for r in routing for layer in r.get("layers", []))


def _entropy(routing: list[dict[str, Any]]) -> Fig:
    if _has_router_entropy(routing):
        return plots.entropy_figure(routing)
    # no router probabilities were logged: show the entropy of the expert-load distribution instead
    as_load = [
        {
            "step": r["step"],
            "layers": [{"entropy_normalized": x.get("load_entropy_normalized")} for x in r["layers"]],
        }
        for r in routing
    ]
    fig = plots.entropy_figure(as_load)
    fig["layout"]["title"]["text"] = "Expert-load entropy (normalised; router entropy not logged)"
    return fig


def _drop_rate(train: list[dict[str, Any]], routing: list[dict[str, Any]]) -> Fig:
    fig = plots.drop_rate_figure(routing)
    if not fig["data"]:
        pts = [(r["step"], r["drop_rate"]) for r in train if isinstance(r.get("drop_rate"), (int, float))]
        if pts:
            fig["data"] = [
                {
                    "type": "scatter",
                    "mode": "lines",
                    "name": "all layers",
                    "x": [p[0] for p in pts],
                    "y": [p[1] for p in pts],
                }
            ]
    return fig


def run_figures(
    train: list[dict[str, Any]], evals: list[dict[str, Any]], routing: list[dict[str, Any]]
) -> dict[str, Any]:
    """``{"loss", "eval", "heatmaps": [one per layer], "entropy", "balance", "drop_rate"}`` figure dicts."""
    n_layers = max(
        plots.routing_layers(routing), max((len(r.get("expert_load") or []) for r in train), default=0)
    )
    return {
        "loss": plots.loss_figure(train, evals),
        "eval": plots.eval_figure(evals),
        "heatmaps": [plots.expert_load_heatmap(routing, layer=i, train=train) for i in range(n_layers)],
        "entropy": _entropy(routing),
        "balance": plots.load_balance_figure(routing),
        "drop_rate": _drop_rate(train, routing),
    }


def _tag(fig: Fig, label: str, dash: str | None = None) -> list[dict[str, Any]]:
    label = html.escape(label)  # plotly renders a subset of HTML in trace names
    out = []
    for trace in fig["data"]:
        t = copy.deepcopy(trace)
        t["name"] = f"{label}: {t.get('name', '')}"
        t["legendgroup"] = label
        if dash:
            t["line"] = {**t.get("line", {}), "dash": dash}
        out.append(t)
    return out


def compare_figures(
    a_name: str,
    a: tuple[list[Any], list[Any], list[Any]],
    b_name: str,
    b: tuple[list[Any], list[Any], list[Any]],
) -> dict[str, Any]:
    """Overlay of two runs' loss and eval curves, and their expert-load heatmaps side by side."""
    fa, fb = run_figures(*a), run_figures(*b)
    out: dict[str, Any] = {}
    for key in ("loss", "eval", "entropy", "balance", "drop_rate"):
        fig = copy.deepcopy(fa[key])
        fig["data"] = _tag(fa[key], a_name) + _tag(fb[key], b_name, dash="dash")
        out[key] = fig
    out["heatmaps"] = {"a": fa["heatmaps"], "b": fb["heatmaps"]}
    return out
