"""One self-contained HTML report per run (works offline: plotly.js is inlined, no external URL at all),
and optionally the same figures as PNG files.

Example:
    >>> from moe_lab.analytics.report import build_report
    >>> path = build_report("runs/demo", png_dir="runs/demo/reports/png")  # doctest: +SKIP
    >>> path.name  # doctest: +SKIP
    'report.html'
"""

from __future__ import annotations

import html
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from moe_lab.analytics import plots
from moe_lab.analytics.records import RunData, load_run
from moe_lab.config import atomic_write_text

__all__ = ["FigureSpec", "build_report", "report_figures", "routing_summary_rows"]

FigureSpec = tuple[str, str, dict[str, Any]]  # (element id, section title, plotly figure dict)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1f2328}
header{background:#24292f;color:#fff;padding:16px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9d1d9;font-size:13px}main{padding:16px 32px;max-width:1200px;margin:auto}
section{background:#fff;border:1px solid #d0d7de;border-radius:6px;margin:16px 0;padding:12px 16px}
section h2{font-size:16px;margin:4px 0 8px}.fig{width:100%;height:420px}
table.kv{border-collapse:collapse;font-size:13px}table.kv td,table.kv th{border:1px solid #d0d7de;padding:4px 8px}
nav a{margin-right:12px;font-size:13px}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def routing_summary_rows(routing: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows ``[layer, tokens, cv, max/mean, entropy/log E, drop rate]`` of the last routing record."""
    if not routing:
        return []
    rows = []
    for i, s in enumerate(routing[-1].get("layers", [])):
        rows.append(
            [
                s.get("name", f"layer{i}"),
                s.get("num_tokens"),
                _fmt(s.get("cv")),
                _fmt(s.get("max_mean_ratio")),
                _fmt(s.get("entropy_normalized")),
                _fmt(s.get("drop_rate")),
            ]
        )
    return rows


def _cost_summary(run: RunData) -> dict[str, Any] | None:
    model_cfg = run.config.get("model")
    if not isinstance(model_cfg, dict):
        return None
    from moe_lab.analytics.cost import MoECostAnalyzer
    from moe_lab.models import ModelConfig

    try:
        cfg = ModelConfig.from_dict(model_cfg)
    except ValueError as err:  # ConfigError: an old or foreign config; the rest of the report still works
        warnings.warn(f"{run.path / 'config.yaml'}: no cost section ({err})", stacklevel=3)
        return None
    train = run.config.get("train", {}) if isinstance(run.config.get("train"), dict) else {}
    data = run.config.get("data", {}) if isinstance(run.config.get("data"), dict) else {}
    batch = int(train.get("batch_size", 8))
    seq = int(data.get("seq_len", 0) or cfg.max_seq_len)
    return MoECostAnalyzer(cfg).summary(batch=batch, seq_len=seq).to_dict()


def report_figures(
    run: RunData, *, specialization: Any = None, cost: dict[str, Any] | None = None
) -> list[FigureSpec]:
    """Every figure of the report, as ``(id, title, figure dict)`` (also what the dashboard can show)."""
    figs: list[FigureSpec] = []
    if run.train or run.eval:
        figs.append(("loss-curves", "Loss", plots.loss_figure(run.train, run.eval)))
    if run.eval:
        figs.append(("eval-curves", "Evaluation", plots.eval_figure(run.eval)))
    n_layers = plots.routing_layers(run.routing)
    if not n_layers:
        n_layers = max(
            (len(r["expert_load"]) for r in run.train if isinstance(r.get("expert_load"), list)), default=0
        )
    for i in range(n_layers):
        figs.append(
            (
                f"expert-load-{i}",
                f"Expert load, layer {i}",
                plots.expert_load_heatmap(run.routing, i, train=run.train),
            )
        )
    if run.routing:
        figs.append(("router-entropy", "Router entropy", plots.entropy_figure(run.routing)))
        figs.append(("load-balance", "Load balance (cv, variance)", plots.load_balance_figure(run.routing)))
        figs.append(("drop-rate", "Token drop rate", plots.drop_rate_figure(run.routing)))
        rows = routing_summary_rows(run.routing)
        header = ["layer", "tokens", "cv", "max/mean", "entropy/log E", "drop rate"]
        figs.append(("routing-table", "Routing summary (last step)", plots.table_figure(header, rows)))
        last_co: dict[int, Any] = {}
        for r in run.routing:
            for i, s in enumerate(r.get("layers", [])):
                if s.get("co_selection"):
                    last_co[i] = s["co_selection"]
        for i, m in sorted(last_co.items()):
            figs.append(
                (f"co-selection-{i}", f"Expert co-selection, layer {i}", plots.co_selection_figure(m, i))
            )
    if specialization is not None:
        spec = specialization.to_dict() if hasattr(specialization, "to_dict") else dict(specialization)
        for i, counts in enumerate(spec["counts"]):
            shares = [[x / max(1, sum(row)) for x in row] for row in counts]
            figs.append(
                (
                    f"specialization-{i}",
                    f"Specialisation, layer {i}",
                    plots.specialization_figure(shares, spec["labels"], i, spec["nmi"][i]),
                )
            )
        rows = [[f"layer {i}", _fmt(v)] for i, v in enumerate(spec["nmi"])]
        figs.append(
            (
                "specialization-table",
                "Specialisation (NMI label vs expert)",
                plots.table_figure(["layer", "NMI"], rows),
            )
        )
    if cost is not None:
        figs.append(("cost-summary", "Cost summary", plots.cost_figure(cost)))
        thr = [
            [t["hardware"], t["mode"], f"{t['tokens_per_s']:.4g}", t["bound"], t["fits_in_memory"]]
            for t in cost.get("throughput", [])
        ]
        figs.append(
            (
                "throughput-table",
                "Estimated training throughput (roofline, MFU 0.4)",
                plots.table_figure(["hardware", "mode", "tokens/s", "bound", "fits"], thr),
            )
        )
    return figs


def _kv_table(items: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in items.items()
        if not isinstance(v, (dict, list))
    )
    return f'<table class="kv">{rows}</table>' if rows else "<p>none</p>"


def _script_json(obj: Any) -> str:
    """JSON safe to embed in a <script> element."""
    return json.dumps(obj, allow_nan=False).replace("</", "<\\/")


def render_html(run: RunData, figs: list[FigureSpec], title: str | None = None) -> str:
    """The report page: header, summary and config tables, one section per figure, inlined plotly.js."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError as err:
        raise ImportError(f"the HTML report inlines plotly.js: pip install 'moe-lab[viz]' ({err})") from err

    title = title or f"moe-lab report: {run.name}"
    nav = "".join(f'<a href="#sec-{fid}">{html.escape(t)}</a>' for fid, t, _ in figs)
    sections = "".join(
        f'<section id="sec-{fid}"><h2>{html.escape(t)}</h2><div class="fig" id="{fid}"></div></section>'
        for fid, t, _ in figs
    )
    model = run.config.get("model", {}) if isinstance(run.config.get("model"), dict) else {}
    payload = _script_json([{"id": fid, "data": f["data"], "layout": f["layout"]} for fid, _, f in figs])
    plotly_js = get_plotlyjs().replace("</script", "<\\/script")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body><header><h1>{html.escape(title)}</h1><p>{html.escape(str(run.path))} &middot; generated {stamp}
&middot; {len(run.train)} train lines, {len(run.eval)} eval lines, {len(run.routing)} routing records</p></header>
<main><nav>{nav}</nav>
<section id="sec-summary"><h2>Summary</h2>{_kv_table(run.summary)}</section>
<section id="sec-model"><details><summary><b>Model config</b></summary>{_kv_table(model)}</details></section>
{sections}
</main>
<script id="plotly-js">{plotly_js}</script>
<script id="report-figures" type="application/json">{payload}</script>
<script>
(function(){{
  var figs = JSON.parse(document.getElementById("report-figures").textContent);
  var cfg = {{responsive: true, displaylogo: false, showLink: false, showSendToCloud: false}};
  figs.forEach(function(f){{ Plotly.newPlot(f.id, f.data, f.layout, cfg); }});
}})();
</script></body></html>
"""


def _sanitize(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


def build_report(
    run_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    png_dir: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
    specialization: Any = None,
    include_cost: bool = True,
) -> Path:
    """Write ``RUN_DIR/reports/report.html`` (or ``out_path``) and, with ``png_dir``, one PNG per figure.

    ``specialization``: a :class:`~moe_lab.analytics.analyzer.SpecializationResult` (or its dict) to include;
    without it ``RUN_DIR/reports/specialization.json`` is used when present. The cost section needs the
    ``model`` section of ``config.yaml``. Returns the HTML path. Raises ``FileNotFoundError`` /
    :class:`~moe_lab.analytics.records.RunDirError` for a missing or unreadable run directory.
    """
    run = load_run(run_dir)
    if specialization is None:
        spec_path = run.path / "reports" / "specialization.json"
        if spec_path.is_file():
            specialization = json.loads(spec_path.read_text(encoding="utf-8"))
    cost = _cost_summary(run) if include_cost else None
    figs = [
        (fid, t, _sanitize(f)) for fid, t, f in report_figures(run, specialization=specialization, cost=cost)
    ]
    out = Path(out_path) if out_path is not None else run.path / "reports" / "report.html"
    atomic_write_text(out, render_html(run, figs, title))
    if png_dir is not None:
        for fid, _, fig in figs:
            plots.save_png(fig, Path(png_dir) / f"{fid}.png")
    return out
