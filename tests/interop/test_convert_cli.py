"""``moe-lab convert`` end to end on a tiny checkpoint: import, load the run, export, hub-name error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import VOCAB
from moe_lab.cli.main import main
from moe_lab.interop.rundir import load_run_model
from moe_lab.train.checkpoint import latest_checkpoint
from moe_lab.train.config import RunConfig

transformers = pytest.importorskip("transformers")


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"[UNK]": VOCAB - 2, "</s>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ messages[0]['content'] }}"})
    )


def test_import_export_round_trip(hf_checkpoint, tmp_path: Path, capsys) -> None:
    hf, folder = hf_checkpoint("qwen2_moe")
    _write_tokenizer(folder)
    run = tmp_path / "runs" / "qwen"
    assert main(["convert", "--from-hf", str(folder), "--out", str(run)]) == 0
    assert latest_checkpoint(run) is not None and (run / "tokenizer.json").is_file()
    cfg = RunConfig.from_yaml(run / "config.yaml")
    assert cfg.model.shared_expert_gate and cfg.data.tokenizer.endswith("tokenizer.json")
    from moe_lab.data import load_tokenizer

    assert load_tokenizer(cfg.data.tokenizer).encode("w3 w5") == [3, 5]

    model = load_run_model(run).eval()
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        ref = hf(ids).logits
        assert torch.allclose(model(ids).logits, ref, rtol=1e-5, atol=1e-6)

    out = tmp_path / "hf-out"
    assert main(["convert", str(run), "--to-hf", str(out), "--max-shard-size", "30KB"]) == 0
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer_config.json").is_file()
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(hf2(ids).logits, ref, rtol=1e-5, atol=1e-6)
    # exporting again needs --overwrite
    assert main(["convert", str(run), "--to-hf", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["convert", str(run), "--to-hf", str(out), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_hub_name_is_refused(capsys) -> None:
    assert main(["convert", "--from-hf", "mistralai/Mixtral-8x7B-v0.1", "--out", "runs/x"]) == 2
    err = capsys.readouterr().err
    assert "download it first" in err and "huggingface-cli download mistralai/Mixtral-8x7B-v0.1" in err
    assert not Path("runs/x").exists()


def test_usage_errors(tmp_path: Path, capsys) -> None:
    assert main(["convert"]) == 2
    assert main(["convert", "--from-hf", str(tmp_path)]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nope"), "--to-hf", str(tmp_path / "o")]) == 2
