"""``resume_run`` and the tokenizer's vocabulary: a padded embedding (as in imported Qwen models) resumes;
a model that cannot embed every tokenizer id is refused."""

from __future__ import annotations

import pytest

from moe_lab.config import ConfigError
from moe_lab.data import build_datasets
from moe_lab.models import MoEModel
from moe_lab.train import MoETrainer, RunConfig
from moe_lab.train.launch import resume_run

OVERRIDES = [
    "data.max_bytes=20000",
    "data.seq_len=32",
    "train.max_steps=2",
    "train.batch_size=4",
    "train.checkpoint_every=2",
    "train.eval_every=0",
]


def test_resume_accepts_padded_vocab_and_refuses_a_smaller_one(tmp_path):
    cfg = RunConfig.load(preset="tiny", overrides=OVERRIDES)
    train_ds, _, tok = build_datasets(cfg.data)
    padded = cfg.with_overrides([f"model.vocab_size={tok.vocab_size + 13}"])
    run = tmp_path / "padded"
    model = MoEModel(padded.model)
    MoETrainer(model, padded.train, run_dir=run, tokenizer=tok, run_config=padded, console=False).train(
        train_ds
    )

    result = resume_run(run, overrides=["train.max_steps=3"], console=False)
    assert result.steps == 3

    with pytest.raises(ConfigError, match="smaller than the run's tokenizer's"):
        resume_run(run, overrides=[f"model.vocab_size={tok.vocab_size - 1}"], console=False)
