"""Import Hugging Face MoE checkpoints into :class:`~moe_lab.models.MoEModel` and export them back.

Example:
    >>> # model = load_pretrained("/models/OLMoE-1B-7B-0924")          # family from config.json
    >>> # save_pretrained_hf(model, "out/olmoe-hf", tokenizer_dir="/models/OLMoE-1B-7B-0924")
    >>> # transformers.AutoModelForCausalLM.from_pretrained("out/olmoe-hf") gives the same logits
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from moe_lab.interop.families import hf_to_moe_state, moe_to_hf_state
from moe_lab.interop.hf_config import FAMILIES, HFArch, parse_hf_config, read_hf_config, to_hf_config
from moe_lab.interop.weights import atomic_dir, read_checkpoint, write_checkpoint
from moe_lab.models import ModelConfig, MoEModel
from moe_lab.models.io import assign_state

__all__ = [
    "TOKENIZER_FILES",
    "arch_to_model_config",
    "convert_config",
    "infer_family",
    "load_pretrained",
    "model_config_to_arch",
    "save_pretrained_hf",
]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)


def arch_to_model_config(arch: HFArch, **overrides: Any) -> ModelConfig:
    """The moe-lab :class:`ModelConfig` that computes exactly what the Hugging Face model computes."""
    fields: dict[str, Any] = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        num_layers=arch.num_layers,
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        ffn_hidden_size=arch.expert_ffn_size,
        dense_ffn_hidden_size=arch.dense_ffn_size,
        num_experts=arch.num_experts,
        experts_per_token=arch.top_k,
        router_type="top_k",
        norm_topk_prob=arch.norm_topk_prob,
        moe_layers=list(arch.moe_layers),
        num_shared_experts=1 if arch.shared_expert_size else 0,
        shared_expert_hidden_size=arch.shared_expert_size or None,
        shared_expert_gate=arch.shared_expert_gate,
        activation="swiglu",
        capacity_factor=None,
        eval_capacity_factor=None,
        jitter_eps=0.0,
        aux_loss_coef=arch.router_aux_loss_coef,
        z_loss_coef=0.0,
        max_seq_len=arch.max_position_embeddings,
        rope_theta=arch.rope_theta,
        rms_norm_eps=arch.rms_norm_eps,
        qk_norm=arch.qk_norm,
        attention_bias=arch.qkv_bias,
        attention_out_bias=arch.o_bias,
        tie_embeddings=arch.tie_embeddings,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def convert_config(
    hf_config: dict[str, Any] | str | os.PathLike[str], family: str | None = None
) -> ModelConfig:
    """A Hugging Face ``config.json`` (dict, file or checkpoint folder) -> :class:`ModelConfig`.

    >>> convert_config({"model_type": "olmoe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 16,
    ...     "num_hidden_layers": 2, "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2}).qk_norm
    'full'
    """
    if not isinstance(hf_config, dict):
        path = Path(hf_config)
        hf_config = read_hf_config(path if path.is_dir() else path.parent)
    return arch_to_model_config(parse_hf_config(hf_config, family))


def infer_family(cfg: ModelConfig) -> str:
    """The Hugging Face family whose architecture matches ``cfg`` (errors say why none does)."""
    if cfg.qk_norm == "full":
        return "olmoe"
    if cfg.qk_norm == "per_head":
        return "qwen3_moe"
    if cfg.num_shared_experts:
        return "qwen2_moe"
    if cfg.norm_topk_prob:
        return "mixtral"
    raise ValueError(
        "no Hugging Face family matches this model: without QK norm or a shared expert only Mixtral fits, "
        "and Mixtral needs norm_topk_prob=True"
    )


def model_config_to_arch(cfg: ModelConfig, family: str | None = None, base: HFArch | None = None) -> HFArch:
    """The :class:`HFArch` of a moe-lab config; raises naming the field that no HF family can express."""
    fam = family or infer_family(cfg)
    if fam not in FAMILIES:
        raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, got {fam!r}")
    if cfg.layers is not None:
        raise ValueError("model.layers: per-layer overrides cannot be exported to a Hugging Face family")
    checks = [
        (cfg.num_experts > 0, "num_experts", "an MoE model (num_experts > 0)"),
        (cfg.router_type == "top_k", "router_type", "'top_k' (softmax top-k)"),
        (cfg.activation == "swiglu", "activation", "'swiglu'"),
        (cfg.num_tasks == 0, "num_tasks", "0 (task embeddings have no Hugging Face equivalent)"),
        (cfg.eval_capacity_factor is None, "eval_capacity_factor", "None (dropless inference)"),
        (
            cfg.num_shared_experts == 0 or cfg.shared_expert_gate,
            "shared_expert_gate",
            "True with shared experts",
        ),
    ]
    for ok, name, want in checks:
        if not ok:
            raise ValueError(f"model.{name}: Hugging Face export needs {want}, got {getattr(cfg, name)!r}")
    shared = cfg.num_shared_experts * (cfg.shared_expert_hidden_size or cfg.ffn_hidden_size)
    arch = HFArch(
        family=fam,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.kv_heads,
        head_dim=cfg.effective_head_dim,
        expert_ffn_size=cfg.ffn_hidden_size,
        dense_ffn_size=cfg.effective_dense_ffn_hidden_size,
        num_experts=cfg.num_experts,
        top_k=cfg.experts_per_token,
        norm_topk_prob=cfg.norm_topk_prob,
        moe_layers=cfg.moe_layer_indices(),
        shared_expert_size=shared,
        shared_expert_gate=cfg.shared_expert_gate,
        qk_norm=cfg.qk_norm,
        qkv_bias=cfg.attention_bias,
        o_bias=cfg.attention_out_bias,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_seq_len,
        router_aux_loss_coef=cfg.aux_loss_coef,
    )
    if base is not None:
        arch.bos_token_id, arch.eos_token_id, arch.pad_token_id = (
            base.bos_token_id,
            base.eos_token_id,
            base.pad_token_id,
        )
    to_hf_config(arch)  # validates that this family can express the architecture
    return arch


def load_pretrained(
    path: str | os.PathLike[str],
    family: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **config_overrides: Any,
) -> MoEModel:
    """Load a local Hugging Face checkpoint folder (``config.json`` + safetensors, sharded or not).

    Args:
        path: the folder (download hub models first, e.g. ``huggingface-cli download``).
        family: expected family (``mixtral``, ``olmoe``, ``qwen2_moe``, ``qwen3_moe``); None = from
            ``config.json``'s ``model_type``.
        dtype: cast floating weights (None keeps what the files hold).
        device: move the model there.
        config_overrides: extra :class:`ModelConfig` fields (``max_seq_len=4096``, ``impl="loop"``...).

    >>> # model = load_pretrained("/models/Mixtral-8x7B-v0.1", dtype=torch.bfloat16)
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: not a local directory; download it first (e.g. huggingface-cli download "
            f"{path} --local-dir DIR) and pass the local directory"
        )
    arch = parse_hf_config(read_hf_config(folder), family)
    cfg = arch_to_model_config(arch, **config_overrides)
    hf_state = read_checkpoint(folder, dtype=dtype)
    with torch.device("meta"):  # no random init of a model that is about to be overwritten
        model = MoEModel(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = hf_to_moe_state(hf_state, arch, expected, where=str(folder))
    del hf_state
    for key, value in model.state_dict().items():
        if key.endswith("router.expert_bias"):  # balancing bias: zero (HF routers have none)
            state[key] = torch.zeros(value.shape, dtype=value.dtype)
    assign_state(model, state, str(folder))
    model.hf_arch = arch  # type: ignore[assignment]  # kept for export (token ids, family)
    return model.to(device) if device is not None else model


def save_pretrained_hf(
    model: MoEModel,
    out_dir: str | os.PathLike[str],
    *,
    family: str | None = None,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint folder that ``transformers`` loads directly.

    Args:
        family: target family; None = the family the model was imported from, else inferred from the config.
        tokenizer_dir: copy tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ...) from here.
        max_shard_size: shard limit (``"5GB"``, ``"200MB"`` or bytes); > 1 shard adds the index JSON.
        dtype: cast floating weights (e.g. ``torch.bfloat16``); None keeps the model's dtype.
        overwrite: replace an existing non-empty ``out_dir``.

    The folder is written to a temporary sibling and renamed into place.
    """
    base: HFArch | None = getattr(model, "hf_arch", None)
    fam = family or (base.family if base is not None else None)
    arch = model_config_to_arch(model.config, fam, base)
    for name, buf in model.named_buffers():
        if name.endswith("router.expert_bias") and bool(buf.abs().max() > 0):
            raise ValueError(
                f"{name}: the router's balancing bias is non-zero (trained with aux_free_bias); "
                "Hugging Face routers have no such bias, so the export would route differently"
            )
    hf_state = moe_to_hf_state(
        model.state_dict(), arch, (lambda t: t.to(dtype)) if dtype is not None else None
    )
    first = next(iter(hf_state.values()))
    dtype_name = str(first.dtype).removeprefix("torch.")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_checkpoint(hf_state, tmp, max_shard_size)
        hf_cfg = to_hf_config(arch, dtype=dtype_name)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n", encoding="utf-8")
        if tokenizer_dir is not None:
            src = Path(tokenizer_dir)
            if not src.is_dir():
                raise FileNotFoundError(f"tokenizer_dir {src}: not a directory")
            copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
            if not copied:
                raise FileNotFoundError(
                    f"tokenizer_dir {src}: no tokenizer files ({', '.join(TOKENIZER_FILES)})"
                )
            for name in copied:
                shutil.copy2(src / name, tmp / name)
    return Path(out_dir)
