"""HTML report (self-contained, offline), PNG export, visualizer and `moe-lab report`."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from _analytics_helpers import random_decision

from moe_lab.analytics import (
    RouterMonitor,
    TrainingVisualizer,
    build_report,
    load_run,
    loss_figure,
    save_png,
)
from moe_lab.analytics.records import RunDirError, read_jsonl
from moe_lab.cli.main import main
from moe_lab.models import get_preset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_dir(tmp_path):
    """A fake run directory as the trainer and the router-monitor callback write it."""
    path = tmp_path / "demo"
    path.mkdir()
    monitor = RouterMonitor()
    metrics, routing = [], []
    for step in range(1, 13):
        monitor.observe(
            [random_decision(64, 4, 2, seed=step), random_decision(64, 4, 2, seed=100 + step)], step=step
        )
        rec = monitor.history[-1].to_dict()
        if step % 6 == 0:
            for i, layer in enumerate(monitor.get_stats().layers):
                rec["layers"][i]["co_selection"] = layer.co_selection
        routing.append(rec)
        metrics.append(
            {
                "step": step,
                "loss": 5.0 - 0.2 * step,
                "lm_loss": 4.9 - 0.2 * step,
                "aux_loss": 0.01,
                "z_loss": 0.001,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "tokens_per_s": 1000.0,
                "expert_load": [s.load_fractions for s in monitor.history[-1].layers],
            }
        )
        if step % 4 == 0:
            metrics.append({"step": step, "split": "val", "eval_loss": 5.0 - 0.15 * step, "perplexity": 30.0})
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (path / "routing.jsonl").write_text("".join(json.dumps(r) + "\n" for r in routing))
    (path / "summary.json").write_text(json.dumps({"final_loss": 2.6, "steps": 12}))
    model = get_preset("tiny").to_dict()
    (path / "config.yaml").write_text(yaml.safe_dump({"model": model, "train": {"batch_size": 4}}))
    return path


def _outside_plotly(html: str) -> str:
    start = html.index('<script id="plotly-js">')
    end = html.index("</script>", start)
    return html[:start] + html[end:]


def test_report_is_self_contained(run_dir):
    out = build_report(run_dir)
    assert out == run_dir / "reports" / "report.html"
    html = out.read_text(encoding="utf-8")
    for fid in (
        "loss-curves",
        "eval-curves",
        "expert-load-0",
        "expert-load-1",
        "router-entropy",
        "load-balance",
        "drop-rate",
        "routing-table",
        "co-selection-0",
        "co-selection-1",
        "cost-summary",
        "throughput-table",
    ):
        assert f'id="{fid}"' in html, fid
    for title in ("Loss", "Expert load, layer 0", "Router entropy", "Token drop rate", "Cost summary"):
        assert title in html
    # nothing is loaded from the network: no external script/style/link anywhere in the document...
    lowered = html.lower()
    assert 'src="http' not in lowered and "src='http" not in lowered
    assert not re.search(r"<link[^>]+href=", lowered)
    assert not re.search(r"<script[^>]+src=", lowered)
    assert "@import" not in _outside_plotly(lowered)
    # ... and our own markup carries no URL or CDN reference (plotly.js itself is inlined verbatim; its
    # bundle holds inert default strings such as the topojson CDN, unused by the chart types we draw)
    ours = _outside_plotly(lowered)
    assert "http://" not in ours and "https://" not in ours and "cdn" not in ours
    assert "Plotly.newPlot" in html and len(html) > 1_000_000  # plotly.js inlined
    payload = html[html.index('type="application/json">') + len('type="application/json">') :]
    figs = json.loads(payload[: payload.index("</script>")])
    assert figs[0]["data"][0]["y"][0] == pytest.approx(4.8)


def test_png_export_and_custom_path(run_dir, tmp_path):
    out = build_report(run_dir, tmp_path / "r.html", png_dir=tmp_path / "png", include_cost=False)
    assert out.is_file()
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert "loss-curves.png" in pngs and "expert-load-1.png" in pngs and "cost-summary.png" not in pngs
    for p in (tmp_path / "png").iterdir():
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000


def test_metrics_only_run_uses_expert_load(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 3.0, "expert_load": [[0.5, 0.5]]})
        + "\n"
        + '{"step": 2, "loss": 2.9, "expert_lo'  # a line being written right now: ignored
    )
    run = load_run(tmp_path)
    assert len(run.train) == 1
    html = build_report(tmp_path).read_text()
    assert 'id="expert-load-0"' in html and 'id="router-entropy"' not in html


def test_corrupt_and_missing_run_dirs(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_run(tmp_path / "nope")
    with pytest.raises(RunDirError, match=r"no metrics\.jsonl"):
        load_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(RunDirError, match=r"metrics.jsonl:2"):
        read_jsonl(tmp_path / "metrics.jsonl")


def test_cli_report(run_dir, tmp_path, capsys):
    out = tmp_path / "cli.html"
    assert main(["report", str(run_dir), "-o", str(out), "--png", str(tmp_path / "p")]) == 0
    assert out.is_file() and (tmp_path / "p" / "loss-curves.png").is_file()
    assert str(out) in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text("[1, 2]\n{}\n")
    assert main(["report", str(bad)]) == 2
    assert "expected a JSON object" in capsys.readouterr().err


def test_visualizer_and_save_png(run_dir, tmp_path):
    from matplotlib.figure import Figure

    viz = TrainingVisualizer(run_dir)
    for fig in (
        viz.plot_training_curves(),
        viz.plot_eval_curves(),
        viz.plot_expert_load(layer=1),
        viz.plot_router_entropy(),
        viz.plot_load_balance(),
        viz.plot_drop_rate(),
    ):
        assert isinstance(fig, Figure) and fig.axes
    monitor = RouterMonitor()
    monitor.observe([random_decision(32, 4, 2, seed=0)], step=1)
    assert isinstance(viz.plot_co_selection(monitor.get_stats()), Figure)
    assert isinstance(TrainingVisualizer(monitor).plot_router_entropy(), Figure)
    path = save_png(loss_figure([{"step": 1, "loss": 1.0}]), tmp_path / "x.png")
    assert open(path, "rb").read(8) == PNG_MAGIC
    with pytest.raises(ValueError, match="no data"):
        TrainingVisualizer().plot_training_curves()


def test_report_with_specialization(run_dir):
    spec = {"labels": ["code", "prose"], "counts": [[[10, 0, 0, 0], [0, 5, 5, 0]]], "nmi": [0.8]}
    (run_dir / "reports").mkdir()
    (run_dir / "reports" / "specialization.json").write_text(json.dumps(spec))
    html = build_report(run_dir, include_cost=False).read_text()
    assert 'id="specialization-0"' in html and 'id="specialization-table"' in html
