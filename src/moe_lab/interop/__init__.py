"""Hugging Face interop: import Mixtral / OLMoE / Qwen2-MoE / Qwen3-MoE checkpoints and export back.

Reads the checkpoint folder as ``transformers``' ``save_pretrained`` writes it (``config.json`` +
``model.safetensors`` or shards with ``model.safetensors.index.json``); no network access, no pickle.

Example:
    >>> from moe_lab.interop import FAMILIES
    >>> FAMILIES
    ('mixtral', 'olmoe', 'qwen2_moe', 'qwen3_moe')
    >>> # model = load_pretrained("/models/Mixtral-8x7B-v0.1")
    >>> # save_pretrained_hf(model, "out/mixtral-hf", max_shard_size="2GB")
"""

from __future__ import annotations

from moe_lab.interop.api import (
    arch_to_model_config,
    convert_config,
    infer_family,
    load_pretrained,
    model_config_to_arch,
    save_pretrained_hf,
)
from moe_lab.interop.hf_config import FAMILIES, HFArch, detect_family, parse_hf_config, to_hf_config
from moe_lab.interop.weights import read_checkpoint, write_checkpoint

__all__ = [
    "FAMILIES",
    "HFArch",
    "arch_to_model_config",
    "convert_config",
    "detect_family",
    "infer_family",
    "load_pretrained",
    "model_config_to_arch",
    "parse_hf_config",
    "read_checkpoint",
    "save_pretrained_hf",
    "to_hf_config",
    "write_checkpoint",
]
