"""Clear errors for wrong checkpoints, and the safetensors/config plumbing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_lab.interop import convert_config, load_pretrained, parse_hf_config, save_pretrained_hf
from moe_lab.interop.weights import atomic_dir, parse_size, read_checkpoint, write_checkpoint
from moe_lab.models import MoEModel


def test_family_mismatch_is_named(hf_checkpoint) -> None:
    _, folder = hf_checkpoint("mixtral")
    with pytest.raises(ValueError, match=r"model_type is 'mixtral' but family='olmoe'"):
        load_pretrained(folder, family="olmoe")


def test_family_classes_from_pretrained(hf_checkpoint) -> None:
    from moe_lab.models import MixtralModel, QwenMoEModel

    _, q3 = hf_checkpoint("qwen3_moe")
    assert QwenMoEModel.from_pretrained(str(q3)).config.qk_norm == "per_head"
    with pytest.raises(ValueError, match="family='mixtral'"):
        MixtralModel.from_pretrained(str(q3))


def test_weights_of_other_family_name_the_tensor(hf_checkpoint, tmp_path: Path) -> None:
    _, mixtral = hf_checkpoint("mixtral")
    _, olmoe = hf_checkpoint("olmoe", eos_token_id=2, pad_token_id=1)
    bad = tmp_path / "bad"
    shutil.copytree(olmoe, bad)
    for f in bad.glob("*.safetensors"):
        f.unlink()
    shutil.copy2(mixtral / "model.safetensors", bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.0\.self_attn\.q_norm\.weight'"):
        load_pretrained(bad)


def test_shape_mismatch_names_the_tensor(hf_checkpoint, tmp_path: Path) -> None:
    _, folder = hf_checkpoint("mixtral")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match=r"'model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\.weight' has shape"
    ):
        load_pretrained(folder)


def test_unexpected_tensor_is_named(hf_checkpoint) -> None:
    _, folder = hf_checkpoint("mixtral")
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['model\.layers\.0\.extra\.weight'\]"):
        load_pretrained(folder)


def test_hub_name_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download it first"):
        load_pretrained("mistralai/Mixtral-8x7B-v0.1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_pretrained(tmp_path / "empty")


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("model_type", "llama", "model_type: 'llama' is not supported"),
        ("hidden_act", "gelu", "hidden_act='gelu'"),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "rope_type='yarn'"),
        ("clip_qkv", 8.0, "clip_qkv"),
        ("num_experts_per_tok", 9, "num_experts_per_tok=9"),
    ],
)
def test_unsupported_config_fields(field, value, pattern) -> None:
    hf = {
        "model_type": "olmoe",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
    }
    hf[field] = value
    with pytest.raises(ValueError, match=pattern):
        parse_hf_config(hf)


def test_legacy_config_fields() -> None:
    """transformers 4.x configs: top-level rope_theta, num_local_experts for Qwen3, no qkv_bias."""
    base = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_experts_per_tok": 2,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "rope_theta": 5e5,
    }
    q3 = convert_config({**base, "model_type": "qwen3_moe", "num_local_experts": 4, "head_dim": 16})
    assert (q3.num_experts, q3.rope_theta, q3.head_dim, q3.qk_norm) == (4, 5e5, 16, "per_head")
    q2 = convert_config(
        {**base, "model_type": "qwen2_moe", "num_experts": 4, "shared_expert_intermediate_size": 8}
    )
    assert q2.attention_bias and not q2.attention_out_bias and q2.shared_expert_gate
    m = convert_config({**base, "model_type": "mixtral", "num_local_experts": 4, "rope_theta": None})
    assert m.rope_theta == 1e6 and m.norm_topk_prob and m.ffn_hidden_size == 64


def test_export_refuses_what_hf_cannot_express(tmp_path: Path) -> None:
    model = MoEModel(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_experts=4, norm_topk_prob=False
    )
    with pytest.raises(ValueError, match="no Hugging Face family matches"):
        save_pretrained_hf(model, tmp_path / "x")
    switch = MoEModel(
        vocab_size=64, hidden_size=32, num_heads=4, num_experts=4, experts_per_token=1, router_type="switch"
    )
    with pytest.raises(ValueError, match=r"model\.router_type"):
        save_pretrained_hf(switch, tmp_path / "y", family="mixtral")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_write_and_read_sharded(tmp_path: Path) -> None:
    state = {f"t{i}": torch.randn(10, 10) for i in range(5)}  # 400 bytes each
    names = write_checkpoint(state, tmp_path, max_shard_size=900)
    assert len(names) == 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000 and set(index["weight_map"]) == set(state)
    back = read_checkpoint(tmp_path)
    assert all(torch.equal(back[k], state[k]) for k in state)
    (tmp_path / names[1]).unlink()
    with pytest.raises(FileNotFoundError, match=names[1]):
        read_checkpoint(tmp_path)


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(7) == 7
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


def test_atomic_dir_keeps_old_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        with atomic_dir(out):
            pass

    def failing_write() -> None:
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        failing_write()
    assert (out / "old.txt").read_text() == "old" and not (out / "new.txt").exists()
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (out / "new.txt").is_file() and not (out / "old.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
