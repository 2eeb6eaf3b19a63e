"""Open MoE Trainer Lab: train, analyse, fine-tune, optimise and serve Mixture-of-Experts language models.

Importing ``moe_lab`` is cheap (it does not even import torch): every public name loads on first access, so
``moe-lab --help`` and ``import moe_lab.config`` stay fast.

Example:
    >>> import moe_lab
    >>> model = moe_lab.MoEModel.from_preset("tiny")
    >>> sorted(moe_lab.list_presets())[:2]
    ['dense', 'mixtral-like']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

try:
    from moe_lab._version import __version__
except ImportError:  # pragma: no cover - source tree without the generated version file
    try:
        from importlib.metadata import version as _dist_version

        __version__ = _dist_version("moe-lab")
    except Exception:
        __version__ = "0.0.0+unknown"

if TYPE_CHECKING:  # pragma: no cover
    from moe_lab.analytics import RouterMonitor
    from moe_lab.inference import GenerationConfig, GenerationOutput, OptimizedMoEModel, generate
    from moe_lab.models import CustomMoE, ModelConfig, MoEModel, MoEOutput, get_preset, list_presets
    from moe_lab.nn.router import RoutingDecision
    from moe_lab.train import MoETrainer

# name -> module that defines it; imported on first access (keeps `import moe_lab` light)
_LAZY: dict[str, str] = {
    "MoEModel": "moe_lab.models",
    "MoEOutput": "moe_lab.models",
    "ModelConfig": "moe_lab.models",
    "CustomMoE": "moe_lab.models",
    "get_preset": "moe_lab.models",
    "list_presets": "moe_lab.models",
    "RoutingDecision": "moe_lab.nn.router",
    "MoETrainer": "moe_lab.train",
    "RouterMonitor": "moe_lab.analytics",
    "OptimizedMoEModel": "moe_lab.inference",
    "generate": "moe_lab.inference",
    "GenerationConfig": "moe_lab.inference",
    "GenerationOutput": "moe_lab.inference",
}

__all__ = [
    "CustomMoE",
    "GenerationConfig",
    "GenerationOutput",
    "MoEModel",
    "MoEOutput",
    "MoETrainer",
    "ModelConfig",
    "OptimizedMoEModel",
    "RouterMonitor",
    "RoutingDecision",
    "__version__",
    "generate",
    "get_preset",
    "list_presets",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moe_lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
