"""`moe-lab trace` and `moe-lab bench generate` end to end (tiny shapes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_lab.cli.main import main
from moe_lab.inference.trace import load_trace
from moe_lab.models import MoEModel

TEXT = "Mixture-of-experts models route every token to a few experts. " * 60


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("trace") / "model"
    MoEModel.from_preset("tiny").save_pretrained(str(d))
    return d


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    p = tmp_path / "data.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def test_trace_records_every_token_and_layer(
    model_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "t.safetensors"
    rc = main(["trace", str(model_dir), "--data", str(data_file), "--max-tokens", "200", "--seq-len", "64",
               "-o", str(out)])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "byte tokenizer" in printed  # bare model dir: the fallback is announced
    trace = load_trace(out)
    cfg = MoEModel.load(str(model_dir)).config
    assert (trace.num_tokens, trace.num_layers, trace.top_k) == (200, cfg.num_layers, cfg.experts_per_token)
    assert trace.num_experts == cfg.num_experts
    # every token's experts are distinct and in range, weights positive (dropless top-2 routing)
    idx = trace.expert_indices
    assert int(idx.min()) >= 0 and int(idx.max()) < cfg.num_experts
    assert bool((idx[..., 0] != idx[..., 1]).all())
    assert bool((trace.weights > 0).all())
    assert trace.metadata["seq_len"] == 64

    # the trace equals the model's own routing on the first sequence (byte ids of the text)
    model = MoEModel.load(str(model_dir)).eval()
    ids = torch.tensor([list(TEXT.encode("utf-8"))[:64]])
    with torch.no_grad():
        routing = model(ids).routing
    for layer, decision in enumerate(routing):
        assert torch.equal(trace.expert_indices[:64, layer].long(), decision.expert_indices.long())


@pytest.mark.parametrize(
    ("argv_tail", "message"),
    [
        (["--data", "{missing}"], "--data: not found"),
        (["--data", "{data}", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    ],
)
def test_trace_bad_data_exit_2(
    model_dir: Path,
    data_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv_tail: list[str],
    message: str,
) -> None:
    tail = [a.format(missing=tmp_path / "nope.txt", data=data_file) for a in argv_tail]
    rc = main(["trace", str(model_dir), *tail, "-o", str(tmp_path / "t.safetensors")])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t.safetensors").exists()


def test_trace_missing_model_dir_exit_2(
    data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["trace", str(tmp_path / "no-run"), "--data", str(data_file), "-o", str(tmp_path / "t.st")])
    assert rc == 2
    assert "not found" in capsys.readouterr().err


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "moe_lab", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_bench_generate_prints_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    res = _cli("bench", "generate", "--preset", "tiny", "--batch-sizes", "1,2", "--prompt-lengths", "8",
               "--new-tokens", "3", "--variants", "eager,int8,cached", "--reps", "1", "--warmup", "0",
               "--threads", "1", "--json", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| variant | batch |")
    assert len(lines) == 1 + 2 * 3  # header + (2 batch sizes x 3 variants)
    rows = json.loads(out.read_text())["rows"]
    assert {(r["variant"], r["batch"]) for r in rows} == {
        (v, b) for v in ("eager", "int8", "cached") for b in (1, 2)
    }
    for r in rows:
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    by = {(r["variant"], r["batch"]): r for r in rows}
    # int8 holds ~1/4 of the fp32 expert bytes; the cache holds at most half the experts
    assert by[("int8", 1)]["expert_mb"] < 0.3 * by[("eager", 1)]["expert_mb"]
    assert by[("cached", 1)]["expert_mb"] <= 0.5 * by[("eager", 1)]["expert_mb"] + 1e-9


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "nope"], "unknown --preset"),
        (["--preset", "tiny", "--variants", "eager,fast"], "--variants"),
        (["--preset", "tiny", "--new-tokens", "1"], "--new-tokens"),
        (["--preset", "tiny", "--prompt-lengths", "600"], "max_seq_len"),
        ([], "give exactly one of"),
        (["/definitely/not/here"], "model path not found"),
    ],
)
def test_bench_generate_bad_input_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["bench", "generate", *args, "--variants", "eager"] if "--variants" not in args else
              ["bench", "generate", *args])  # fmt: skip
    assert rc == 2
    assert message in capsys.readouterr().err


def test_trace_run_dir_uses_the_runs_tokenizer(
    data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real run dir written by the trainer: newest checkpoint, the run's own tokenizer."""
    from moe_lab.data import ByteTokenizer
    from moe_lab.train import MoETrainer

    torch.manual_seed(1)
    model = MoEModel.from_preset("tiny", vocab_size=260)  # the byte tokenizer's ids incl. specials
    run = tmp_path / "run"
    data = torch.randint(0, 256, (8, 32))
    MoETrainer(model, run_dir=run, tokenizer=ByteTokenizer(), console=False).train(
        data, max_steps=2, batch_size=4, checkpoint_every=2
    )
    out = tmp_path / "t.safetensors"
    rc = main(
        ["trace", str(run), "--data", str(data_file), "--max-tokens", "64", "--seq-len", "32", "-o", str(out)]
    )
    assert rc == 0
    assert "byte tokenizer" not in capsys.readouterr().out  # no fallback note: the run has a tokenizer
    trace = load_trace(out)
    ids = torch.tensor([list(TEXT.encode("utf-8"))[:32]])
    with torch.no_grad():
        routing = model.eval()(ids).routing
    assert torch.equal(trace.expert_indices[:32, 0].long(), routing[0].expert_indices.long())
