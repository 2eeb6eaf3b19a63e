"""Hugging Face ``config.json`` <-> moe-lab :class:`~moe_lab.models.ModelConfig` for the supported families.

Families (the ``model_type`` in ``config.json``): ``mixtral``, ``olmoe``, ``qwen2_moe``, ``qwen3_moe``.
:class:`HFArch` is the family-neutral description both directions go through; features moe-lab cannot
reproduce exactly (sliding-window attention, RoPE scaling, QKV clipping, non-SiLU experts) are refused
with an error naming the ``config.json`` field, instead of loading a model that would compute something else.

Example:
    >>> arch = parse_hf_config({"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32,
    ...     "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
    ...     "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2})
    >>> arch.num_experts, arch.norm_topk_prob, arch.rope_theta
    (4, True, 1000000.0)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FAMILIES", "HFArch", "detect_family", "parse_hf_config", "read_hf_config", "to_hf_config"]

FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
_ARCH_CLASS = {
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
_DEFAULT_THETA = {"mixtral": 1_000_000.0}


@dataclass
class HFArch:
    """Everything about a Hugging Face MoE decoder that the weights and the maths depend on.

    ``moe_layers`` lists the layer indices with a sparse MoE FFN; the others use a dense SwiGLU FFN of width
    ``dense_ffn_size``. ``qk_norm`` is ``"none"``, ``"full"`` (OLMoE: RMSNorm over all heads at once) or
    ``"per_head"`` (Qwen3: RMSNorm over each head's ``head_dim``). ``qkv_bias``/``o_bias`` are the biases of
    the attention projections.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    expert_ffn_size: int
    dense_ffn_size: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    moe_layers: list[int]
    shared_expert_size: int = 0
    shared_expert_gate: bool = False
    qk_norm: str = "none"
    qkv_bias: bool = False
    o_bias: bool = False
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    router_aux_loss_coef: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_hf_config(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``config.json`` of a Hugging Face checkpoint directory (clear errors when absent/invalid)."""
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (a Hugging Face checkpoint directory has a config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def detect_family(hf: dict[str, Any], family: str | None = None) -> str:
    """The family from ``model_type`` (checked against ``family`` when given; ``qwen_moe`` accepts both
    Qwen families)."""
    model_type = hf.get("model_type")
    if family == "qwen_moe":
        family = model_type if model_type in ("qwen2_moe", "qwen3_moe") else "qwen2_moe"
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}")
    if model_type not in FAMILIES:
        if family is None:
            raise ValueError(
                f"config.json model_type: {model_type!r} is not supported; expected one of {', '.join(FAMILIES)}"
            )
        raise ValueError(f"config.json model_type is {model_type!r} but family={family!r} was requested")
    if family is not None and family != model_type:
        raise ValueError(f"config.json model_type is {model_type!r} but family={family!r} was requested")
    return str(model_type)


def _req(hf: dict[str, Any], *names: str) -> Any:
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    raise ValueError(f"config.json: missing required field '{names[0]}'")


def _rope_theta(hf: dict[str, Any], family: str) -> float:
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    for source, name in ((params, "rope_parameters"), (legacy, "rope_scaling")):
        rope_type = source.get("rope_type", source.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"config.json {name}.rope_type={rope_type!r}: only default RoPE is supported")
    theta = params.get("rope_theta") or hf.get("rope_theta") or _DEFAULT_THETA.get(family, 10_000.0)
    try:
        return float(theta)
    except (TypeError, ValueError):
        raise ValueError(f"config.json rope_theta: expected a number, got {theta!r}") from None


def parse_hf_config(hf: dict[str, Any], family: str | None = None) -> HFArch:
    """Parse a Hugging Face ``config.json`` dict into an :class:`HFArch` (errors name the field)."""
    fam = detect_family(hf, family)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act={act!r}: only 'silu' (SwiGLU experts) is supported")
    hidden = int(_req(hf, "hidden_size"))
    heads = int(_req(hf, "num_attention_heads"))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    layers = int(_req(hf, "num_hidden_layers"))
    head_dim = int(hf.get("head_dim") or hidden // heads)
    if fam == "olmoe" and head_dim * heads != hidden:
        raise ValueError("config.json head_dim: OLMoE requires head_dim * num_attention_heads == hidden_size")
    num_experts = int(_req(hf, "num_local_experts", "num_experts"))
    arch = HFArch(
        family=fam,
        vocab_size=int(_req(hf, "vocab_size")),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        expert_ffn_size=int(_req(hf, "moe_intermediate_size", "intermediate_size"))
        if fam in ("qwen2_moe", "qwen3_moe")
        else int(_req(hf, "intermediate_size")),
        dense_ffn_size=int(_req(hf, "intermediate_size")),
        num_experts=num_experts,
        top_k=int(_req(hf, "num_experts_per_tok")),
        norm_topk_prob=True if fam == "mixtral" else bool(hf.get("norm_topk_prob", False)),
        moe_layers=list(range(layers)),
        rope_theta=_rope_theta(hf, fam),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5 if fam in ("mixtral", "olmoe") else 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings") or 4096),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
    )
    if not 1 <= arch.top_k <= num_experts:
        raise ValueError(f"config.json num_experts_per_tok={arch.top_k}: expected 1..{num_experts}")
    if fam in ("mixtral", "qwen3_moe") or (fam == "qwen2_moe" and hf.get("use_sliding_window")):
        window = hf.get("sliding_window")
        if fam != "mixtral" and not hf.get("use_sliding_window"):
            window = None
        if window:
            # Equivalent to full causal attention for sequences no longer than the window.
            arch.max_position_embeddings = min(arch.max_position_embeddings, int(window))
            arch.extra["sliding_window"] = int(window)
    if fam == "olmoe":
        if hf.get("clip_qkv") is not None:
            raise ValueError("config.json clip_qkv: QKV clipping (OLMoE option) is not supported by moe-lab")
        arch.qk_norm = "full"
        arch.qkv_bias = arch.o_bias = bool(hf.get("attention_bias", False))
    elif fam == "qwen3_moe":
        arch.qk_norm = "per_head"
        arch.qkv_bias = arch.o_bias = bool(hf.get("attention_bias", False))
    elif fam == "qwen2_moe":
        arch.qkv_bias = bool(hf.get("qkv_bias", True))
        arch.shared_expert_size = int(hf.get("shared_expert_intermediate_size") or 0)
        arch.shared_expert_gate = arch.shared_expert_size > 0
    if fam in ("qwen2_moe", "qwen3_moe"):
        mlp_only = set(hf.get("mlp_only_layers") or [])
        step = int(hf.get("decoder_sparse_step") or 1)
        arch.moe_layers = [
            i for i in range(layers) if i not in mlp_only and num_experts > 0 and (i + 1) % step == 0
        ]
    return arch


def to_hf_config(arch: HFArch, dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` dict that ``transformers`` reads back into the same architecture."""
    fam = arch.family
    if fam not in FAMILIES:
        raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, got {fam!r}")
    out: dict[str, Any] = {
        "architectures": [_ARCH_CLASS[fam]],
        "model_type": fam,
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": arch.rope_theta},
        "rope_theta": arch.rope_theta,
        "tie_word_embeddings": arch.tie_embeddings,
        "num_experts_per_tok": arch.top_k,
        "router_aux_loss_coef": arch.router_aux_loss_coef,
        "output_router_logits": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": arch.eos_token_id,
        "pad_token_id": arch.pad_token_id,
        "dtype": dtype,
    }
    dense = sorted(set(range(arch.num_layers)) - set(arch.moe_layers))
    if fam == "mixtral":
        if dense or arch.shared_expert_size or arch.qk_norm != "none" or arch.qkv_bias or arch.o_bias:
            raise ValueError("Mixtral format: every layer must be MoE, no shared expert, QK norm or bias")
        if not arch.norm_topk_prob:
            raise ValueError(
                "Mixtral format: requires norm_topk_prob=True (Mixtral renormalises top-k weights)"
            )
        if arch.head_dim * arch.num_heads != arch.hidden_size:
            out["head_dim"] = arch.head_dim
        out.update(
            intermediate_size=arch.expert_ffn_size,
            num_local_experts=arch.num_experts,
            sliding_window=None,
            router_jitter_noise=0.0,
        )
    elif fam == "olmoe":
        if dense or arch.shared_expert_size or arch.qk_norm != "full":
            raise ValueError("OLMoE format: every layer MoE, no shared expert, full QK norm")
        if arch.qkv_bias != arch.o_bias or arch.head_dim * arch.num_heads != arch.hidden_size:
            raise ValueError("OLMoE format: attention_bias covers q/k/v/o alike; head_dim * heads == hidden")
        out.update(
            intermediate_size=arch.expert_ffn_size,
            num_experts=arch.num_experts,
            norm_topk_prob=arch.norm_topk_prob,
            attention_bias=arch.qkv_bias,
            clip_qkv=None,
        )
    else:
        step_layers = [i for i in range(arch.num_layers) if i not in arch.moe_layers]
        out.update(
            intermediate_size=arch.dense_ffn_size,
            moe_intermediate_size=arch.expert_ffn_size,
            num_experts=arch.num_experts,
            norm_topk_prob=arch.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=step_layers,
            use_sliding_window=False,
            sliding_window=None,
        )
        if fam == "qwen2_moe":
            if arch.qk_norm != "none" or arch.o_bias:
                raise ValueError("Qwen2-MoE format: no QK norm and no o_proj bias")
            if arch.shared_expert_size and not arch.shared_expert_gate:
                raise ValueError("Qwen2-MoE format: the shared expert always has a sigmoid gate")
            if not arch.shared_expert_size:
                raise ValueError("Qwen2-MoE format: requires a shared expert (use qwen3_moe without one)")
            out.update(
                qkv_bias=arch.qkv_bias,
                shared_expert_intermediate_size=arch.shared_expert_size,
                max_window_layers=arch.num_layers,
            )
            out["head_dim"] = arch.head_dim
        else:
            if arch.shared_expert_size or arch.qk_norm != "per_head" or arch.qkv_bias != arch.o_bias:
                raise ValueError(
                    "Qwen3-MoE format: no shared expert, per-head QK norm, bias on q/k/v/o alike"
                )
            out.update(head_dim=arch.head_dim, attention_bias=arch.qkv_bias)
    return out
