"""Routers: score tokens against experts and return one :class:`RoutingDecision`.

Shape legend: T tokens (batch x sequence, flattened), K slots per token, E experts, D model dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lab.nn.routing import (
    RoutingDecision,
    _check_capacity_factor,
    _require,
    _token_choice_decision,
    _valid_mask,
    capacity_for,
)

__all__ = [
    "ROUTER_TYPES",
    "ExpertChoiceRouter",
    "RoutingDecision",
    "SigmoidBiasRouter",
    "SwitchRouter",
    "TopKRouter",
    "build_router",
    "capacity_for",
]

# ---------------------------------------------------------------------------------------------------------
# Routers. Legend: x_TD router input, logits_TE / probs_TE router scores, idx_TK chosen experts.
# ---------------------------------------------------------------------------------------------------------

ROUTER_TYPES = ("top_k", "switch", "expert_choice", "sigmoid_bias")


class _Router(nn.Module):
    """Common parts: the fp32 gate, the expert-bias buffer and its aux-loss-free update."""

    expert_bias: Tensor

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, bias_update_rate: float) -> None:
        super().__init__()
        _require(
            isinstance(hidden_size, int) and hidden_size > 0,
            f"hidden_size must be a positive int, got {hidden_size!r}",
        )
        _require(
            isinstance(num_experts, int) and num_experts > 0,
            f"num_experts must be a positive int, got {num_experts!r}",
        )
        _require(
            isinstance(top_k, int) and 0 < top_k <= num_experts,
            f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}",
        )
        _require(bias_update_rate >= 0, f"bias_update_rate must be >= 0, got {bias_update_rate!r}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.bias_update_rate = float(bias_update_rate)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))

    def logits(self, x_TD: Tensor) -> Tensor:
        """Router logits ``[T, E]`` in float32 (whatever the input and gate dtypes)."""
        if x_TD.dim() != 2 or x_TD.shape[-1] != self.hidden_size:  # message built only on error
            _require(False, f"router input must have shape [T, {self.hidden_size}], got {tuple(x_TD.shape)}")
        dev = x_TD.device.type
        if torch.is_autocast_enabled(dev):  # routing in float32 under autocast too (it would cast to bf16)
            with torch.autocast(dev, enabled=False):
                return F.linear(x_TD.float(), self.gate.weight.float())
        return F.linear(x_TD.float(), self.gate.weight.float())

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: Tensor, rate: float | None = None) -> None:
        """Aux-loss-free balancing step: ``bias += rate * sign(mean_load - load)``.

        Under-loaded experts get a higher selection bias, over-loaded ones a lower one. The bias only
        changes which experts are selected, never the combine weights.

        Example:
            >>> r = SigmoidBiasRouter(8, 4, top_k=1)
            >>> r.update_bias(torch.tensor([10, 0, 0, 2]), rate=0.1)
            >>> r.expert_bias.tolist()
            [-0.10000000149011612, 0.10000000149011612, 0.10000000149011612, 0.10000000149011612]
        """
        load = tokens_per_expert.detach().to(device=self.expert_bias.device, dtype=torch.float32)
        _require(
            load.shape == (self.num_experts,),
            f"tokens_per_expert must have shape [{self.num_experts}], got {tuple(load.shape)}",
        )
        step = self.bias_update_rate if rate is None else float(rate)
        delta = step * torch.sign(load.mean() - load)
        self.expert_bias.add_(delta.to(self.expert_bias.dtype))

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}"


class TopKRouter(_Router):
    """Softmax over all experts, then top-k (Mixtral, OLMoE, GShard).

    Args:
        hidden_size: model dim D.
        num_experts: E.
        top_k: experts per token.
        norm_topk_prob: renormalise the k weights to sum to 1 (Mixtral) or keep raw probs (OLMoE).
        capacity_factor: slots per expert as a multiple of the fair share ``T * k / E``; None = dropless.
        eval_capacity_factor: the same in eval mode (defaults to ``capacity_factor``).
        jitter_eps: multiplicative noise ``U(1 - eps, 1 + eps)`` on the router input in training.
        bias_update_rate: step of :meth:`update_bias` (aux-loss-free balancing); the bias starts at 0.

    Example:
        >>> router = TopKRouter(16, num_experts=4, top_k=2)
        >>> d = router(torch.randn(10, 16))
        >>> d.expert_indices.shape, bool(torch.allclose(d.combine_weights.sum(-1), torch.ones(10)))
        (torch.Size([10, 2]), True)
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        *,
        norm_topk_prob: bool = True,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        jitter_eps: float = 0.0,
        bias_update_rate: float = 1e-3,
    ) -> None:
        super().__init__(hidden_size, num_experts, top_k, bias_update_rate)
        _check_capacity_factor("capacity_factor", capacity_factor)
        _check_capacity_factor("eval_capacity_factor", eval_capacity_factor)
        _require(0.0 <= jitter_eps < 1.0, f"jitter_eps must be in [0, 1), got {jitter_eps!r}")
        self.norm_topk_prob = norm_topk_prob
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.jitter_eps = float(jitter_eps)

    def current_capacity_factor(self) -> float | None:
        """The capacity factor that applies now (train or eval)."""
        if not self.training and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor

    def forward(self, x_TD: Tensor, token_mask: Tensor | None = None) -> RoutingDecision:
        if self.training and self.jitter_eps > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            x_TD = x_TD * noise
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        select_TE = probs_TE.detach() + self.expert_bias.float()
        return _token_choice_decision(
            logits_TE,
            probs_TE,
            select_TE,
            self.top_k,
            normalize=self.norm_topk_prob and self.top_k > 1,
            capacity_factor=self.current_capacity_factor(),
            token_mask=token_mask,
        )


class SwitchRouter(TopKRouter):
    """Switch Transformer routing: top-1, capacity with token dropping, jitter noise.

    The kept slot's combine weight is the router probability (not renormalised). Slots over capacity are
    dropped in token order (``dropped`` is True there, the token passes through the residual only).
    ``capacity_factor=None`` is dropless.

    Example:
        >>> router = SwitchRouter(16, num_experts=4, capacity_factor=1.0)
        >>> d = router(torch.randn(12, 16))
        >>> bool((d.tokens_per_expert <= d.capacity).all())
        True
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        *,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = 2.0,
        jitter_eps: float = 0.0,
        bias_update_rate: float = 1e-3,
    ) -> None:
        super().__init__(
            hidden_size,
            num_experts,
            1,
            norm_topk_prob=False,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            jitter_eps=jitter_eps,
            bias_update_rate=bias_update_rate,
        )


class SigmoidBiasRouter(_Router):
    """DeepSeek-V3 routing with auxiliary-loss-free balancing.

    Scores are ``sigmoid(logits)``; the ``expert_bias`` buffer is added to the scores for the top-k
    selection only; the combine weights are the unbiased scores of the chosen experts normalised over the
    k (times ``routed_scaling_factor``). Call :meth:`update_bias` with the observed load after each step.

    Example:
        >>> router = SigmoidBiasRouter(16, num_experts=8, top_k=2)
        >>> d = router(torch.randn(5, 16))
        >>> router.update_bias(d.tokens_per_expert)
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        *,
        bias_update_rate: float = 1e-3,
        routed_scaling_factor: float = 1.0,
    ) -> None:
        super().__init__(hidden_size, num_experts, top_k, bias_update_rate)
        _require(
            routed_scaling_factor > 0,
            f"routed_scaling_factor must be > 0, got {routed_scaling_factor!r}",
        )
        self.routed_scaling_factor = float(routed_scaling_factor)

    def forward(self, x_TD: Tensor, token_mask: Tensor | None = None) -> RoutingDecision:
        logits_TE = self.logits(x_TD)
        scores_TE = torch.sigmoid(logits_TE)
        select_TE = scores_TE.detach() + self.expert_bias.float()
        return _token_choice_decision(
            logits_TE,
            scores_TE,
            select_TE,
            self.top_k,
            normalize=True,
            capacity_factor=None,
            token_mask=token_mask,
            scale=self.routed_scaling_factor,
        )


class ExpertChoiceRouter(_Router):
    """Expert-choice routing (Zhou et al. 2022): each expert picks its top-c tokens.

    ``c = ceil(capacity_factor * T * top_k / E)`` clamped to T (T counts non-padding tokens only). The
    decision has K = E slots: ``expert_indices[t, e] = e``, ``slot_mask[t, e]`` True where expert e
    picked token t, weight = softmax probability. A token may get 0..E experts; every expert gets exactly
    c tokens. Nothing is ever ``dropped``.

    Example:
        >>> router = ExpertChoiceRouter(16, num_experts=4, top_k=2)
        >>> d = router(torch.randn(8, 16))
        >>> d.slot_mask.sum(0).tolist()
        [4, 4, 4, 4]
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        *,
        capacity_factor: float = 1.0,
        bias_update_rate: float = 1e-3,
    ) -> None:
        super().__init__(hidden_size, num_experts, top_k, bias_update_rate)
        _require(
            capacity_factor is not None and capacity_factor > 0,
            f"capacity_factor must be a positive number for expert choice, got {capacity_factor!r}",
        )
        self.capacity_factor = float(capacity_factor)

    def forward(self, x_TD: Tensor, token_mask: Tensor | None = None) -> RoutingDecision:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        t, e = probs_TE.shape
        valid_T = _valid_mask(token_mask, t, probs_TE.device)
        n_valid = int(valid_T.sum())
        c = min(capacity_for(self.capacity_factor, n_valid, self.top_k, e), n_valid)
        select_TE = probs_TE.detach().masked_fill(~valid_T[:, None], -1.0)
        picked_CE = torch.topk(select_TE, c, dim=0).indices
        slot_TE = torch.zeros(t, e, dtype=torch.bool, device=probs_TE.device)
        slot_TE.scatter_(0, picked_CE, True)
        idx_TE = torch.arange(e, device=probs_TE.device).expand(t, e).contiguous()
        return RoutingDecision(
            expert_indices=idx_TE,
            combine_weights=torch.where(slot_TE, probs_TE, torch.zeros_like(probs_TE)),
            slot_mask=slot_TE,
            dropped=torch.zeros_like(slot_TE),
            router_logits=logits_TE,
            router_probs=probs_TE,
            tokens_per_expert=torch.full((e,), c, dtype=torch.int64, device=probs_TE.device),
            capacity=c,
            token_mask=token_mask,
        )


def build_router(router_type: str, hidden_size: int, num_experts: int, top_k: int, **kw: Any) -> _Router:
    """Build a router by name: ``"top_k"``, ``"switch"``, ``"expert_choice"`` or ``"sigmoid_bias"``.

    Keyword arguments go to the router's constructor; ``None`` values are left to the router's defaults
    except ``capacity_factor`` (None = dropless for token-choice routers).

    Example:
        >>> build_router("top_k", 16, 8, 2, norm_topk_prob=False).norm_topk_prob
        False
    """
    classes: dict[str, type[_Router]] = {
        "top_k": TopKRouter,
        "switch": SwitchRouter,
        "expert_choice": ExpertChoiceRouter,
        "sigmoid_bias": SigmoidBiasRouter,
    }
    _require(
        router_type in classes,
        f"router_type must be one of {list(ROUTER_TYPES)}, got {router_type!r}",
    )
    if router_type == "switch":
        _require(top_k == 1, f"top_k must be 1 for router_type='switch', got {top_k!r}")
        return SwitchRouter(hidden_size, num_experts, **kw)
    return classes[router_type](hidden_size, num_experts, top_k, **kw)
