"""Single-device MoE building blocks (routers, experts, dispatch, losses, transformer). Imports only torch."""

from moe_lab.nn.router import RoutingDecision

__all__ = ["RoutingDecision"]
