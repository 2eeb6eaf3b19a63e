"""Dashboard JSON API on synthetic run directories (FastAPI TestClient)."""

from __future__ import annotations

import inspect
import json

import pytest
from fastapi.testclient import TestClient

from moe_lab.dashboard import DashboardSettings, create_app, serve
from moe_lab.dashboard.service import subsample
from moe_lab.tracking import RunStore


@pytest.fixture
def client(runs_dir):
    app = create_app(DashboardSettings(runs_dir=runs_dir, sync_interval_s=0))
    with TestClient(app) as c:
        yield c


def _ids(client) -> dict[str, int]:
    return {r["name"]: r["id"] for r in client.get("/api/runs").json()["runs"]}


def test_list_and_detail(client, runs_dir):
    body = client.get("/api/runs").json()
    assert body["problems"] == []
    runs = {r["name"]: r for r in body["runs"]}
    assert set(runs) == {"alpha", "beta"}
    a = runs["alpha"]
    assert a["last_step"] == 12 and a["total_steps"] == 100 and a["status"] == "running"
    assert a["latest"]["loss"] == pytest.approx(5.0 / 12**0.5)
    assert a["latest"]["eval_loss"] == pytest.approx(4.0 / 10**0.5)
    detail = client.get(f"/api/runs/{a['id']}").json()
    assert detail["config"] == {"model": {"num_experts": 4}, "train": {"max_steps": 100}}
    assert (detail["num_layers"], detail["num_experts"]) == (2, 4)
    assert "loss" in detail["metric_keys"] and "expert_load" not in detail["metric_keys"]
    assert (runs_dir / "runs.db").is_file()  # the import lands next to the runs


def test_metrics_since_step_sees_new_lines(client, runs_dir):
    rid = _ids(client)["alpha"]
    first = client.get(f"/api/runs/{rid}/metrics", params={"since_step": 10, "keys": "loss,lr"}).json()
    assert first["metrics"]["loss"]["steps"] == [11, 12] and set(first["metrics"]) == {"loss", "lr"}
    with (runs_dir / "alpha" / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": 13, "loss": 1.0, "expert_load": [[0.25] * 4, [0.25] * 4]}) + "\n")
    new = client.get(f"/api/runs/{rid}/metrics", params={"since_step": 12}).json()
    assert new["last_step"] == 13 and new["metrics"]["loss"] == {"steps": [13], "values": [1.0]}
    assert new["eval"] == {}


def test_routing_heatmap_data(client):
    rid = _ids(client)["alpha"]
    body = client.get(f"/api/runs/{rid}/routing").json()
    assert body["steps"] == list(range(1, 13)) and len(body["layers"]) == 2
    z = body["layers"][1]["z"]
    assert len(z) == 4 and len(z[0]) == 12
    assert sum(z[e][0] for e in range(4)) == pytest.approx(1.0)
    small = client.get(f"/api/runs/{rid}/routing", params={"max_points": 5}).json()
    assert len(small["steps"]) <= 6 and small["steps"][-1] == 12


def test_figures_have_data(client):
    rid = _ids(client)["alpha"]
    body = client.get(f"/api/runs/{rid}/figures").json()
    f = body["figures"]
    assert [t["name"] for t in f["loss"]["data"]][:2] == ["loss", "lm_loss"]
    assert len(f["heatmaps"]) == 2 and f["heatmaps"][0]["data"][0]["type"] == "heatmap"
    assert len(f["heatmaps"][0]["data"][0]["z"]) == 4 and len(f["heatmaps"][0]["data"][0]["x"]) == 12
    assert f["eval"]["data"][0]["x"] == [5, 10]
    assert f["balance"]["data"] and f["entropy"]["data"] and f["drop_rate"]["data"]
    assert "router entropy not logged" in f["entropy"]["layout"]["title"]["text"]


def test_compare_two_runs(client):
    ids = _ids(client)
    body = client.get("/api/compare", params={"a": ids["alpha"], "b": ids["beta"]}).json()
    assert body["a"]["name"] == "alpha" and body["b"]["name"] == "beta"
    rows = {r["metric"]: r for r in body["table"]}
    assert rows["loss"]["diff"] == pytest.approx(5.0 / 8**0.5 - 5.0 / 12**0.5)
    names = [t["name"] for t in body["figures"]["loss"]["data"]]
    assert "alpha: loss" in names and "beta: loss" in names
    assert len(body["figures"]["heatmaps"]["a"]) == 2 and len(body["figures"]["heatmaps"]["b"]) == 2


def test_partial_and_corrupt_run_dirs_give_structured_problems(client, runs_dir):
    with (runs_dir / "alpha" / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 13, "loss": 0.')  # being written
    bad = runs_dir / "broken"
    bad.mkdir()
    (bad / "metrics.jsonl").write_bytes(b'\x00\xff garbage\n{"step": 1, "loss": 2.0}\n')
    (bad / "config.yaml").write_text("model: [\n")
    runs = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
    assert [p["kind"] for p in runs["alpha"]["problems"]] == ["partial_line"]
    assert runs["alpha"]["last_step"] == 12
    kinds = {p["kind"] for p in runs["broken"]["problems"]}
    assert kinds == {"bad_config", "bad_json"}
    # every per-run answer carries the problems, and nothing is a 500
    for path in ("", "/metrics", "/routing", "/figures"):
        r = client.get(f"/api/runs/{runs['broken']['id']}{path}")
        assert r.status_code == 200, path
        assert {p["kind"] for p in r.json()["problems"]} == kinds
    fig = client.get(f"/api/runs/{runs['alpha']['id']}/figures").json()
    assert fig["problems"][0]["message"].startswith("the last line of metrics.jsonl is incomplete")
    assert fig["problems"][0]["line"] == 15


def test_errors_are_json(client, tmp_path):
    r = client.get("/api/runs/9999")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/api/runs/abc")
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_request"
    r = client.get("/api/compare", params={"a": 1})
    assert r.status_code == 422 and "b" in r.json()["error"]["message"]
    assert client.get("/api/nope").json()["error"]["code"] == "http_error"


def test_missing_runs_dir_is_reported(tmp_path):
    app = create_app(DashboardSettings(runs_dir=tmp_path / "not-there"))
    with TestClient(app) as c:
        body = c.get("/api/runs").json()
    assert body["runs"] == [] and body["problems"][0]["kind"] == "missing"


def test_store_only_mode(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    store = RunStore(url)
    rid = store.create_run("from-exporter")
    store.log_step(rid, 1, {"loss": 2.0}, loads=[[0.5, 0.5]])
    store.log_layer_stats(rid, 1, [{"entropy_normalized": 0.9}])
    with TestClient(create_app(DashboardSettings(store_url=url))) as c:
        body = c.get("/api/runs").json()
        assert [r["name"] for r in body["runs"]] == ["from-exporter"]
        figs = c.get(f"/api/runs/{rid}/figures").json()["figures"]
        assert figs["entropy"]["data"][0]["y"] == [0.9]
        assert c.get("/api/health").json()["store"] == url


def test_page_assets_are_local(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    assert "/static/vendor/plotly.min.js" in page.text
    js = client.get("/static/vendor/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000 and b"plotly" in js.content[:2000].lower()
    assert client.get("/static/app.js").status_code == 200
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_default_host_is_loopback(monkeypatch):
    assert DashboardSettings().host == "127.0.0.1"
    assert DashboardSettings.from_env({}).host == "127.0.0.1"
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    from moe_lab.cli.main import build_parser

    args = build_parser().parse_args(["dashboard", "--runs", "x"])
    assert args.host == "127.0.0.1" and args.port == 8080
    env = DashboardSettings.from_env({"MOE_LAB_DASHBOARD_PORT": "9001", "MOE_LAB_DASHBOARD_HOST": "0.0.0.0"})
    assert (env.host, env.port) == ("0.0.0.0", 9001)


def test_settings_hide_the_store_password():
    s = DashboardSettings.from_env({"MOE_LAB_DASHBOARD_STORE_URL": "postgresql+psycopg://u:hunter2@h/db"})
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.to_dict())
    assert s.resolved_store_url().endswith("u:hunter2@h/db")
    with pytest.raises(ValueError, match="port"):
        DashboardSettings.from_env({"MOE_LAB_DASHBOARD_PORT": "99999"})


def test_cli_errors(tmp_path, capsys):
    from moe_lab.cli.main import main

    assert main(["dashboard", "--runs", str(tmp_path / "missing")]) == 2
    assert "runs directory not found" in capsys.readouterr().err
    assert main(["dashboard", "--store", "mysql://u:pw@h/db"]) == 2
    err = capsys.readouterr().err
    assert "unsupported run store backend" in err and "pw@" not in err


def test_subsample():
    assert subsample(5, 10) == [0, 1, 2, 3, 4]
    idx = subsample(1001, 100)
    assert len(idx) <= 101 and idx[0] == 0 and idx[-1] == 1000 and idx == sorted(set(idx))
