"""RouterMonitor (hooks and callback) and the routing.jsonl trainer callback, on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from _analytics_helpers import random_decision

from moe_lab.analytics import RouterMonitor, RouterStats, router_stats
from moe_lab.analytics.monitor import find_moe_layers
from moe_lab.models import MoEModel
from moe_lab.train.callbacks.router_monitor import RouterMonitorCallback


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return MoEModel.from_preset("tiny").eval()


def test_hooks_count_what_the_model_returned(tiny):
    monitor = RouterMonitor()
    batches = [torch.randint(0, 256, (2, 12)) for _ in range(3)]
    outs = []
    with torch.no_grad(), monitor.track(tiny):
        for i, ids in enumerate(batches):
            outs.append(tiny(ids).routing)
            monitor.end_step(i)
    assert not any(m._forward_hooks for _, m in find_moe_layers(tiny))  # hooks removed
    stats = monitor.get_stats()
    assert len(stats.layers) == len(tiny.moe_layers()) == 2
    for layer, s in enumerate(stats.layers):
        expected = sum(out[layer].tokens_per_expert for out in outs)
        assert s.expert_counts == expected.tolist()
        assert s.num_tokens == 3 * 2 * 12
        assert s.co_selection is not None and sum(s.co_selection[e][e] for e in range(4)) == 3 * 2 * 12 * 2
    assert [h.step for h in monitor.history] == [0, 1, 2]
    for step, h in enumerate(monitor.history):  # each history entry equals the stats of that batch alone
        ref = router_stats(outs[step], with_co_selection=False)
        assert [s.expert_counts for s in h.layers] == [s.expert_counts for s in ref.layers]
        assert h.layers[0].entropy == pytest.approx(ref.layers[0].entropy)
    assert stats.layers[0].name == "layers.0.mlp"
    monitor.reset()
    assert monitor.get_stats().layers == [] and len(monitor.history) == 0


def test_padding_is_excluded_through_the_model(tiny):
    monitor = RouterMonitor()
    ids = torch.randint(0, 256, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad(), monitor.track(tiny):
        tiny(ids, attention_mask=mask)
    assert monitor.get_stats().layers[0].num_tokens == 16
    assert sum(monitor.get_stats().layers[0].expert_counts) == 16 * 2


def test_as_callback_and_observe():
    monitor = RouterMonitor(max_history=2)
    cb = monitor.as_callback()
    for step in range(1, 4):
        cb.on_routing(
            None, step, [random_decision(16, 4, 2, seed=step), random_decision(16, 4, 2, seed=9 + step)]
        )
    assert [h.step for h in monitor.history] == [2, 3]  # bounded history
    total = monitor.get_stats()
    assert total.num_tokens == sum(int(random_decision(16, 4, 2, seed=s).token_mask.sum()) for s in (1, 2, 3))
    with pytest.raises(ValueError, match="MoE layers"):
        monitor.observe([random_decision(16, 4, 2, seed=0)])


def test_track_rejects_a_dense_model():
    with pytest.raises(ValueError, match="no MoE layer"), RouterMonitor().track(torch.nn.Linear(2, 2)):
        pass


class _FakeRunDir:
    def __init__(self, path):
        self.path = path


class _FakeTrainer:
    def __init__(self, model, path):
        self.model = model
        self.run_dir = _FakeRunDir(path)
        self.summary_extra = {}


def test_callback_writes_routing_jsonl(tmp_path, tiny):
    trainer = _FakeTrainer(tiny, tmp_path)
    cb = RouterMonitorCallback(every=1, co_selection_every=2)
    cb.on_train_begin(trainer)
    decisions = []
    for step in range(1, 5):
        with torch.no_grad():
            routing = [d.detach() for d in tiny(torch.randint(0, 256, (2, 8))).routing]
        decisions.append(routing)
        cb.on_routing(trainer, step, routing)
    cb.on_train_end(trainer, None)
    lines = [json.loads(x) for x in (tmp_path / "routing.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert ["co_selection" in x["layers"][0] for x in lines] == [False, True, False, True]
    for line, routing in zip(lines, decisions):
        stats = RouterStats.from_dict(line)
        assert [s.expert_counts for s in stats.layers] == [d.tokens_per_expert.tolist() for d in routing]
        assert stats.layers[0].name == "layers.0.mlp"
    totals = cb.get_stats()
    assert totals.layers[1].expert_counts == sum(r[1].tokens_per_expert for r in decisions).tolist()
    assert "mean_cv" in trainer.summary_extra["routing"]


def test_callback_with_the_real_trainer(tmp_path):
    from moe_lab.train import MoETrainer

    torch.manual_seed(0)
    model = MoEModel.from_preset("tiny")
    cb = RouterMonitorCallback(every=2, co_selection_every=4)
    data = torch.randint(0, 256, (32, 16))
    MoETrainer(model, console=False, run_dir=tmp_path / "run", callbacks=[cb]).train(
        data, max_steps=4, batch_size=4
    )
    lines = [json.loads(x) for x in (tmp_path / "run" / "routing.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]
    assert "co_selection" in lines[1]["layers"][0]
    assert cb.get_stats().layers[0].num_tokens == 4 * 4 * 16


def test_hooks_count_once_with_activation_checkpointing():
    torch.manual_seed(0)
    model = MoEModel.from_preset("tiny").train()
    model.gradient_checkpointing = True
    monitor = RouterMonitor()
    ids = torch.randint(0, 256, (2, 8))
    with monitor.track(model):
        out = model(ids, labels=ids)
        out.loss.backward()  # recomputes each block's forward
    assert monitor.get_stats().layers[0].expert_counts == out.routing[0].tokens_per_expert.tolist()


def test_start_dashboard_mirrors_history_and_serves(tmp_path, monkeypatch):
    import threading

    import moe_lab.dashboard as dashboard
    from moe_lab.tracking import RunStore, sync_runs_dir

    calls = []
    served = threading.Event()

    def fake_serve(**kwargs):
        calls.append(kwargs)
        served.set()

    monkeypatch.setattr(dashboard, "serve", fake_serve)
    monitor = RouterMonitor()
    monitor.observe([random_decision(16, 4, 2, seed=0)], step=1)
    live = monitor.start_dashboard(port=8123, runs_dir=tmp_path)
    assert served.wait(5)
    assert calls == [{"runs_dir": str(tmp_path), "host": "127.0.0.1", "port": 8123}]
    assert live.url == "http://127.0.0.1:8123/" and live.run_dir == tmp_path / "live-monitor"
    monitor.observe([random_decision(16, 4, 2, seed=1)], step=2)
    lines = [json.loads(x) for x in (live.run_dir / "routing.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    # the run store (what the dashboard reads) imports the mirrored folder
    store = RunStore("sqlite://")
    sync_runs_dir(store, tmp_path)
    run = store.find_run("live-monitor")
    assert run is not None
    history = store.get_routing(run.id)
    assert history.steps == [1, 2] and history.num_experts == 4
