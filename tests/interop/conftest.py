"""Tiny random Hugging Face MoE checkpoints made with ``transformers`` itself (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 96


def hf_config(family: str, **over: Any) -> Any:
    """A tiny config of ``family`` (hidden 32, 2 layers, 4 experts, top-2)."""
    common: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    if family == "mixtral":
        cfg = transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=4, **over)
    elif family == "olmoe":
        cfg = transformers.OlmoeConfig(**common, intermediate_size=48, num_experts=4, **over)
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(
            **common,
            intermediate_size=64,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=4,
            **over,
        )
    elif family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            **common, intermediate_size=64, moe_intermediate_size=24, head_dim=16, num_experts=4, **over
        )
    else:
        raise ValueError(family)
    return cfg


def make_hf_model(family: str, seed: int = 0, **over: Any) -> Any:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config(family, **over), attn_implementation="eager"
    )
    # transformers initialises norms to 1 and biases to 0: randomise them so the mapping of every
    # tensor is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "gate.weight" in name:  # wider router logits: fewer near-ties in top-k
                p.mul_(20.0)
    return model.eval()


def save_hf(model: Any, directory: Path, **kwargs: Any) -> Path:
    model.save_pretrained(directory, **kwargs)
    return directory


@pytest.fixture
def hf_checkpoint(tmp_path: Path):
    """Factory: ``hf_checkpoint(family, **config_overrides) -> (hf_model, folder)``."""

    def make(family: str, *, seed: int = 0, max_shard_size: str | None = None, **over: Any):
        model = make_hf_model(family, seed, **over)
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        return model, save_hf(model, tmp_path / f"{family}-{seed}", **kwargs)

    return make
