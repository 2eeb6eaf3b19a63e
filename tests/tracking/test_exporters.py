"""Exporter callbacks write their files offline: run store rows, a TensorBoard event file, a W&B offline run,
an MLflow SQLite store. A fake trainer drives the hooks (fast); one test runs the real trainer (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moe_lab.nn.router import RoutingDecision
from moe_lab.tracking import RunStore
from moe_lab.tracking.exporters import EXPORTERS, RunStoreCallback
from moe_lab.tracking.exporters.tensorboard import load_heatmap_image

STEPS, LAYERS, EXPERTS, TOKENS = 4, 2, 4, 16


def _decision(seed: int) -> RoutingDecision:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(TOKENS, EXPERTS, generator=g)
    probs = logits.softmax(-1)
    idx = probs.topk(1, dim=-1).indices
    return RoutingDecision(
        expert_indices=idx,
        combine_weights=torch.ones(TOKENS, 1),
        slot_mask=torch.ones(TOKENS, 1, dtype=torch.bool),
        dropped=torch.zeros(TOKENS, 1, dtype=torch.bool),
        router_logits=logits,
        router_probs=probs,
        tokens_per_expert=torch.bincount(idx.reshape(-1), minlength=EXPERTS),
        capacity=None,
        token_mask=None,
    )


class _Config:
    name = "fake"

    def to_dict(self):
        return {"max_steps": STEPS, "lr": 1e-3}


def _drive(callback, run_dir: Path) -> list[list[list[float]]]:
    """Run the callback through a fake training of STEPS steps with an eval at the end."""
    trainer = SimpleNamespace(
        run_dir=SimpleNamespace(path=run_dir), config=_Config(), run_config=None, total_steps=STEPS
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    callback.on_train_begin(trainer)
    all_loads = []
    for step in range(1, STEPS + 1):
        routing = [_decision(step * 10 + layer) for layer in range(LAYERS)]
        loads = [(d.tokens_per_expert.float() / TOKENS).tolist() for d in routing]
        all_loads.append(loads)
        callback.on_routing(trainer, step, routing)
        metrics = {
            "step": step,
            "loss": 5.0 - step,
            "lm_loss": 4.9 - step,
            "lr": 1e-3,
            "grad_norm": math.nan,
            "expert_load": loads,
            "drop_rate": 0.0,
        }
        callback.on_step_end(trainer, step, metrics)
    callback.on_eval_end(
        trainer, STEPS, {"step": STEPS, "split": "val", "eval_loss": 1.5, "perplexity": math.exp(1.5)}
    )
    callback.on_train_end(
        trainer, SimpleNamespace(to_dict=lambda: {"final_loss": 1.0, "steps": STEPS}, stopped_early=False)
    )
    return all_loads


def test_registry_names_resolve():
    """Every exporter is reachable by its short name through the trainer's callback registry."""
    import importlib

    from moe_lab.train.callbacks.registry import create_callback

    for name, path in EXPORTERS.items():
        module, _, attr = path.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        assert type(create_callback(name)) is cls, name
    assert type(create_callback({"name": "run_store", "every": 2})) is RunStoreCallback


def test_run_store_callback(tmp_path):
    run_dir = tmp_path / "runs" / "exp"
    loads = _drive(RunStoreCallback(), run_dir)
    store = RunStore(tmp_path / "runs" / "runs.db")  # default: <runs dir>/runs.db
    rec = store.get_run("exp")
    assert rec.status == "finished" and rec.summary == {"final_loss": 1.0, "steps": STEPS}
    assert rec.config == {"train": {"max_steps": STEPS, "lr": 1e-3}} and rec.last_step == STEPS
    m = store.get_metrics(rec.id)
    assert sorted(m) == ["drop_rate", "lm_loss", "loss", "lr"]  # NaN grad_norm and the loads are not scalars
    hist = store.get_routing(rec.id)
    assert hist.steps == [1, 2, 3, 4]
    np.testing.assert_allclose(hist.load, loads)
    # counts from the routing decisions: consistent with the loads
    np.testing.assert_allclose(np.array(hist.count[0]) / TOKENS, loads[0])
    stats = store.get_layer_stats(rec.id)
    assert len(stats) == STEPS and len(stats[0][1]) == LAYERS
    d = _decision(10)
    p = d.router_probs.double()
    ref_entropy = float((-(p * p.log()).sum(-1)).mean() / math.log(EXPERTS))
    assert stats[0][1][0]["entropy_normalized"] == pytest.approx(ref_entropy, rel=1e-6)
    assert store.get_eval(rec.id)["val"]["eval_loss"] == [(STEPS, 1.5)]


def test_run_store_callback_every_n(tmp_path):
    _drive(RunStoreCallback(url=f"sqlite:///{tmp_path}/s.db", every=3), tmp_path / "r")
    store = RunStore(f"sqlite:///{tmp_path}/s.db")
    # step 3 (every 3rd) and step 4 (the last one)
    assert [s for s, _ in store.get_metrics(store.get_run("r").id)["loss"]] == [3, 4]


def test_tensorboard_callback(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from moe_lab.tracking.exporters.tensorboard import TensorBoardCallback

    cb = TensorBoardCallback(image_every=2)
    _drive(cb, tmp_path / "r")
    files = list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert [e.value for e in acc.Scalars("train/loss")] == [4.0, 3.0, 2.0, 1.0]
    assert acc.Scalars("val/eval_loss")[0].value == 1.5
    assert "expert_load/layer0" in tags["histograms"] and "expert_load/layer1" in tags["histograms"]
    assert [e.step for e in acc.Images("expert_load/heatmap")] == [1, 3]


def test_heatmap_image_matches_reference():
    img = load_heatmap_image([[0.0, 0.5, 1.0], [2.0, 0.0, 0.0]], cell=1)
    assert img.shape == (2, 3, 3) and img.dtype == np.uint8
    assert img[0, 0].tolist() == [68, 1, 84] and img[0, 2].tolist() == [253, 231, 37]  # viridis ends
    assert img[0, 1].tolist() == [33, 145, 140] and img[1, 0].tolist() == [253, 231, 37]  # row-scaled


@pytest.mark.slow
def test_wandb_callback_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from moe_lab.tracking.exporters.wandb import WandbCallback

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    _drive(WandbCallback(project="moe-lab-test"), tmp_path / "r")
    runs = list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")) and (runs[0] / "files").is_dir()
    with pytest.raises(ValueError, match="mode must be one of"):
        WandbCallback(mode="cloud").on_train_begin(SimpleNamespace(run_dir=None, config=_Config()))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside mlflow's own SQLAlchemy models
def test_mlflow_callback_sqlite(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from moe_lab.tracking.exporters.mlflow import MLflowCallback

    cb = MLflowCallback(experiment="moe-lab-test")
    _drive(cb, tmp_path / "runs" / "r")
    assert (tmp_path / "runs" / "mlflow.db").is_file()  # default: <runs dir>/mlflow.db
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/runs/mlflow.db")
    run = client.get_run(cb.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.data.params["train.max_steps"] == str(STEPS)
    assert [m.value for m in client.get_metric_history(cb.run_id, "loss")] == [4.0, 3.0, 2.0, 1.0]
    assert client.get_metric_history(cb.run_id, "val/eval_loss")[0].value == 1.5
    assert len(client.get_metric_history(cb.run_id, "expert_load/L1/E3")) == STEPS


@pytest.mark.slow
@pytest.mark.integration
def test_real_training_with_every_exporter(tmp_path, monkeypatch):
    """The trainer resolves the exporters by registry spec and they all write during a real run."""
    from moe_lab.models import MoEModel
    from moe_lab.train import MoETrainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    torch.manual_seed(0)
    model = MoEModel.from_preset("tiny")
    run_dir = tmp_path / "runs" / "real"
    specs = ["run_store", {"name": "tensorboard", "image_every": 1}]
    trainer = MoETrainer(model, console=False, run_dir=run_dir, callbacks=[])
    data = torch.randint(0, model.config.vocab_size, (32, 16))
    result = trainer.train(data, max_steps=3, batch_size=4, callbacks=specs)
    assert result.steps == 3
    store = RunStore(tmp_path / "runs" / "runs.db")
    rec = store.get_run("real")
    assert rec.status == "finished" and rec.last_step == 3
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(store.get_routing(rec.id).load[-1], lines[-1]["expert_load"])
    assert store.get_metrics(rec.id, keys=["loss"])["loss"][-1][1] == pytest.approx(lines[-1]["loss"])
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(store.get_layer_stats(rec.id)) == 3  # router entropy etc. from the real routing decisions
