"""Exact resume: 2N steps in one go == N steps + resume + N steps, bitwise (CPU, fp32)."""

from __future__ import annotations

import re

import pytest
import torch

from moe_lab.train import Callback, MoETrainer


class Recorder(Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.norms: dict[int, float] = {}
        self.stop_at = stop_at

    def on_step_end(self, trainer, step, metrics):
        self.losses[step] = metrics["loss"]
        self.norms[step] = metrics["grad_norm"]

    def should_stop(self, trainer):
        return self.stop_at is not None and trainer.state.step >= self.stop_at


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_is_bitwise_exact(tmp_path, make_tiny_model, make_data, grad_accum):
    # 27 sequences / batch 4 = 6 batches per epoch: with ga=2 the checkpoint at step 4 is mid-epoch 1,
    # and dropout makes the loss depend on the restored torch RNG.
    data = make_data(n=27, seq=16)
    kw = {
        "max_steps": 8,
        "batch_size": 4,
        "grad_accum_steps": grad_accum,
        "warmup_steps": 2,
        "checkpoint_every": 4,
        "keep_last_checkpoints": 5,
        "seed": 3,
    }
    fields = {"dropout": 0.1, "expert_dropout": 0.1}

    full = Recorder()
    m_full = make_tiny_model(seed=0, **fields)
    MoETrainer(m_full, run_dir=tmp_path / "full", callbacks=[full], console=False, **kw).train(data)

    first = Recorder(stop_at=4)
    m_a = make_tiny_model(seed=0, **fields)
    MoETrainer(m_a, run_dir=tmp_path / "split", callbacks=[first], console=False, **kw).train(data)
    assert sorted(first.losses) == [1, 2, 3, 4]
    ckpts = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert ckpts == ["step-4"]

    # Fresh process state: different init and a disturbed global RNG; the checkpoint restores everything.
    torch.manual_seed(12345)
    second = Recorder()
    m_b = make_tiny_model(seed=99, **fields)
    tr = MoETrainer(m_b, run_dir=tmp_path / "split", callbacks=[second], console=False, **kw)
    result = tr.train(data, resume_from=tmp_path / "split")
    assert sorted(second.losses) == [5, 6, 7, 8]
    assert result.steps == 8

    resumed = {**first.losses, **second.losses}
    assert resumed == full.losses  # bitwise: float equality of every step's loss
    assert {**first.norms, **second.norms} == full.norms
    for (name, p_full), (_, p_res) in zip(m_full.state_dict().items(), m_b.state_dict().items()):
        assert torch.equal(p_full, p_res), name

    # metrics.jsonl of the resumed run has each step once
    import json

    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == list(range(1, 9))


def test_resume_refuses_other_model_config(tmp_path, make_tiny_model, make_data):
    data = make_data()
    MoETrainer(make_tiny_model(), run_dir=tmp_path / "r", console=False, max_steps=2, batch_size=4).train(
        data
    )
    other = make_tiny_model(num_experts=8)
    with pytest.raises(ValueError, match=re.escape("model.num_experts is 4 in the checkpoint but 8")):
        MoETrainer(other, console=False, max_steps=4, batch_size=4).train(data, resume_from=tmp_path / "r")


def test_resume_refuses_changed_data(tmp_path, make_tiny_model, make_data):
    MoETrainer(make_tiny_model(), run_dir=tmp_path / "r", console=False, max_steps=2, batch_size=4).train(
        make_data(n=40)
    )
    with pytest.raises(ValueError, match="training data changed"):
        MoETrainer(make_tiny_model(), console=False, max_steps=4, batch_size=4).train(
            make_data(n=30), resume_from=tmp_path / "r"
        )


def test_streaming_data_resumes_exactly(tmp_path):
    from moe_lab.data import DataConfig, build_datasets
    from moe_lab.models import MoEModel, get_preset

    cfg = DataConfig(streaming=True, max_bytes=60_000, seq_len=32, shuffle_buffer=16)
    train_ds, val_ds, tok = build_datasets(cfg)
    kw = {"max_steps": 6, "batch_size": 4, "checkpoint_every": 3, "console": False}

    def model():
        torch.manual_seed(0)
        return MoEModel(get_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64))

    full = Recorder()
    res = MoETrainer(model(), run_dir=tmp_path / "full", callbacks=[full], **kw).train(train_ds, val_ds)
    assert res.steps == 6 and res.eval_loss is not None
    first = Recorder(stop_at=3)
    MoETrainer(model(), run_dir=tmp_path / "split", callbacks=[first], **kw).train(train_ds, val_ds)
    second = Recorder()
    MoETrainer(model(), callbacks=[second], **kw).train(train_ds, val_ds, resume_from=tmp_path / "split")
    assert {**first.losses, **second.losses} == full.losses
    with pytest.raises(ValueError, match=re.escape("needs train.max_steps")):
        MoETrainer(model(), console=False).train(train_ds)
