"""``CustomMoE``: compose a model layer by layer (dense or MoE, and each MoE layer's router).

Layers are given as a list with one entry per layer: ``"dense"``, ``"moe"``, ``"moe:<router_type>"`` or a
dict of :class:`moe_lab.models.config.LayerSpec` fields. The result is an ordinary :class:`MoEModel` whose
config carries the per-layer ``layers`` list, so it saves, loads and trains like any other model.

Example:
    >>> model = CustomMoE(
    ...     ["dense", "moe:switch", {"kind": "moe", "num_experts": 8, "experts_per_token": 2}],
    ...     vocab_size=256, hidden_size=64, num_heads=4, num_experts=4,
    ... )
    >>> [model.config.resolve_layer(i).router_type for i in model.config.moe_layer_indices()]
    ['switch', 'top_k']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moe_lab.config import ConfigError
from moe_lab.models.config import ROUTER_TYPES, LayerSpec, ModelConfig
from moe_lab.models.model import MoEModel

__all__ = ["CustomMoE", "parse_layer_spec"]


def parse_layer_spec(item: str | dict[str, Any] | LayerSpec, index: int = 0) -> LayerSpec:
    """``"dense"`` / ``"moe"`` / ``"moe:switch"`` / dict / LayerSpec -> LayerSpec (errors name the layer)."""
    if isinstance(item, LayerSpec):
        return item
    if isinstance(item, dict):
        try:
            return LayerSpec(**item)
        except ConfigError as err:
            raise ConfigError(f"layers[{index}]: {err}") from None
    if isinstance(item, str):
        kind, _, router = item.partition(":")
        if kind == "dense" and not router:
            return LayerSpec(kind="dense")
        if kind == "moe" and (not router or router in ROUTER_TYPES):
            switch = {"experts_per_token": 1} if router == "switch" else {}
            return LayerSpec(kind="moe", router_type=router or None, **switch)  # type: ignore[arg-type]
    raise ConfigError(
        f"layers[{index}]: expected 'dense', 'moe', 'moe:<router>' (router in {list(ROUTER_TYPES)}) "
        f"or a mapping of LayerSpec fields, got {item!r}"
    )


class CustomMoE(MoEModel):
    """A model with a per-layer choice of dense FFN or MoE (and router, experts, top-k per MoE layer).

    ``CustomMoE(layers, config=None, **fields)``: ``num_layers`` is taken from ``len(layers)``.
    """

    def __init__(
        self,
        layers: Sequence[str | dict[str, Any] | LayerSpec] | None = None,
        config: ModelConfig | dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        if layers is not None:
            specs = [parse_layer_spec(item, i) for i, item in enumerate(layers)]
            fields = {**fields, "layers": [s.to_dict() for s in specs], "num_layers": len(specs)}
        super().__init__(config, **fields)
