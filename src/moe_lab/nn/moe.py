"""MoELayer = router -> dispatch -> experts -> combine (+ shared experts).

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, F expert FFN dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moe_lab.nn.decode_path import small_batch_method, small_batch_moe
from moe_lab.nn.dispatch import DISPATCH_IMPLS, dispatch_combine
from moe_lab.nn.eager import call_module
from moe_lab.nn.experts import Experts, SharedExperts
from moe_lab.nn.router import ROUTER_TYPES, RoutingDecision, build_router

__all__ = ["MoELayer"]


def _router_kwargs(
    router_type: str,
    *,
    norm_topk_prob: bool,
    capacity_factor: float | None,
    eval_capacity_factor: float | None,
    jitter_eps: float,
    bias_update_rate: float,
) -> dict[str, Any]:
    """The router arguments that apply to ``router_type``; ones that cannot apply raise ValueError."""
    kw: dict[str, Any] = {"bias_update_rate": bias_update_rate}
    if router_type in ("top_k", "switch"):
        kw.update(
            capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor, jitter_eps=jitter_eps
        )
        if router_type == "top_k":
            kw["norm_topk_prob"] = norm_topk_prob
        return kw
    if jitter_eps:
        raise ValueError(f"jitter_eps applies to router_type 'top_k' or 'switch', not {router_type!r}")
    if eval_capacity_factor is not None:
        raise ValueError(
            f"eval_capacity_factor applies to router_type 'top_k' or 'switch', not {router_type!r}"
        )
    if router_type == "expert_choice":
        kw["capacity_factor"] = 1.0 if capacity_factor is None else capacity_factor
    elif capacity_factor is not None:
        raise ValueError(f"capacity_factor is not supported by router_type {router_type!r} (dropless only)")
    return kw


class MoELayer(nn.Module):
    """A sparse MoE feed-forward layer.

    Args:
        hidden_size: model dim D.
        ffn_hidden_size: per-expert FFN dim F.
        num_experts: routed experts E.
        top_k: experts per token (token choice) or the ``T * k / E`` load factor (expert choice).
        router_type: ``"top_k"``, ``"switch"`` (needs ``top_k=1``), ``"expert_choice"``, ``"sigmoid_bias"``.
        activation: ``"swiglu"`` or ``"gelu"``.
        norm_topk_prob: renormalise the top-k weights (Mixtral) or not (OLMoE); ``top_k`` router only.
        capacity_factor: expert capacity as a multiple of the fair share; None = dropless
            (expert choice: default 1.0).
        eval_capacity_factor: capacity factor in eval mode (token-choice routers).
        jitter_eps: multiplicative router-input noise in training (token-choice routers).
        num_shared_experts: always-on experts (DeepSeekMoE), 0 = none.
        shared_expert_hidden_size: FFN dim of each shared expert (default ``ffn_hidden_size``).
        shared_expert_gate: scale the shared output by ``sigmoid(x @ g)`` (Qwen2-MoE).
        bias_update_rate: step of ``router.update_bias`` (aux-loss-free balancing).
        expert_dropout: dropout on the expert hidden activation in training.
        init_std: normal init std of all weights.
        output_init_std: init std of the expert down projections (default ``init_std``).
        impl: ``"auto"`` | ``"grouped_mm"`` | ``"loop"`` | ``"capacity"`` (see :mod:`moe_lab.nn.dispatch`).

    Example:
        >>> layer = MoELayer(16, 32, num_experts=4, top_k=2)
        >>> y, decision = layer(torch.randn(2, 3, 16))
        >>> y.shape, decision.expert_indices.shape
        (torch.Size([2, 3, 16]), torch.Size([6, 2]))
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        *,
        router_type: str = "top_k",
        activation: str = "swiglu",
        norm_topk_prob: bool = True,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        jitter_eps: float = 0.0,
        num_shared_experts: int = 0,
        shared_expert_hidden_size: int | None = None,
        shared_expert_gate: bool = False,
        bias_update_rate: float = 1e-3,
        expert_dropout: float = 0.0,
        init_std: float = 0.02,
        output_init_std: float | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if router_type not in ROUTER_TYPES:
            raise ValueError(f"router_type must be one of {list(ROUTER_TYPES)}, got {router_type!r}")
        if impl not in DISPATCH_IMPLS:
            raise ValueError(f"impl must be one of {list(DISPATCH_IMPLS)}, got {impl!r}")
        if not isinstance(num_shared_experts, int) or num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an int >= 0, got {num_shared_experts!r}")
        if shared_expert_gate and num_shared_experts == 0:
            raise ValueError("shared_expert_gate=True needs num_shared_experts >= 1")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.router_type = router_type
        self.impl = impl
        self.router = build_router(
            router_type,
            hidden_size,
            num_experts,
            top_k,
            **_router_kwargs(
                router_type,
                norm_topk_prob=norm_topk_prob,
                capacity_factor=capacity_factor,
                eval_capacity_factor=eval_capacity_factor,
                jitter_eps=jitter_eps,
                bias_update_rate=bias_update_rate,
            ),
        )
        nn.init.normal_(self.router.gate.weight, std=init_std)
        self.experts = Experts(
            num_experts,
            hidden_size,
            ffn_hidden_size,
            activation=activation,
            init_std=init_std,
            output_init_std=output_init_std,
            expert_dropout=expert_dropout,
        )
        self.shared_experts: SharedExperts | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if num_shared_experts > 0:
            self.shared_experts = SharedExperts(
                hidden_size,
                shared_expert_hidden_size or ffn_hidden_size,
                num_shared_experts,
                activation=activation,
                init_std=init_std,
                output_init_std=output_init_std,
            )
            if shared_expert_gate:
                self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
                nn.init.normal_(self.shared_expert_gate.weight, std=init_std)

    def forward(
        self,
        x_BSD: Tensor,
        token_mask_BS: Tensor | None = None,
        router_input_BSD: Tensor | None = None,
    ) -> tuple[Tensor, RoutingDecision]:
        """``x_BSD`` (any leading dims) -> (output of the same shape, the routing decision over T tokens).

        ``token_mask_BS`` (False = padding) keeps padding out of routing, capacity and statistics.
        ``router_input_BSD`` lets the router see another tensor than the experts (e.g. x + task embedding).
        """
        if x_BSD.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have last dim hidden_size={self.hidden_size}, got {tuple(x_BSD.shape)}")
        x_TD = x_BSD.reshape(-1, self.hidden_size)
        mask_T = None
        if token_mask_BS is not None:
            if token_mask_BS.shape != x_BSD.shape[:-1]:
                raise ValueError(
                    f"token_mask must have shape {tuple(x_BSD.shape[:-1])}, got {tuple(token_mask_BS.shape)}"
                )
            mask_T = token_mask_BS.reshape(-1).to(torch.bool)
        router_in_TD = x_TD
        if router_input_BSD is not None:
            if router_input_BSD.shape != x_BSD.shape:
                raise ValueError(
                    f"router_input must have shape {tuple(x_BSD.shape)}, got {tuple(router_input_BSD.shape)}"
                )
            router_in_TD = router_input_BSD.reshape(-1, self.hidden_size)
        decision = call_module(self.router, router_in_TD, token_mask=mask_T)
        method = None  # small T in eval (decoding): plain small-batch path, see moe_lab.nn.decode_path
        if self.impl != "capacity" and type(self.experts) is Experts:
            k = decision.expert_indices.shape[1]
            # "padded" (batched matmuls over all experts) only for impl="auto" on CPU: "loop" keeps plain matmuls
            threads = torch.get_num_threads() if x_TD.device.type == "cpu" and self.impl == "auto" else 1
            method = small_batch_method(x_TD.shape[0], k, self.num_experts, self.training, threads)
        out_TD: Tensor | None = None
        if method is not None:
            out_TD = small_batch_moe(x_TD, decision, self.experts, method, impl=self.impl)
        elif not self.training and self.impl != "capacity":
            # replacement experts (offloaded, ...) may answer decode-sized batches themselves (None: dispatch)
            decode = getattr(self.experts, "decode_forward", None)
            out_TD = decode(x_TD, decision) if decode is not None else None
        if out_TD is None:
            out_TD = dispatch_combine(x_TD, decision, self.experts, impl=self.impl)
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD
        return out_TD.view(x_BSD.shape), decision
