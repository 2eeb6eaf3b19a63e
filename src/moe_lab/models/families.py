"""Named model families: thin subclasses of :class:`MoEModel` with each family's defaults.

``MixtralModel``, ``OLMoEModel``, ``QwenMoEModel`` (Qwen2-MoE defaults; Qwen3-MoE is
``QwenMoEModel(qk_norm="per_head", num_shared_experts=0, shared_expert_gate=False, attention_bias=False)``),
``SwitchModel`` and ``DenseModel``. Any field can be overridden. ``Family.from_pretrained(path)`` imports a
Hugging Face checkpoint through :mod:`moe_lab.interop` with the family fixed.

Example:
    >>> m = MixtralModel(vocab_size=256, hidden_size=64, num_layers=1, num_heads=4, ffn_hidden_size=64)
    >>> m.config.norm_topk_prob, m.config.num_experts, m.config.experts_per_token
    (True, 8, 2)
"""

from __future__ import annotations

from typing import Any, ClassVar

from moe_lab.models.model import MoEModel

__all__ = ["FAMILIES", "DenseModel", "MixtralModel", "OLMoEModel", "QwenMoEModel", "SwitchModel"]


class MixtralModel(MoEModel):
    """Mixtral: 8 experts, top-2 with renormalised weights, SwiGLU, GQA, rope theta 1e6, untied."""

    family: ClassVar[str | None] = "mixtral"
    family_defaults: ClassVar[dict[str, Any]] = {
        "num_experts": 8,
        "experts_per_token": 2,
        "router_type": "top_k",
        "norm_topk_prob": True,
        "activation": "swiglu",
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-5,
        "tie_embeddings": False,
    }


class OLMoEModel(MoEModel):
    """OLMoE: 64 fine-grained experts, top-8 without renormalisation, QK-norm over full q/k, untied."""

    family: ClassVar[str | None] = "olmoe"
    family_defaults: ClassVar[dict[str, Any]] = {
        "num_experts": 64,
        "experts_per_token": 8,
        "router_type": "top_k",
        "norm_topk_prob": False,
        "qk_norm": "full",
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_embeddings": False,
    }


class QwenMoEModel(MoEModel):
    """Qwen2-MoE: top-k without renormalisation, one gated shared expert, q/k/v bias, rope theta 1e6."""

    family: ClassVar[str | None] = "qwen_moe"
    family_defaults: ClassVar[dict[str, Any]] = {
        "num_experts": 60,
        "experts_per_token": 4,
        "router_type": "top_k",
        "norm_topk_prob": False,
        "num_shared_experts": 1,
        "shared_expert_gate": True,
        "attention_bias": True,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "tie_embeddings": False,
    }


class SwitchModel(MoEModel):
    """Switch Transformer: top-1 switch router, capacity factor 1.25 (2.0 in eval), MoE every other layer."""

    family: ClassVar[str | None] = "switch"
    family_defaults: ClassVar[dict[str, Any]] = {
        "num_experts": 8,
        "experts_per_token": 1,
        "router_type": "switch",
        "capacity_factor": 1.25,
        "eval_capacity_factor": 2.0,
        "moe_layer_frequency": 2,
        "moe_layer_offset": 1,
    }


class DenseModel(MoEModel):
    """A dense decoder (no experts): every layer a SwiGLU FFN of ``dense_ffn_hidden_size``."""

    family: ClassVar[str | None] = "dense"
    family_defaults: ClassVar[dict[str, Any]] = {"num_experts": 0}


FAMILIES: dict[str, type[MoEModel]] = {
    cls.family: cls  # type: ignore[misc]
    for cls in (MixtralModel, OLMoEModel, QwenMoEModel, SwitchModel, DenseModel)
}
