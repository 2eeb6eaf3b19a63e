"""The trainer under torchrun equals one process on the same global batch; DCP checkpoints resume at
another world size and feed `moe-lab eval`; a 1-process checkpoint resumes on 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

SRC = str(Path(__file__).resolve().parents[2] / "src")
ARGS = [
    "--preset",
    "tiny",
    "--quiet",
    *("--set", "data.max_bytes=60000", "--set", "data.seq_len=32"),
    *("--set", "model.router_type=top_k", "--set", "model.capacity_factor=null"),
    *("--set", "model.dropout=0.0", "--set", "train.precision=fp32"),
    *("--set", "train.max_steps=6", "--set", "train.batch_size=4", "--set", "train.warmup_steps=0"),
    *("--set", "train.eval_batches=2", "--set", "train.checkpoint_every=3"),
]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MOE_LAB_DEBUG"}
    env.update(
        PYTHONPATH=SRC,
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
    )
    return env


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return proc


def torchrun(nproc: int, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return _run([*launcher, "-m", "moe_lab.train", *args], cwd)


def moe_lab(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "moe_lab.cli.main", *args], cwd)


def metrics(run: Path) -> tuple[dict[int, dict], list[dict]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == sorted({m["step"] for m in steps}), "each step written once"
    return {m["step"]: m for m in steps}, [m for m in lines if m.get("split") == "val"]


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * abs(b)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("dist")
    torchrun(1, *ARGS, "--name", "ref", cwd=cwd)
    return cwd


@pytest.fixture(scope="module")
def fsdp_ep2(work):
    """(fsdp, ep=2) on 2 processes through `moe-lab train --nproc-per-node` (the CLI's torchrun)."""
    sets = ["--set", "parallel.data_parallel=fsdp", "--set", "parallel.expert_parallel=2"]
    proc = moe_lab("train", *ARGS, *sets, "--name", "fsdp-ep2", "--nproc-per-node", "2", cwd=work)
    assert proc.stdout.count("run: runs/fsdp-ep2") == 1  # the summary comes from rank 0 only
    return work / "runs" / "fsdp-ep2"


def _check_same_as_reference(work: Path, run: Path) -> None:
    ref_steps, ref_evals = metrics(work / "runs" / "ref")
    steps, evals = metrics(run)
    assert sorted(steps) == sorted(ref_steps) == [1, 2, 3, 4, 5, 6]
    for s in steps:
        assert close(steps[s]["loss"], ref_steps[s]["loss"]), (s, steps[s]["loss"], ref_steps[s]["loss"])
        assert close(steps[s]["grad_norm"], ref_steps[s]["grad_norm"], 1e-4)
        load, ref_load = ([x for layer in m["expert_load"] for x in layer] for m in (steps[s], ref_steps[s]))
        assert load == pytest.approx(ref_load, abs=2e-6)  # counts summed over the ranks
        assert steps[s]["tokens"] == ref_steps[s]["tokens"]  # every rank's tokens are counted
    assert steps[6]["loss"] < steps[1]["loss"]
    assert len(evals) == len(ref_evals) == 1 and close(evals[0]["eval_loss"], ref_evals[0]["eval_loss"])


@pytest.mark.parametrize(("mode", "ep"), [("ddp", 1), ("ddp", 2)])
def test_torchrun_equals_one_process(work, mode, ep):
    name = f"{mode}-ep{ep}"
    sets = ["--set", f"parallel.data_parallel={mode}", "--set", f"parallel.expert_parallel={ep}"]
    torchrun(2, *ARGS, *sets, "--name", name, cwd=work)
    _check_same_as_reference(work, work / "runs" / name)


def test_fsdp_expert_parallel_run_dir(work, fsdp_ep2):
    _check_same_as_reference(work, fsdp_ep2)
    cfg = (fsdp_ep2 / "config.yaml").read_text()
    assert "data_parallel: fsdp" in cfg and "expert_parallel: 2" in cfg
    for step in (3, 6):
        ckpt = fsdp_ep2 / "checkpoints" / f"step-{step}"
        assert (ckpt / "COMPLETE").is_file() and (ckpt / ".metadata").is_file()
        assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
    assert not list((fsdp_ep2 / "checkpoints").glob(".*"))  # no temp dirs left


def test_dcp_checkpoint_resumes_on_one_process_and_evaluates(work, fsdp_ep2):
    run = work / "runs" / "resumed"
    shutil.copytree(fsdp_ep2, run)
    shutil.rmtree(run / "checkpoints" / "step-6")
    _run([sys.executable, "-m", "moe_lab.train", "--resume", str(run), "--quiet"], work)
    ref_steps, ref_evals = metrics(work / "runs" / "ref")
    steps, _ = metrics(run)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    for s in (4, 5, 6):
        assert close(steps[s]["loss"], ref_steps[s]["loss"]), (s, steps[s]["loss"], ref_steps[s]["loss"])
    # the single-process tools read a DCP checkpoint (saved by 2 FSDP2 + expert-parallel ranks)
    proc = moe_lab("eval", str(fsdp_ep2), "--json", "--max-batches", "2", cwd=work)
    assert close(json.loads(proc.stdout)["loss"], ref_evals[0]["eval_loss"])
    assert "Warning" not in proc.stderr


def test_single_process_checkpoint_resumes_on_two_processes(work):
    run = work / "runs" / "ref-on-2"
    shutil.copytree(work / "runs" / "ref", run)
    shutil.rmtree(run / "checkpoints" / "step-6")
    sets = ["--set", "parallel.data_parallel=fsdp", "--set", "parallel.expert_parallel=2"]
    torchrun(2, "--resume", str(run), "--quiet", *sets, cwd=work)
    ref_steps, _ = metrics(work / "runs" / "ref")
    steps, _ = metrics(run)
    for s in (4, 5, 6):
        assert close(steps[s]["loss"], ref_steps[s]["loss"]), (s, steps[s]["loss"], ref_steps[s]["loss"])
    assert (run / "checkpoints" / "step-6" / ".metadata").is_file()  # now saved by the distributed run


def test_aux_free_bias_uses_global_counts(work):
    """The router-bias update sees every rank's counts: the biases (and losses) match one process."""
    sets = ["--set", "model.router_type=sigmoid_bias", "--set", "train.load_balancing=aux_free_bias"]
    sets += ["--set", "train.learning_rate=0.01"]
    torchrun(1, *ARGS, *sets, "--name", "bias-1", cwd=work)
    torchrun(2, *ARGS, *sets, "--set", "parallel.expert_parallel=2", "--name", "bias-2", cwd=work)
    one, _ = metrics(work / "runs" / "bias-1")
    two, _ = metrics(work / "runs" / "bias-2")
    for s in one:
        assert close(two[s]["loss"], one[s]["loss"]), (s, two[s]["loss"], one[s]["loss"])
        assert two[s]["expert_load"] == one[s]["expert_load"]


def test_failing_rank_prints_its_error_and_fails_the_job(work):
    bad = ["--name", "bad", "--nproc-per-node", "2", "--set", "data.source=missing.txt"]
    proc = subprocess.run(
        [sys.executable, "-m", "moe_lab.cli.main", "train", *ARGS, *bad],
        cwd=work,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "moe-lab train: error: data source not found: missing.txt" in proc.stderr, proc.stderr[-3000:]
    assert not (work / "runs" / "bad").exists()
