"""ModelConfig validation: every bad combination names the key."""

from __future__ import annotations

import pytest

from moe_lab.config import ConfigError
from moe_lab.models import ModelConfig


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"num_experts": 4, "experts_per_token": 5}, "experts_per_token"),
        ({"hidden_size": 30, "num_heads": 4}, "num_heads"),
        ({"num_heads": 4, "num_kv_heads": 3}, "num_kv_heads"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
        ({"router_type": "hash"}, "router_type"),
        ({"qk_norm": "layer"}, "qk_norm"),
        ({"activation": "relu"}, "activation"),
        ({"head_dim": 7}, "head_dim"),
        ({"moe_layer_frequency": 2, "moe_layer_offset": 2}, "moe_layer_offset"),
        ({"moe_layers": [0, 5]}, "moe_layers"),
        ({"router_type": "switch", "experts_per_token": 2}, "experts_per_token"),
        ({"router_type": "sigmoid_bias", "capacity_factor": 1.0}, "capacity_factor"),
        ({"router_type": "expert_choice", "jitter_eps": 0.1}, "jitter_eps"),
        ({"shared_expert_gate": True}, "shared_expert_gate"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"layers": [{"kind": "dense"}]}, "layers"),
        (
            {"layers": [{"kind": "moe", "num_experts": 2, "experts_per_token": 3}, {"kind": "dense"}]},
            "layers[0].experts_per_token",
        ),
        ({"num_expert": 4}, "num_expert"),
        ({"impl": "magic"}, "impl"),
    ],
)
def test_errors_name_the_key(fields, key):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**fields)
    assert key in str(err.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_experts": True}, "num_experts: expected an integer, not a boolean (got True)"),
        ({"hidden_size": "64"}, "hidden_size: expected an integer, not a string (got '64')"),
        ({"tie_embeddings": "yes"}, "tie_embeddings: expected true or false, not a string (got 'yes')"),
        ({"norm_topk_prob": 1}, "norm_topk_prob: expected true or false, not a number (got 1)"),
        ({"aux_loss_coef": False}, "aux_loss_coef: expected a number, not a boolean (got False)"),
        ({"num_layers": 2.5}, "num_layers: Input should be a valid integer"),
        ({"aux_loss_coef": "lots"}, "aux_loss_coef: Input should be a valid number"),
        ({"moe_layers": "0,1"}, "moe_layers: Input should be a valid list"),
    ],
)
def test_wrong_types_name_the_key_and_the_expected_type(fields, message):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**fields)
    assert message in str(err.value)


def test_valid_values_that_need_no_juggling_still_load():
    # YAML 1.1 reads 1e-3 (no dot) as a string: numeric strings stay valid for float fields
    cfg = ModelConfig(aux_loss_coef="1e-3", capacity_factor=None, num_layers=2.0, tie_embeddings=False)
    assert cfg.aux_loss_coef == 0.001 and cfg.num_layers == 2 and cfg.tie_embeddings is False


def test_assignment_is_validated_with_the_same_messages():
    cfg = ModelConfig()
    with pytest.raises(ConfigError, match="num_experts: expected an integer, not a string"):
        cfg.num_experts = "abc"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="num_expert: Object has no attribute"):
        cfg.num_expert = 4  # type: ignore[attr-defined]


def test_defaults_and_derived_values():
    cfg = ModelConfig(hidden_size=64, num_heads=4)
    assert cfg.kv_heads == 4 and cfg.effective_head_dim == 16
    assert cfg.effective_dense_ffn_hidden_size == 256
    assert cfg.aux_loss_coef == 0.01 and cfg.z_loss_coef == 0.001
    wide = ModelConfig(hidden_size=64, num_heads=4, head_dim=32, num_kv_heads=2)
    assert wide.effective_head_dim == 32 and wide.kv_heads == 2


def test_yaml_round_trip_and_overrides(tmp_path):
    cfg = ModelConfig(num_layers=3, moe_layers=[1], layers=None, num_tasks=2)
    path = tmp_path / "m.yaml"
    cfg.to_yaml(path)
    assert ModelConfig.from_yaml(path) == cfg
    assert cfg.with_overrides(["num_experts=8"]).num_experts == 8
    with pytest.raises(ConfigError, match="experts_per_token"):
        cfg.with_overrides(["experts_per_token=9"])


def test_build_returns_model():
    model = ModelConfig(vocab_size=32, hidden_size=16, num_heads=2, ffn_hidden_size=8).build()
    assert model.config.vocab_size == 32
