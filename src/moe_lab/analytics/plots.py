"""Figure builders: plain plotly figure dicts (``{"data": [...], "layout": {...}}``, JSON-serialisable,
no plotly import needed) for the HTML report and the dashboard, plus a matplotlib renderer for PNGs.

Inputs are the run records: train lines and eval lines of ``metrics.jsonl`` and ``routing.jsonl`` lines
(``{"step": s, "layers": [LayerStats dict, ...]}``, see :mod:`moe_lab.analytics.stats`).

Example:
    >>> from moe_lab.analytics.plots import loss_figure, save_png
    >>> fig = loss_figure([{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}])
    >>> fig["data"][0]["y"]
    [3.0, 2.5]
    >>> save_png(fig, "/tmp/loss.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from typing import Any

__all__ = [
    "co_selection_figure",
    "cost_figure",
    "drop_rate_figure",
    "entropy_figure",
    "eval_figure",
    "expert_load_heatmap",
    "figure_to_matplotlib",
    "load_balance_figure",
    "loss_figure",
    "routing_layers",
    "save_png",
    "specialization_figure",
    "table_figure",
]

Fig = dict[str, Any]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _layout(title: str, xtitle: str = "step", ytitle: str = "", **extra: Any) -> dict[str, Any]:
    return {
        "title": {"text": title},
        "xaxis": {"title": {"text": xtitle}},
        "yaxis": {"title": {"text": ytitle}},
        "margin": {"l": 60, "r": 20, "t": 50, "b": 50},
        "template": "plotly_white",
        **extra,
    }


def _line(records: list[dict[str, Any]], key: str, name: str | None = None) -> dict[str, Any] | None:
    pts = [(r["step"], _num(r.get(key))) for r in records if "step" in r and _num(r.get(key)) is not None]
    if not pts:
        return None
    return {
        "type": "scatter",
        "mode": "lines",
        "name": name or key,
        "x": [p[0] for p in pts],
        "y": [p[1] for p in pts],
    }


def loss_figure(train: list[dict[str, Any]], evals: list[dict[str, Any]] | None = None) -> Fig:
    """Training loss (total, LM) and eval loss against the step; aux and z losses on a second axis."""
    traces = [t for k in ("loss", "lm_loss") if (t := _line(train, k))]
    if evals and (t := _line(evals, "eval_loss", "eval_loss")):
        t["mode"] = "lines+markers"
        traces.append(t)
    for k in ("aux_loss", "z_loss"):
        if t := _line(train, k):
            traces.append({**t, "yaxis": "y2", "line": {"dash": "dot"}})
    layout = _layout("Loss", ytitle="loss")
    layout["yaxis2"] = {"title": {"text": "aux / z loss"}, "overlaying": "y", "side": "right"}
    return {"data": traces, "layout": layout}


def eval_figure(evals: list[dict[str, Any]]) -> Fig:
    """Eval loss and perplexity against the step (perplexity on a second axis)."""
    traces = []
    if t := _line(evals, "eval_loss"):
        traces.append({**t, "mode": "lines+markers"})
    if t := _line(evals, "perplexity"):
        traces.append({**t, "mode": "lines+markers", "yaxis": "y2"})
    layout = _layout("Evaluation", ytitle="eval loss")
    layout["yaxis2"] = {"title": {"text": "perplexity"}, "overlaying": "y", "side": "right"}
    return {"data": traces, "layout": layout}


def routing_layers(routing: list[dict[str, Any]]) -> int:
    """Number of MoE layers in the routing records."""
    return max((len(r.get("layers", [])) for r in routing), default=0)


def _layer_series(routing: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    traces = []
    for i in range(routing_layers(routing)):
        pts = [
            (r["step"], _num(r["layers"][i].get(key)))
            for r in routing
            if i < len(r.get("layers", [])) and _num(r["layers"][i].get(key)) is not None
        ]
        if pts:
            traces.append(
                {
                    "type": "scatter",
                    "mode": "lines",
                    "name": f"layer {i}",
                    "x": [p[0] for p in pts],
                    "y": [p[1] for p in pts],
                }
            )
    return traces


def expert_load_heatmap(
    routing: list[dict[str, Any]], layer: int = 0, train: list[dict[str, Any]] | None = None
) -> Fig:
    """Load fraction of each expert (rows) over steps (columns) for one layer.

    Uses ``routing.jsonl`` records; falls back to the ``expert_load`` field of ``metrics.jsonl`` lines.
    """
    steps, cols = [], []
    for r in routing:
        layers = r.get("layers", [])
        if layer < len(layers) and layers[layer].get("load_fractions"):
            steps.append(r["step"])
            cols.append(layers[layer]["load_fractions"])
    if not cols and train:
        for r in train:
            load = r.get("expert_load")
            if isinstance(load, list) and layer < len(load) and isinstance(load[layer], list):
                steps.append(r["step"])
                cols.append(load[layer])
    n_e = max((len(c) for c in cols), default=0)
    z = [[(c[e] if e < len(c) else None) for c in cols] for e in range(n_e)]
    trace = {
        "type": "heatmap",
        "x": steps,
        "y": list(range(n_e)),
        "z": z,
        "colorscale": "Viridis",
        "colorbar": {"title": {"text": "load"}},
        "name": f"layer {layer}",
    }
    return {
        "data": [trace] if cols else [],
        "layout": {
            **_layout(f"Expert load, layer {layer}"),
            "yaxis": {"title": {"text": "expert"}, "dtick": 1},
        },
    }


def entropy_figure(routing: list[dict[str, Any]]) -> Fig:
    """Mean router entropy normalised by log E (1 = uniform router probabilities), per layer."""
    layout = _layout("Router entropy (normalised)", ytitle="entropy / log E")
    return {"data": _layer_series(routing, "entropy_normalized"), "layout": layout}


def load_balance_figure(routing: list[dict[str, Any]]) -> Fig:
    """Coefficient of variation of the expert loads per layer (0 = perfectly balanced) and load variance."""
    cv = _layer_series(routing, "cv")
    var = _layer_series(routing, "load_variance")
    for t in var:
        t.update(name=f"{t['name']} variance", yaxis="y2", line={"dash": "dot"})
    layout = _layout("Load balance", ytitle="coefficient of variation")
    layout["yaxis2"] = {"title": {"text": "load variance"}, "overlaying": "y", "side": "right"}
    return {"data": cv + var, "layout": layout}


def drop_rate_figure(routing: list[dict[str, Any]]) -> Fig:
    """Fraction of chosen slots dropped by capacity, per layer."""
    return {
        "data": _layer_series(routing, "drop_rate"),
        "layout": _layout("Token drop rate", ytitle="drop rate"),
    }


def co_selection_figure(matrix: list[list[int]] | list[list[float]], layer: int = 0) -> Fig:
    """Heatmap of the ``[E, E]`` co-selection counts (tokens choosing both experts)."""
    n = len(matrix)
    trace = {
        "type": "heatmap",
        "z": matrix,
        "x": list(range(n)),
        "y": list(range(n)),
        "colorscale": "Blues",
        "colorbar": {"title": {"text": "tokens"}},
    }
    layout = _layout(f"Expert co-selection, layer {layer}", "expert", "expert")
    layout["xaxis"]["dtick"] = layout["yaxis"]["dtick"] = 1
    return {"data": [trace], "layout": layout}


def specialization_figure(
    matrix: list[list[float]], labels: list[str], layer: int = 0, nmi: float | None = None
) -> Fig:
    """Heatmap label x expert (share of each label's tokens routed to each expert)."""
    title = f"Specialisation, layer {layer}" + (f" (NMI {nmi:.3f})" if nmi is not None else "")
    n_e = len(matrix[0]) if matrix else 0
    trace = {
        "type": "heatmap",
        "z": matrix,
        "x": list(range(n_e)),
        "y": [str(x) for x in labels],
        "colorscale": "Viridis",
        "colorbar": {"title": {"text": "share"}},
    }
    layout = _layout(title, "expert", "label")
    layout["xaxis"]["dtick"] = 1
    return {"data": [trace], "layout": layout}


def table_figure(header: list[str], rows: list[list[Any]], title: str = "") -> Fig:
    """A plotly table (columns from ``rows``)."""
    cols = [[row[i] for row in rows] for i in range(len(header))]
    trace = {"type": "table", "header": {"values": header}, "cells": {"values": cols}}
    layout = {"title": {"text": title}, "margin": {"l": 10, "r": 10, "t": 40, "b": 10}}
    return {"data": [trace], "layout": layout}


def cost_figure(summary: dict[str, Any]) -> Fig:
    """Bars of the cost summary: params (total vs active) and memory parts (GiB).

    ``summary`` is :meth:`moe_lab.analytics.cost.CostSummary.to_dict`.
    """
    params = summary.get("params", {})
    memory = summary.get("memory", {})
    gib = 1024**3
    mem_keys = [k for k in ("weights", "gradients", "optimizer", "activations", "kv_cache") if k in memory]
    data = [
        {
            "type": "bar",
            "name": "parameters (M)",
            "x": ["total", "active"],
            "y": [params.get("total", 0) / 1e6, params.get("active", 0) / 1e6],
            "xaxis": "x",
            "yaxis": "y",
        },
        {
            "type": "bar",
            "name": "memory (GiB)",
            "x": mem_keys,
            "y": [memory[k] / gib for k in mem_keys],
            "xaxis": "x2",
            "yaxis": "y2",
        },
    ]
    layout = _layout("Cost summary", "", "parameters (M)")
    layout.update(
        xaxis={"domain": [0, 0.42]},
        xaxis2={"domain": [0.58, 1], "anchor": "y2"},
        yaxis2={"anchor": "x2", "title": {"text": "memory (GiB)"}},
    )
    return {"data": data, "layout": layout}


# ---------------------------------------------------------------------------------------------- PNG output
def _title(layout: dict[str, Any], key: str) -> str:
    t = layout.get(key, {}).get("title", "") if key != "title" else layout.get("title", "")
    return str(t.get("text", "")) if isinstance(t, dict) else str(t or "")


def figure_to_matplotlib(fig: Fig) -> Any:
    """A ``matplotlib.figure.Figure`` drawing the same data (scatter, bar, heatmap and table traces).

    Uses the object API (no pyplot state), so it is safe in servers and threads.
    """
    from matplotlib.figure import Figure

    layout = fig.get("layout", {})
    data = fig.get("data", [])
    mfig = Figure(figsize=(8, 4.5), dpi=100)
    two_panels = any(t.get("xaxis") == "x2" for t in data)
    ax = mfig.add_subplot(1, 2, 1) if two_panels else mfig.add_subplot(1, 1, 1)
    ax2_panel = mfig.add_subplot(1, 2, 2) if two_panels else None
    twin = None
    for trace in data:
        kind = trace.get("type", "scatter")
        target = ax2_panel if trace.get("xaxis") == "x2" and ax2_panel is not None else ax
        if trace.get("yaxis") == "y2" and not two_panels:
            twin = twin or ax.twinx()
            target = twin
        if kind == "scatter":
            style = "--" if trace.get("line", {}).get("dash") else "-"
            marker = "o" if "markers" in trace.get("mode", "") else None
            target.plot(trace.get("x", []), trace.get("y", []), style, marker=marker, label=trace.get("name"))
        elif kind == "bar":
            target.bar([str(x) for x in trace.get("x", [])], trace.get("y", []), label=trace.get("name"))
            target.set_title(trace.get("name", ""))
        elif kind == "heatmap":
            z = [[float("nan") if v is None else v for v in row] for row in trace.get("z", [])]
            if z and z[0]:
                im = target.imshow(z, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis")
                mfig.colorbar(im, ax=target)
                xs = trace.get("x")
                if xs and len(xs) <= 20:
                    target.set_xticks(range(len(xs)), [str(x) for x in xs])
                ys = trace.get("y")
                if ys and len(ys) <= 40:
                    target.set_yticks(range(len(ys)), [str(y) for y in ys])
        elif kind == "table":
            header = trace.get("header", {}).get("values", [])
            cols = trace.get("cells", {}).get("values", [])
            rows = [list(r) for r in zip(*cols)] if cols else []
            ax.axis("off")
            if rows:
                tbl = ax.table(cellText=[[str(c) for c in r] for r in rows], colLabels=header, loc="center")
                tbl.auto_set_font_size(False)
                tbl.set_fontsize(8)
    if two_panels:
        mfig.suptitle(_title(layout, "title"))
        for a in (ax, ax2_panel):
            if a is not None:
                a.tick_params(axis="x", labelrotation=20)
    else:
        ax.set_title(_title(layout, "title"))
    if not two_panels:
        ax.set_xlabel(_title(layout, "xaxis"))
        ax.set_ylabel(_title(layout, "yaxis"))
    if twin is not None:
        twin.set_ylabel(_title(layout, "yaxis2"))
    if any(t.get("type") == "scatter" for t in data):
        handles = ax.get_legend_handles_labels()[0] + (twin.get_legend_handles_labels()[0] if twin else [])
        if handles:
            ax.legend(handles=handles, fontsize=8, loc="best")
    if not data:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    mfig.tight_layout()
    return mfig


def save_png(fig: Fig, path: str | os.PathLike[str]) -> str:
    """Render ``fig`` with matplotlib (Agg) to a PNG at ``path``; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    mfig = figure_to_matplotlib(fig)
    FigureCanvasAgg(mfig)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    mfig.savefig(path, format="png")
    return str(path)
