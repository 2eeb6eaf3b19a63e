"""Named model presets: ``get_preset(name) -> ModelConfig``, ``list_presets()``, ``register_preset(name, cfg)``.

The ``configs/<name>.yaml`` files hold the same settings as YAML (a test keeps them in sync).

=============  ================================================================================
``tiny``       tests: byte vocab, D=64, 2 layers, 4 experts top-2 (~0.2M parameters)
``small``      the demo: vocab 4096, D=256, 4 layers, 8 experts top-2, F=512
``switch``     Switch Transformer: top-1 switch router, capacity 1.25, MoE every other layer
``mixtral-like`` Mixtral at small scale: 8 experts top-2 SwiGLU, GQA 8/2 heads, rope 1e6
``olmoe-like`` OLMoE at small scale: 64 fine-grained experts top-8, QK-norm "full", no renorm
``qwen-moe-like`` Qwen2-MoE at small scale: 16 experts top-4 (no renorm) + one gated shared expert, q/k/v bias
``dense``      dense SwiGLU with the same active parameters as ``small``
=============  ================================================================================

Example:
    >>> get_preset("tiny").num_experts
    4
    >>> "small" in list_presets()
    True
"""

from __future__ import annotations

from typing import Any

from moe_lab.config import ConfigError
from moe_lab.models.config import ModelConfig

__all__ = ["get_preset", "list_presets", "register_preset"]

_SMALL: dict[str, Any] = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "num_layers": 4,
    "num_heads": 8,
    "num_kv_heads": 4,
    "ffn_hidden_size": 512,
    "num_experts": 8,
    "experts_per_token": 2,
    "max_seq_len": 1024,
    "tie_embeddings": True,
}

_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 256,
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "ffn_hidden_size": 128,
        "num_experts": 4,
        "experts_per_token": 2,
        "max_seq_len": 512,
        "tie_embeddings": True,
    },
    "small": dict(_SMALL),
    "switch": {
        **_SMALL,
        "ffn_hidden_size": 1024,
        "experts_per_token": 1,
        "router_type": "switch",
        "capacity_factor": 1.25,
        "eval_capacity_factor": 2.0,
        "moe_layer_frequency": 2,
        "moe_layer_offset": 1,
        "dense_ffn_hidden_size": 1024,
    },
    "mixtral-like": {
        **_SMALL,
        "num_kv_heads": 2,
        "ffn_hidden_size": 896,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-5,
        "tie_embeddings": False,
    },
    "olmoe-like": {
        **_SMALL,
        "num_kv_heads": None,
        "ffn_hidden_size": 128,
        "num_experts": 64,
        "experts_per_token": 8,
        "norm_topk_prob": False,
        "qk_norm": "full",
        "rms_norm_eps": 1e-5,
        "tie_embeddings": False,
    },
    "qwen-moe-like": {
        **_SMALL,
        "ffn_hidden_size": 256,
        "num_experts": 16,
        "experts_per_token": 4,
        "norm_topk_prob": False,
        "num_shared_experts": 1,
        "shared_expert_hidden_size": 512,
        "shared_expert_gate": True,
        "attention_bias": True,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "tie_embeddings": False,
    },
    "dense": {
        **_SMALL,
        "num_experts": 0,
        "dense_ffn_hidden_size": 1024,
    },
}


def list_presets() -> list[str]:
    """Names of the registered presets, sorted."""
    return sorted(_PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A fresh :class:`ModelConfig` for preset ``name`` (fields in ``overrides`` replace the preset's)."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown model preset '{name}'; available: {', '.join(list_presets())}")
    return ModelConfig(**{**_PRESETS[name], **overrides})


def register_preset(name: str, config: ModelConfig | dict[str, Any], *, overwrite: bool = False) -> None:
    """Add a preset (a ModelConfig or its fields). Existing names need ``overwrite=True``."""
    if name in _PRESETS and not overwrite:
        raise ValueError(f"model preset '{name}' already exists (pass overwrite=True to replace it)")
    fields = config.to_dict() if isinstance(config, ModelConfig) else dict(config)
    ModelConfig(**fields)  # validate now, not at first use
    _PRESETS[name] = fields
