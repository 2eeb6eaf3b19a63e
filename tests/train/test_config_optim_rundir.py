"""RunConfig loading, the lr schedule against a plain reference, run directories, callback registry."""

from __future__ import annotations

import math
import re

import pytest
import torch

from moe_lab.config import ConfigError
from moe_lab.train import RunConfig, TrainConfig
from moe_lab.train.callbacks import EarlyStopping, create_callback, register_callback
from moe_lab.train.optim import build_optimizer, fused_supported, lr_factor, param_groups
from moe_lab.train.rundir import MetricsWriter, RunDir, RunExistsError, read_metrics


def test_runconfig_preset_file_and_overrides(tmp_path):
    cfg = RunConfig.load(preset="tiny", overrides=["train.max_steps=100", "model.num_experts=16"])
    assert cfg.train.max_steps == 100 and cfg.model.num_experts == 16 and cfg.model.hidden_size == 64
    f = tmp_path / "run.yaml"
    f.write_text("preset: tiny\nmodel:\n  num_layers: 3\ntrain:\n  batch_size: 4\ndata:\n  seq_len: 32\n")
    cfg = RunConfig.load(f, overrides=["train.learning_rate=0.01"])
    assert (cfg.model.num_layers, cfg.train.batch_size, cfg.data.seq_len) == (3, 4, 32)
    assert cfg.train.learning_rate == 0.01
    # round trip through the run directory's config.yaml
    cfg.to_yaml(tmp_path / "config.yaml")
    assert RunConfig.from_yaml(tmp_path / "config.yaml") == cfg
    assert RunConfig.load().model.hidden_size == RunConfig.load(preset="small").model.hidden_size


def test_runconfig_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        RunConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=re.escape("unknown key 'train.batch_sise'")):
        RunConfig.load(bad)
    with pytest.raises(ConfigError, match=re.escape("unknown key 'train.nope'")):
        RunConfig.load(preset="tiny", overrides=["train.nope=1"])
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        RunConfig.load(preset="huge")


def _reference_lr(step, warmup, total, floor, kind):
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1 - (1 - floor) * p
    return floor + (1 - floor) * (1 + math.cos(math.pi * p)) / 2


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_lr_schedule_matches_reference(kind):
    cfg = TrainConfig(warmup_steps=10, lr_schedule=kind, min_lr_ratio=0.1)
    for step in range(0, 120, 3):
        assert lr_factor(step, cfg, 100) == pytest.approx(_reference_lr(step, 10, 100, 0.1, kind))
    if kind == "cosine":
        assert lr_factor(100, cfg, 100) == pytest.approx(0.1)


def test_param_groups_split():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = {k: [n for n, _ in v] for k, v in param_groups(model).items()}
    assert groups == {
        "decay": ["1.weight"],
        "no_decay": ["0.weight", "1.bias", "2.weight", "2.bias"],
        "router": [],
    }


def test_optimizer_is_fused_on_cpu_and_steps_like_the_reference_loop(make_tiny_model, make_data):
    """The fused AdamW that build_optimizer picks on CPU against torch's per-parameter loop (the reference):
    same groups, same rates, the same parameters after several steps up to float rounding."""
    cfg = TrainConfig(learning_rate=3e-3, weight_decay=0.1, router_learning_rate=1e-3)
    fused_model, loop_model = make_tiny_model(seed=3), make_tiny_model(seed=3)
    fused = build_optimizer(fused_model, cfg)
    assert fused.defaults["fused"] is True
    loop = build_optimizer(loop_model, cfg)
    keys = ("params", "lr", "weight_decay", "betas", "eps")
    ref = torch.optim.AdamW(  # the same groups and settings, torch's per-parameter loop
        [{k: g[k] for k in keys} for g in loop.param_groups], foreach=False, fused=False
    )
    assert ref.defaults["fused"] is False and all(not g["fused"] for g in ref.param_groups)
    assert [g["weight_decay"] for g in fused.param_groups] == [g["weight_decay"] for g in ref.param_groups]
    data = make_data(n=8, seq=16)
    for step in range(5):
        for model, opt in ((fused_model, fused), (loop_model, ref)):
            opt.zero_grad(set_to_none=True)
            model(data[step : step + 4], labels=data[step : step + 4]).loss.backward()
            opt.step()
    for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    moved = sum(
        float((a - b).detach().abs().sum())
        for a, b in zip(fused_model.parameters(), make_tiny_model(seed=3).parameters())
    )
    assert moved > 0.0


def test_fused_supported_only_for_plain_tensors_on_one_device():
    p = torch.zeros(3, requires_grad=True)
    assert fused_supported([p, torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)])
    assert not fused_supported([])
    assert not fused_supported([torch.zeros(2, dtype=torch.int64)])
    assert not fused_supported([torch.zeros(2, device="meta")])


def test_rundir_create_refuses_and_overwrites(tmp_path):
    rd = RunDir.create(tmp_path / "r")
    (rd.path / "config.yaml").write_text("x: 1\n")
    with pytest.raises(RunExistsError, match="--overwrite"):
        RunDir.create(tmp_path / "r")
    rd2 = RunDir.create(tmp_path / "r", overwrite=True)
    assert not (rd2.path / "config.yaml").exists() and rd2.checkpoints_dir.is_dir()
    other = tmp_path / "not_a_run"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(RunExistsError, match="does not look like a moe-lab run"):
        RunDir.create(other, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep"


def test_metrics_writer_truncates_replayed_steps(tmp_path):
    p = tmp_path / "metrics.jsonl"
    with MetricsWriter(p) as w:
        for s in range(1, 6):
            w.write({"step": s, "loss": float(s)})
    with p.open("a") as fh:
        fh.write('{"step": 6, "lo')  # a line cut by a crash
    with MetricsWriter(p, truncate_after_step=3) as w:
        w.write({"step": 4, "loss": 0.5})
    assert [(m["step"], m["loss"]) for m in read_metrics(p)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 0.5)]
    with MetricsWriter(p) as w:
        w.write({"step": 5, "loss": float("nan")})
    assert read_metrics(p)[-1]["loss"] is None


def test_callback_registry():
    register_callback("test_stop", "moe_lab.train.callbacks.early_stopping:EarlyStopping")
    cb = create_callback({"name": "test_stop", "patience": 4})
    assert isinstance(cb, EarlyStopping) and cb.patience == 4
    register_callback("test_factory", lambda **kw: EarlyStopping(2))
    assert create_callback("test_factory").patience == 2
    by_path = create_callback({"name": "moe_lab.train.callbacks.early_stopping:EarlyStopping", "patience": 1})
    assert isinstance(by_path, EarlyStopping)
    with pytest.raises(ConfigError, match="unknown callback 'nope'"):
        create_callback("nope")
    with pytest.raises(ConfigError, match="bad arguments for 'test_stop'"):
        create_callback({"name": "test_stop", "wrong": 1})
    with pytest.raises(ConfigError, match="not available"):
        create_callback("no_such_pkg.mod:Thing")


def test_console_output_when_not_a_terminal(capsys, make_tiny_model, make_data):
    from moe_lab.train import MoETrainer
    from moe_lab.train.callbacks import ProgressCallback

    assert ProgressCallback().enabled is False  # pytest's captured stdout is not a terminal
    MoETrainer(make_tiny_model(), log_every=2).train(
        make_data(), eval_data=make_data(n=4), max_steps=4, batch_size=4
    )
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" |")[0] for line in out] == ["step 2/4", "step 4/4", "eval step 4"]
    MoETrainer(make_tiny_model(), console=False).train(make_data(), max_steps=2, batch_size=4)
    assert capsys.readouterr().out == ""
