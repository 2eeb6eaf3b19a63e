"""The report renders in headless Chromium from a file:// URL with no network request at all."""

from __future__ import annotations

import json
import shutil

import pytest
from _analytics_helpers import random_decision

from moe_lab.analytics import RouterMonitor, build_report

pytestmark = pytest.mark.browser


def _launch(p):
    try:
        return p.chromium.launch()
    except Exception:  # playwright's own browser not installed: use the system Chromium
        exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if exe is None:
            pytest.skip("no Chromium: run `playwright install chromium`")
        return p.chromium.launch(executable_path=exe, args=["--no-sandbox"])


def test_report_renders_offline(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    monitor = RouterMonitor()
    lines = []
    for step in range(1, 6):
        monitor.observe([random_decision(32, 4, 2, seed=step)], step=step)
        lines.append(json.dumps({"step": step, "loss": 3.0 / step, "expert_load": [[0.25] * 4]}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "routing.jsonl").write_text("".join(json.dumps(h.to_dict()) + "\n" for h in monitor.history))
    report = build_report(tmp_path)
    with sync_api.sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page()
            requests, errors = [], []
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(report.as_uri())
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length > 0")
            ids = page.evaluate("[...document.querySelectorAll('.js-plotly-plot')].map(e => e.id)")
        finally:
            browser.close()
    assert errors == []
    assert [u for u in requests if not u.startswith("file://")] == []
    assert {"loss-curves", "expert-load-0", "router-entropy", "drop-rate"} <= set(ids)
