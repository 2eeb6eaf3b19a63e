"""Presets: each builds and runs; `dense` matches `small`'s active size; configs/*.yaml stay in sync."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from moe_lab.config import ConfigError
from moe_lab.models import ModelConfig, MoEModel, get_preset, list_presets, register_preset

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NAMES = ["tiny", "small", "switch", "mixtral-like", "olmoe-like", "qwen-moe-like", "dense"]


def test_all_presets_listed():
    assert set(NAMES) <= set(list_presets())


@pytest.mark.parametrize("name", NAMES)
def test_preset_builds_and_runs(name):
    torch.manual_seed(0)
    model = MoEModel.from_preset(name).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    out = model(ids, labels=ids)
    assert out.logits.shape == (1, 8, model.config.vocab_size)
    assert torch.isfinite(out.loss)
    assert len(out.routing) == len(model.config.moe_layer_indices())


def test_tiny_is_tiny_and_shapes_of_named_presets():
    assert MoEModel.from_preset("tiny").num_params() < 1_000_000
    sw = get_preset("switch")
    assert sw.router_type == "switch" and sw.experts_per_token == 1 and sw.capacity_factor == 1.25
    assert sw.moe_layer_indices() == [1, 3]
    ol = get_preset("olmoe-like")
    assert (ol.num_experts, ol.experts_per_token, ol.qk_norm, ol.norm_topk_prob) == (64, 8, "full", False)
    mx = get_preset("mixtral-like")
    assert (mx.num_experts, mx.experts_per_token, mx.kv_heads < mx.num_heads) == (8, 2, True)
    assert get_preset("small", vocab_size=256).vocab_size == 256


def test_dense_preset_matches_small_active_params():
    small = MoEModel.from_preset("small").num_active_params()
    dense = MoEModel.from_preset("dense")
    assert dense.moe_layers() == []
    assert abs(dense.num_active_params() - small) / small < 0.01


@pytest.mark.parametrize("name", NAMES)
def test_config_files_match_presets(name):
    data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert ModelConfig.from_dict(data["model"]) == get_preset(name)


def test_unknown_and_registered_presets():
    with pytest.raises(ConfigError, match=r"unknown model preset 'huge'.*tiny"):
        get_preset("huge")
    register_preset("test-mini", {"vocab_size": 32, "hidden_size": 16, "num_heads": 2}, overwrite=True)
    assert get_preset("test-mini").hidden_size == 16
    with pytest.raises(ValueError, match="already exists"):
        register_preset("tiny", get_preset("tiny"))
    with pytest.raises(ConfigError, match="num_kv_heads"):
        register_preset("bad", {"num_heads": 4, "num_kv_heads": 3})
