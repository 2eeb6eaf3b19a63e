"""`moe-lab info`: presets and YAML configs, text and JSON, user errors exit 2."""

from __future__ import annotations

import json

import pytest

from moe_lab.cli.main import main
from moe_lab.models import MoEModel, get_preset


def test_info_preset_text(capsys):
    assert main(["info", "small", "--seq-len", "256"]) == 0
    out = capsys.readouterr().out
    model = MoEModel.from_preset("small")
    assert f"{model.num_params():,}" in out
    assert f"{model.num_active_params():,}" in out
    assert f"{model.flops_per_token(256):,}" in out
    assert "8 x F=512, top-2, router top_k" in out


def test_info_json_from_yaml_with_overrides(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(get_preset("switch").to_yaml().replace("\n", "\n  ").join(["model:\n  ", ""]))
    assert main(["info", str(path), "--json", "--set", "num_layers=6"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["moe_layers"] == [1, 3, 5]
    assert data["layers"][1]["router_type"] == "switch" and data["layers"][0]["kind"] == "dense"
    ref = MoEModel(get_preset("switch", num_layers=6))
    assert data["num_params"] == ref.num_params()
    assert data["num_active_params"] == ref.num_active_params()
    assert data["flops_per_token"] == ref.flops_per_token()


def test_info_summarises_huge_configs_without_allocating(capsys):
    # Mixtral-8x7B dimensions: ~46.7B parameters, ~12.9B active; built on the meta device
    args = [
        "info",
        "mixtral-like",
        "--json",
        "--set",
        "vocab_size=32000",
        "--set",
        "hidden_size=4096",
        "--set",
        "num_layers=32",
        "--set",
        "num_heads=32",
        "--set",
        "num_kv_heads=8",
        "--set",
        "ffn_hidden_size=14336",
        "--set",
        "max_seq_len=32768",
    ]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert 46.6e9 < data["num_params"] < 46.8e9
    assert 12.8e9 < data["num_active_params"] < 13.0e9


def test_info_reads_run_configs_and_model_dotted_overrides(capsys):
    # the training config of the demo (preset: small + data/train sections) describes the small model
    from moe_lab.train.config import RunConfig

    assert main(["info", "configs/train/small.yaml", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    ref = MoEModel(RunConfig.load(config_file="configs/train/small.yaml").model)
    assert data["num_params"] == ref.num_params() == MoEModel.from_preset("small").num_params()
    # `model.` keys, as `moe-lab train --set` writes them, and bare field names do the same
    assert main(["info", "tiny", "--json", "--set", "model.num_experts=16"]) == 0
    dotted = json.loads(capsys.readouterr().out)
    assert main(["info", "tiny", "--json", "--set", "num_experts=16"]) == 0
    assert json.loads(capsys.readouterr().out) == dotted
    assert dotted["num_params"] == MoEModel(get_preset("tiny", num_experts=16)).num_params()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "tiny", "--set", "train.max_steps=5"], "info only describes the model"),
        (
            ["info", "tiny", "--set", "model.num_experts=yes"],
            "num_experts: expected an integer, not a boolean",
        ),
        (["info", "nope"], "unknown preset 'nope'"),
        (["info", "missing.yaml"], "config file not found"),
        (["info", "tiny", "--set", "experts_per_token=9"], "experts_per_token"),
        (["info", "tiny", "--set", "no_such_key=1"], "no_such_key"),
    ],
)
def test_info_user_errors(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_info_bad_yaml(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_heads: 4\n  num_kv_heads: 3\n")
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "num_kv_heads" in err and str(path) in err
