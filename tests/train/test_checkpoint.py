"""Atomic checkpoints: crash safety, keep-last-K, incomplete folders ignored, RNG round trip."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_lab.train import MoETrainer
from moe_lab.train.checkpoint import (
    COMPLETE_MARKER,
    CRASH_ENV,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
)

SRC = str(Path(__file__).resolve().parents[2] / "src")

CRASH_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from moe_lab.models import MoEModel, get_preset
    from moe_lab.train import MoETrainer
    torch.manual_seed(0)
    model = MoEModel(get_preset("tiny", vocab_size=64, max_seq_len=64))
    data = torch.randint(0, 64, (24, 16), generator=torch.Generator().manual_seed(0))
    MoETrainer(model, run_dir=sys.argv[1], console=False, max_steps=4, batch_size=4,
               checkpoint_every=2, keep_last_checkpoints=3).train(data)
    """
)


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, make_tiny_model):
    run = tmp_path / "run"
    env = {**os.environ, CRASH_ENV: "4", "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(run)], env=env, capture_output=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]  # SIGKILL while writing step-4

    ckpt_dir = run / "checkpoints"
    partial = [p for p in ckpt_dir.iterdir() if p.name.startswith(".tmp-step-4")]
    assert len(partial) == 1 and (partial[0] / "model.safetensors").exists()
    assert not (partial[0] / COMPLETE_MARKER).exists()
    assert [p.name for p in list_checkpoints(ckpt_dir)] == ["step-2"]
    assert latest_checkpoint(run).name == "step-2"

    model = make_tiny_model(seed=5)
    ckpt = load_checkpoint(latest_checkpoint(run), model=model, model_config=model.config.to_dict())
    assert ckpt.step == 2

    # resuming continues from step 2, finishes, and cleans the dead writer's temp dir
    data = torch.randint(0, 64, (24, 16), generator=torch.Generator().manual_seed(0))
    result = MoETrainer(model, console=False, max_steps=4, batch_size=4, checkpoint_every=2).train(
        data, resume_from=run
    )
    assert result.steps == 4
    assert [p.name for p in list_checkpoints(ckpt_dir)] == ["step-2", "step-4"]
    assert not any(p.name.startswith(".tmp-") for p in ckpt_dir.iterdir())


def test_folder_without_marker_is_ignored(tmp_path, make_tiny_model, make_data):
    run = tmp_path / "run"
    MoETrainer(make_tiny_model(), run_dir=run, console=False, max_steps=2, batch_size=4).train(make_data())
    fake = run / "checkpoints" / "step-9"
    fake.mkdir()
    (fake / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(run).name == "step-2"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(fake, model=make_tiny_model())


def test_keep_last_k(tmp_path, make_tiny_model, make_data):
    run = tmp_path / "run"
    MoETrainer(
        make_tiny_model(),
        run_dir=run,
        console=False,
        max_steps=7,
        batch_size=4,
        checkpoint_every=2,
        keep_last_checkpoints=2,
    ).train(make_data())
    # saved at 2, 4, 6 and the final 7; only the newest two remain
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-6", "step-7"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-6", "step-7"]


def test_checkpoint_files_load_with_weights_only(tmp_path, make_tiny_model, make_data):
    run = tmp_path / "run"
    MoETrainer(make_tiny_model(), run_dir=run, console=False, max_steps=1, batch_size=4).train(make_data())
    step = latest_checkpoint(run)
    assert {p.name for p in step.iterdir()} >= {
        "model.safetensors",
        "optimizer.pt",
        "rng_state.pt",
        "trainer_state.json",
        COMPLETE_MARKER,
    }
    opt = torch.load(step / "optimizer.pt", weights_only=True)
    assert {g["name"] for g in opt["param_groups"]} >= {"decay", "no_decay", "router"}
    torch.load(step / "rng_state.pt", weights_only=True)


def test_rng_state_round_trip():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = capture_rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    restore_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
