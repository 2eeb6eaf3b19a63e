"""Decoder language models: :class:`ModelConfig`, :class:`MoEModel`, named families, presets, ``CustomMoE``.

Example:
    >>> from moe_lab.models import MoEModel, get_preset
    >>> model = MoEModel(get_preset("tiny"))
    >>> model.num_active_params() < model.num_params()
    True
"""

from moe_lab.models.config import LayerSpec, ModelConfig
from moe_lab.models.custom import CustomMoE
from moe_lab.models.families import (
    FAMILIES,
    DenseModel,
    MixtralModel,
    OLMoEModel,
    QwenMoEModel,
    SwitchModel,
)
from moe_lab.models.model import MoEModel, MoEOutput
from moe_lab.models.presets import get_preset, list_presets, register_preset

__all__ = [
    "FAMILIES",
    "CustomMoE",
    "DenseModel",
    "LayerSpec",
    "MixtralModel",
    "MoEModel",
    "MoEOutput",
    "ModelConfig",
    "OLMoEModel",
    "QwenMoEModel",
    "SwitchModel",
    "get_preset",
    "list_presets",
    "register_preset",
]
