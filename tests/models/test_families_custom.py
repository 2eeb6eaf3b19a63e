"""Family classes, CustomMoE and the model directory format."""

from __future__ import annotations

import pytest
import torch

from moe_lab.config import ConfigError
from moe_lab.models import (
    FAMILIES,
    CustomMoE,
    DenseModel,
    MixtralModel,
    MoEModel,
    OLMoEModel,
    QwenMoEModel,
    SwitchModel,
    get_preset,
)

SMALL = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=16)


def test_family_defaults_and_overrides():
    mx = MixtralModel(**SMALL)
    assert (mx.config.num_experts, mx.config.norm_topk_prob, mx.config.rope_theta) == (8, True, 1e6)
    ol = OLMoEModel(**SMALL, num_experts=16, experts_per_token=4)
    assert ol.config.qk_norm == "full" and not ol.config.norm_topk_prob and ol.config.num_experts == 16
    qw = QwenMoEModel(**SMALL, num_experts=8)
    layer = qw.moe_layers()[0]
    assert layer.shared_experts is not None and layer.shared_expert_gate is not None
    assert qw.layers[0].self_attn.q_proj.bias is not None and qw.layers[0].self_attn.o_proj.bias is None
    sw = SwitchModel(**SMALL)
    assert sw.config.moe_layer_indices() == [1] and sw.config.router_type == "switch"
    assert DenseModel(**SMALL).moe_layers() == []
    assert set(FAMILIES) == {"mixtral", "olmoe", "qwen_moe", "switch", "dense"}
    ids = torch.randint(0, 64, (1, 5))
    for model in (mx, ol, qw, sw):
        assert model(ids).logits.shape == (1, 5, 64)


def test_qwen3_style_per_head_qk_norm():
    model = QwenMoEModel(
        **SMALL,
        num_experts=4,
        qk_norm="per_head",
        num_shared_experts=0,
        shared_expert_gate=False,
        attention_bias=False,
        head_dim=16,
    )
    attn = model.layers[0].self_attn
    assert attn.q_norm.weight.shape == (16,) and attn.q_proj.out_features == 4 * 16
    assert model(torch.randint(0, 64, (1, 3))).logits.shape == (1, 3, 64)


def test_custom_moe_layers():
    model = CustomMoE(
        ["dense", "moe:switch", {"kind": "moe", "router_type": "expert_choice", "num_experts": 8}],
        **SMALL | {"num_layers": 99},
        num_experts=4,
    )
    cfg = model.config
    assert cfg.num_layers == 3 and cfg.moe_layer_indices() == [1, 2]
    assert [layer.router_type for layer in model.moe_layers()] == ["switch", "expert_choice"]
    assert [layer.num_experts for layer in model.moe_layers()] == [4, 8]
    out = model(torch.randint(0, 64, (2, 6)))
    assert len(out.routing) == 2 and out.routing[1].num_experts == 8
    with pytest.raises(ConfigError, match=r"layers\[1\]"):
        CustomMoE(["dense", "sparse"], **SMALL)


@pytest.mark.parametrize("cls", [MoEModel, CustomMoE])
@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_round_trip(tmp_path, cls, tie):
    torch.manual_seed(0)
    kw = dict(layers=["moe", "dense"]) if cls is CustomMoE else {}
    model = cls(**kw, **SMALL, num_experts=4, tie_embeddings=tie, num_tasks=2).eval()
    with torch.no_grad():
        model.task_embed.weight.normal_()
    target = tmp_path / "model"
    model.save_pretrained(str(target))
    model.save_pretrained(str(target))  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in target.iterdir()) == ["config.yaml", "model.safetensors"]
    loaded = cls.load(str(target)).eval()
    assert type(loaded) is cls and loaded.config == model.config
    if tie:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids, tasks = torch.randint(0, 64, (2, 5)), torch.tensor([0, 1])
    torch.testing.assert_close(loaded(ids, task_ids=tasks).logits, model(ids, task_ids=tasks).logits)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        MoEModel.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.yaml"):
        MoEModel.load(str(tmp_path / "empty"))
    model = MoEModel(get_preset("tiny"))
    model.save_pretrained(str(tmp_path / "m"))
    (tmp_path / "m" / "config.yaml").write_text("model:\n  num_layers: 3\n  vocab_size: 256\n")
    with pytest.raises(ValueError, match="do not match"):
        MoEModel.load(str(tmp_path / "m"))
