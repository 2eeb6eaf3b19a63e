"""Inference: generation, KV cache, expert cache/offload, quantisation, compile/ONNX export.

Generation is imported eagerly (the function ``generate`` must win over its module of the same name);
other names load on first access so ``import moe_lab.inference`` stays light.

Example:
    >>> from moe_lab.inference import generate, GenerationConfig
    >>> GenerationConfig(max_new_tokens=8).temperature
    0.0
"""

from __future__ import annotations

import importlib
from typing import Any

from moe_lab.inference.generate import (
    GenerationConfig,
    GenerationOutput,
    filter_logits,
    generate,
    sample_next_token,
)

# public name -> module defining it (other inference modules register their public names here)
_LAZY: dict[str, str] = {
    "KVCache": "moe_lab.nn.transformer",
    "OptimizedMoEModel": "moe_lab.inference.optimized",
}

__all__ = [
    "GenerationConfig",
    "GenerationOutput",
    "filter_logits",
    "generate",
    "sample_next_token",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moe_lab.inference' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
