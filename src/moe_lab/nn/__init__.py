"""Single-device MoE building blocks (routers, experts, dispatch, losses, transformer). Imports only torch."""

from moe_lab.nn.dispatch import DispatchPlan, dispatch_combine, moe_capacity, moe_dropless, plan_dispatch
from moe_lab.nn.experts import Experts, SharedExperts, grouped_matmul, has_grouped_mm
from moe_lab.nn.losses import expert_choice_fractions, load_balancing_loss, router_z_loss
from moe_lab.nn.moe import MoELayer
from moe_lab.nn.router import (
    ROUTER_TYPES,
    ExpertChoiceRouter,
    RoutingDecision,
    SigmoidBiasRouter,
    SwitchRouter,
    TopKRouter,
    build_router,
    capacity_for,
)
from moe_lab.nn.transformer import (
    Attention,
    DecoderBlock,
    DenseFFN,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    build_attention_mask,
    repeat_kv,
    rotate_half,
)

__all__ = [
    "ROUTER_TYPES",
    "Attention",
    "DecoderBlock",
    "DenseFFN",
    "DispatchPlan",
    "ExpertChoiceRouter",
    "Experts",
    "KVCache",
    "MoELayer",
    "RMSNorm",
    "RotaryEmbedding",
    "RoutingDecision",
    "SharedExperts",
    "SigmoidBiasRouter",
    "SwitchRouter",
    "TopKRouter",
    "apply_rotary",
    "build_attention_mask",
    "build_router",
    "capacity_for",
    "dispatch_combine",
    "expert_choice_fractions",
    "grouped_matmul",
    "has_grouped_mm",
    "load_balancing_loss",
    "moe_capacity",
    "moe_dropless",
    "plan_dispatch",
    "repeat_kv",
    "rotate_half",
    "router_z_loss",
]
