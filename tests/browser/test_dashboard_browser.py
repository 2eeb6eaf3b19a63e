"""The dashboard in headless Chromium while a real (tiny) training run writes its run directory.

Starts ``moe-lab train --preset tiny`` and ``moe-lab dashboard`` on 127.0.0.1 (free port) in subprocesses,
opens the page with Playwright driving Debian's ``/usr/bin/chromium``, checks that the run is listed, that
the expert-load heatmap is a plotly chart with data, and that the page shows a newer step as training goes
on. Saves ``test-artifacts/dashboard-live.png``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(420)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(
    predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"{what}: process exited with {proc.returncode}\n{tail}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def _shown_step(page) -> int:
    m = re.search(r"step (\d+)", page.locator("#run-step").inner_text())
    return int(m.group(1)) if m else -1


def test_dashboard_follows_a_live_training_run(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    runs = tmp_path / "runs"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "MOE_LAB_DASHBOARD_POLL_MS": "400",
        "MOE_LAB_DASHBOARD_SYNC_S": "0.2",
    }
    train_log, dash_log = tmp_path / "train.log", tmp_path / "dashboard.log"
    # many steps: the run is still going while the page watches it; it is stopped at the end
    train_cmd = [
        sys.executable,
        "-m",
        "moe_lab",
        "train",
        "--preset",
        "tiny",
        "--name",
        "live",
        "--runs-dir",
        str(runs),
        "--quiet",
        "--set",
        "train.max_steps=5000",
        "--set",
        "train.batch_size=2",
        "--set",
        "data.seq_len=32",
        "--set",
        "train.eval_every=5",
        "--set",
        "train.eval_batches=1",
        "--set",
        "train.save_final_checkpoint=false",
        "--set",
        "train.num_threads=1",
    ]
    port = _free_port()
    with train_log.open("w") as tl, dash_log.open("w") as dl:
        trainer = subprocess.Popen(train_cmd, stdout=tl, stderr=subprocess.STDOUT, env=env)
        dashboard = None
        try:
            metrics = runs / "live" / "metrics.jsonl"
            _wait(lambda: _lines(metrics) >= 2, 240, "the first training steps", trainer, train_log)
            broken = runs / "broken"  # a corrupt run directory next to the live one
            broken.mkdir()
            (broken / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{oops\n')
            dashboard = subprocess.Popen(
                [sys.executable, "-m", "moe_lab", "dashboard", "--runs", str(runs), "--port", str(port)],
                stdout=dl,
                stderr=subprocess.STDOUT,
                env=env,
            )
            _wait(lambda: _port_open(port), 60, "the dashboard to listen", dashboard, dash_log)
            with sync_api.sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
                try:
                    page = browser.new_page(viewport={"width": 1400, "height": 1200})
                    errors: list[str] = []
                    page.on("pageerror", lambda e: errors.append(str(e)))
                    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
                    requested: list[str] = []
                    page.on("request", lambda r: requested.append(r.url))
                    page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=60_000)

                    item = page.locator("#run-list li[data-run-id]", has_text="live")
                    item.wait_for(timeout=30_000)
                    item.click()
                    page.wait_for_function(
                        "() => document.getElementById('run-title').textContent === 'live'", timeout=30_000
                    )
                    page.wait_for_selector("#heatmap-0 .main-svg", timeout=60_000)
                    n_cells = page.evaluate(
                        """() => {
                            const d = document.getElementById('heatmap-0');
                            if (!d || !d.data || !d.data.length || d.data[0].type !== 'heatmap') return 0;
                            return d.data[0].z.reduce((n, row) => n + row.filter((v) => v !== null).length, 0);
                        }"""
                    )
                    assert n_cells >= 2 * 4  # tiny preset: 4 experts, at least 2 steps
                    loss_points = page.evaluate(
                        "() => document.getElementById('chart-loss').data[0].y.length"
                    )
                    assert loss_points >= 2

                    first = _shown_step(page)
                    assert first >= 2
                    # columns are steps (subsampled to at most 400 when a run is longer): track the newest one
                    last_column = "(() => { const x = document.getElementById('heatmap-0').data[0].x; return Number(x[x.length - 1]); })()"
                    first_column = page.evaluate(last_column)
                    page.wait_for_function(
                        f"""() => {{
                            const m = /step (\\d+)/.exec(document.getElementById('run-step').textContent);
                            return m && Number(m[1]) > {first};
                        }}""",
                        timeout=180_000,
                    )
                    later = _shown_step(page)
                    assert later > first
                    # the heatmap grew with the run
                    page.wait_for_function(f"() => {last_column} > {first_column}", timeout=60_000)
                    ARTIFACTS.mkdir(exist_ok=True)
                    page.screenshot(path=str(ARTIFACTS / "dashboard-live.png"), full_page=True)

                    # the corrupt run shows what is wrong instead of a blank page
                    page.locator("#run-list li[data-run-id]", has_text="broken").click()
                    banner = page.locator("#run-problems .banner.error", has_text="line 2 is not valid JSON")
                    banner.wait_for(timeout=30_000)
                    assert "metrics.jsonl:2" in banner.inner_text()
                    page.screenshot(path=str(ARTIFACTS / "dashboard-corrupt-run.png"), full_page=False)

                    page.click("#tab-compare")
                    page.wait_for_selector("#cmp-heat-a .main-svg", timeout=30_000)
                    assert errors == [], errors
                    assert all(
                        u.startswith(f"http://127.0.0.1:{port}/") or u.startswith("data:") for u in requested
                    )
                finally:
                    browser.close()
        finally:
            if dashboard is not None:
                _stop(dashboard)
            _stop(trainer)
