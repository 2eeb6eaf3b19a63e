"""`moe-lab train/eval/generate` through a subprocess: a tiny run, and every bad input exits 2 with one
clear line (never a traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")
TINY = [
    "--preset",
    "tiny",
    "--set",
    "data.max_bytes=60000",
    "--set",
    "data.seq_len=32",
    "--set",
    "train.max_steps=3",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.eval_batches=2",
]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MOE_LAB_DEBUG"}  # tracebacks would hide the errors
    env.update(PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "moe_lab.cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1000:], proc.stderr[-3000:])
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    proc = cli("train", *TINY, "--name", "ok", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, cwd / "runs" / "ok", proc


def test_train_writes_run_dir(trained_run):
    cwd, run, proc = trained_run
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "step-3" / "COMPLETE").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["unigram_val_loss"] > 0
    assert "unigram baseline" in proc.stdout and "run: runs/ok" in proc.stdout
    # each checkpoint holds the exact config of the run (every section), as config.yaml has it
    import yaml

    meta = json.loads((run / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert meta["run_config"] == yaml.safe_load((run / "config.yaml").read_text())
    assert set(meta["run_config"]) >= {"model", "data", "train", "parallel"}


def test_eval_and_generate(trained_run):
    cwd, run, _ = trained_run
    proc = cli("eval", str(run), "--json", "--max-batches", "2", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["loss"] > 0 and out["tokens"] > 0
    proc = cli("generate", str(run), "--prompt", "The", "--max-new-tokens", "5", "--seed", "0", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("The")


def test_existing_run_without_overwrite(trained_run):
    cwd, _, _ = trained_run
    assert_user_error(cli("train", *TINY, "--name", "ok", cwd=cwd), "already exists", "--overwrite")


def test_incompatible_checkpoint(trained_run):
    cwd, run, _ = trained_run
    proc = cli(
        "train", "--resume", str(run), "--set", "model.num_experts=8", "--set", "train.max_steps=5", cwd=cwd
    )
    assert_user_error(proc, "model.num_experts")


def test_refused_resume_leaves_the_run_resumable(tmp_path):
    # a resume refused for an incompatible model or data must not rewrite config.yaml: the run stays resumable
    assert cli("train", *TINY, "--name", "r", cwd=tmp_path).returncode == 0
    run = tmp_path / "runs" / "r"
    before = (run / "config.yaml").read_text()
    for change in ("model.hidden_size=128", "model.dropout=0.1"):
        proc = cli("train", "--resume", str(run), "--set", change, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert (run / "config.yaml").read_text() == before
    proc = cli("train", "--resume", str(run), "--set", "train.max_steps=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "checkpoints" / "step-4" / "COMPLETE").is_file()
    assert "max_steps: 4" in (run / "config.yaml").read_text()  # an accepted resume records its settings


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--config", "missing.yaml"], ["config file not found", "missing.yaml"]),
        ([*TINY, "--set", "data.source=does/not/exist.txt"], ["does/not/exist.txt"]),
        ([*TINY, "--set", "data.source=broken.parquet"], ["broken.parquet"]),
        ([*TINY, "--set", "data.source=latin1.txt", "--set", "data.format=text"], ["latin1.txt"]),
        (["--config", "bad.yaml"], ["bad.yaml", "not valid YAML", "(line 3, column 1)"]),
        ([*TINY, "--set", "train.batch_size=0"], ["batch_size"]),
        ([*TINY, "--set", "data.source=empty.txt"], ["empty.txt"]),
        ([*TINY, "--set", "data.seq_len=1024"], ["data.seq_len (1024)", "model.max_seq_len (512)"]),
        ([*TINY, "--set", "train.lr_schedule=step"], ["lr_schedule"]),
        (["--preset", "nope"], ["nope"]),
    ],
    ids=[
        "missing-config",
        "missing-data",
        "unreadable-data",
        "undecodable-text",
        "bad-yaml",
        "bad-value",
        "empty-corpus",
        "seq-len",
        "bad-choice",
        "bad-preset",
    ],
)
def test_bad_input_exits_2(tmp_path, args, needles):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me ".encode("latin-1") * 200)
    (tmp_path / "bad.yaml").write_text("train:\n  max_steps: [3\n")
    assert_user_error(cli("train", *args, "--name", "x", cwd=tmp_path), *needles)
    assert not (tmp_path / "runs" / "x" / "config.yaml").exists()


def test_eval_generate_bad_run_dir(tmp_path):
    assert_user_error(cli("eval", "nowhere", cwd=tmp_path), "nowhere")
    assert_user_error(cli("generate", "nowhere", "--prompt", "x", cwd=tmp_path), "nowhere")


def test_failed_setup_leaves_no_run_folder(tmp_path):
    # the trainer refuses the batch size only after the run folder was made: the folder is removed again,
    # so the corrected command runs without --overwrite
    proc = cli("train", *TINY, "--set", "train.batch_size=100000", "--name", "b", cwd=tmp_path)
    assert_user_error(proc, "batch_size=100000")
    assert not (tmp_path / "runs" / "b").exists()
    proc = cli("train", *TINY, "--name", "b", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "b" / "checkpoints" / "step-3" / "COMPLETE").is_file()


def test_eval_with_a_checkpoint_of_another_run_exit_2(trained_run, tmp_path):
    # a run with a larger (BPE) vocabulary evaluated with the byte-level tiny run's checkpoint: its tokenizer
    # produces ids that checkpoint cannot embed; refused with a message instead of an IndexError
    cwd, byte_run, _ = trained_run
    bpe = [*TINY, "--set", "data.tokenizer=bpe", "--set", "data.bpe_vocab_size=300"]
    assert cli("train", *bpe, "--name", "bpe", cwd=tmp_path).returncode == 0
    ckpt = byte_run / "checkpoints" / "step-3"
    proc = cli("eval", str(tmp_path / "runs" / "bpe"), "--checkpoint", str(ckpt), cwd=tmp_path)
    assert_user_error(proc, "the checkpoint belongs to another run", "step-3")
