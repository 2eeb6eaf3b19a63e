"""Losses: the router losses (pure, differentiable functions of a :class:`RoutingDecision`) and the fused
output-projection + cross-entropy of the language-model head.

Shape legend: T tokens, K slots per token, E experts, N rows, D model dim, V vocabulary. The caller
multiplies the router losses by their coefficients.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lab.nn.huge_pages import empty_large
from moe_lab.nn.router import RoutingDecision

__all__ = [
    "expert_choice_fractions",
    "linear_cross_entropy",
    "lm_head_cross_entropy",
    "load_balancing_loss",
    "next_token_targets",
    "router_z_loss",
]

_CE_CHUNK_BYTES = 4 << 20  # rows per chunk: a [rows, V] float32 temporary of about this size


class _LinearCrossEntropy(torch.autograd.Function):
    """``logits = h @ w.T`` and ``sum_n CE(logits[n], target[n])`` in one node (see linear_cross_entropy).

    The forward's ``exp(logits - rowmax)`` (its log-sum-exp pass) is kept in one ``[N, V]`` buffer when a
    gradient will be needed; the first backward scales it in place into the logits gradient (softmax = that
    exponential over its row sum), so no second exponential pass and no second ``[N, V]`` buffer. A later
    backward through a retained graph recomputes the exponentials from the logits.
    """

    @staticmethod
    def forward(
        ctx: Any, h_ND: Tensor, w_VD: Tensor, target_N: Tensor, keep_exp: bool
    ) -> tuple[Tensor, Tensor]:
        n, v = h_ND.shape[0], w_VD.shape[0]
        plain = (
            h_ND.device.type == "cpu"
            and h_ND.dtype == w_VD.dtype
            and not torch.is_autocast_enabled(h_ND.device.type)
        )
        if plain:  # one fresh buffer (huge pages on Linux) instead of the allocator's 4 KiB page faults
            logits_NV = torch.mm(h_ND, w_VD.t(), out=empty_large((n, v), h_ND))
        else:
            logits_NV = torch.mm(h_ND, w_VD.t())
        valid_N = target_N != -100
        safe_N = torch.where(valid_N, target_N, torch.zeros_like(target_N))
        cdt = torch.promote_types(logits_NV.dtype, torch.float32)  # loss dtype: float32 at least
        rows = max(1, min(n, _CE_CHUNK_BYTES // (4 * v)))
        like = torch.empty(0, dtype=cdt, device=h_ND.device)
        exp_NV = empty_large((n, v) if keep_exp else (rows, v), like)
        max_N1 = torch.empty(n, 1, dtype=cdt, device=h_ND.device)
        sum_N = torch.empty(n, dtype=cdt, device=h_ND.device)
        for i in range(0, n, rows):  # torch.logsumexp's steps, keeping the exponentials
            lc = logits_NV[i : i + rows].to(cdt)
            ec = exp_NV[i : i + rows] if keep_exp else exp_NV[: lc.shape[0]]
            mc = torch.amax(lc, -1, keepdim=True, out=max_N1[i : i + rows])
            mc.masked_fill_(mc.abs() == float("inf"), 0.0)
            torch.sum(torch.sub(lc, mc, out=ec).exp_(), -1, out=sum_N[i : i + rows])
        lse_N = sum_N.log() + max_N1.squeeze(1)
        picked_N = logits_NV.gather(1, safe_N[:, None]).squeeze(1).to(cdt)
        total = ((lse_N - picked_N) * valid_N).sum()
        ctx.save_for_backward(h_ND, w_VD, logits_NV, max_N1, sum_N, safe_N, valid_N)
        ctx.exp_NV = exp_NV if keep_exp else None  # not saved: the first backward overwrites it
        ctx.set_materialize_grads(False)  # unused logits: no [N, V] zero gradient
        return logits_NV, total

    @staticmethod
    def backward(
        ctx: Any, g_logits: Tensor | None, g_total: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, None, None]:
        h_ND, w_VD, logits_NV, max_N1, sum_N, safe_N, valid_N = ctx.saved_tensors
        n, v = logits_NV.shape
        exp_NV, ctx.exp_NV = ctx.exp_NV, None
        if exp_NV is None:  # a second backward (retained graph), or a forward without keep_exp
            exp_NV = torch.exp(logits_NV.to(sum_N.dtype) - max_N1)
        scale_N = valid_N.to(sum_N.dtype) * (g_total if g_total is not None else sum_N.new_zeros(()))
        factor_N1 = (scale_N / sum_N)[:, None]
        rows = max(1, _CE_CHUNK_BYTES // (4 * v))
        for i in range(0, n, rows):
            gc = exp_NV[i : i + rows]  # softmax * scale, minus scale at the target (in place)
            gc.mul_(factor_N1[i : i + rows])
            gc.scatter_add_(1, safe_N[i : i + rows, None], -scale_N[i : i + rows, None])
            if g_logits is not None:
                gc.add_(g_logits[i : i + rows])
        gl = exp_NV.to(logits_NV.dtype)
        grad_h = torch.mm(gl, w_VD.to(gl.dtype)) if ctx.needs_input_grad[0] else None
        grad_w = torch.mm(gl.t(), h_ND.to(gl.dtype)) if ctx.needs_input_grad[1] else None
        return (
            None if grad_h is None else grad_h.to(h_ND.dtype),
            None if grad_w is None else grad_w.to(w_VD.dtype),
            None,
            None,
        )


def linear_cross_entropy(h_ND: Tensor, weight_VD: Tensor, target_N: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits, loss_sum)``: ``logits = h @ weight.T`` and the summed cross-entropy of ``target``.

    Same values as ``F.linear`` + ``F.cross_entropy(logits.float(), target, ignore_index=-100,
    reduction="sum")``, in one autograd node: the log-probabilities are never stored (the backward
    turns the forward's ``exp(logits - rowmax)`` into the logits gradient in place), so training keeps
    one ``[N, V]`` float buffer besides the logits and takes one exponential pass. The logits stay differentiable (a gradient reaching them is added).

    Example:
        >>> h, w = torch.randn(6, 8), torch.randn(32, 8)
        >>> target = torch.tensor([1, 2, 3, -100, 5, 6])
        >>> logits, total = linear_cross_entropy(h, w, target)
        >>> ref = torch.nn.functional.cross_entropy(h @ w.T, target, reduction="sum")
        >>> logits.shape, bool(torch.allclose(total, ref))
        (torch.Size([6, 32]), True)
    """
    keep_exp = torch.is_grad_enabled() and (h_ND.requires_grad or weight_VD.requires_grad)
    logits, total = _LinearCrossEntropy.apply(h_ND, weight_VD, target_N, keep_exp)
    return logits, total


def next_token_targets(labels_BS: Tensor, token_mask_BS: Tensor | None = None) -> Tensor:
    """Targets aligned with the logits, ``target[:, i] = labels[:, i + 1]``; -100 = ignored.

    The last position has no target; a target counts only when it and the token predicting it are real
    (``token_mask`` True).

    Example:
        >>> next_token_targets(torch.tensor([[5, 6, 7]])).tolist()
        [[6, 7, -100]]
    """
    target_BS = torch.full_like(labels_BS, -100)
    target_BS[:, :-1] = labels_BS[:, 1:]
    if token_mask_BS is not None:
        keep_BS = torch.zeros_like(token_mask_BS, dtype=torch.bool)
        keep_BS[:, :-1] = token_mask_BS[:, 1:].bool() & token_mask_BS[:, :-1].bool()
        target_BS = target_BS.masked_fill(~keep_BS, -100)
    return target_BS


def lm_head_cross_entropy(
    head: nn.Module, h_BSD: Tensor, target_BS: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """``(logits, summed cross-entropy or None)`` of an output projection ``head`` over ``h_BSD``.

    A plain bias-free ``nn.Linear`` without forward hooks goes through :func:`linear_cross_entropy`; any
    other head (LoRA-wrapped, hooked) is called as usual and followed by ``F.cross_entropy``.

    Example:
        >>> head = nn.Linear(8, 32, bias=False)
        >>> logits, total = lm_head_cross_entropy(head, torch.randn(2, 3, 8), torch.tensor([[1, 2, -100]] * 2))
        >>> logits.shape, total.shape
        (torch.Size([2, 3, 32]), torch.Size([]))
    """
    if target_BS is None:
        return head(h_BSD), None
    if (
        type(head) is nn.Linear
        and head.bias is None
        and not head._forward_hooks
        and not head._forward_pre_hooks
    ):
        logits_NV, total = linear_cross_entropy(
            h_BSD.reshape(-1, h_BSD.shape[-1]), head.weight, target_BS.reshape(-1)
        )
        return logits_NV.view(*h_BSD.shape[:-1], -1), total
    logits = head(h_BSD)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), target_BS.reshape(-1), reduction="sum"
    )
    return logits, total


def _valid(decision: RoutingDecision) -> Tensor:
    if decision.token_mask is None:
        return torch.ones(decision.num_tokens, dtype=torch.bool, device=decision.router_logits.device)
    return decision.token_mask.to(torch.bool)


def expert_choice_fractions(decision: RoutingDecision, num_experts: int | None = None) -> Tensor:
    """``f_e``: the fraction of router choices (kept + dropped slots, padding excluded) that went to e.

    Example:
        >>> from moe_lab.nn.router import TopKRouter
        >>> f = expert_choice_fractions(TopKRouter(8, 4)(torch.randn(6, 8)))
        >>> round(float(f.sum()), 4)
        1.0
    """
    e = num_experts if num_experts is not None else decision.num_experts
    chosen_TK = (decision.slot_mask | decision.dropped) & _valid(decision)[:, None]
    counts_E = torch.bincount(decision.expert_indices[chosen_TK], minlength=e).float()
    return counts_E / counts_E.sum().clamp_min(1.0)


def load_balancing_loss(decision: RoutingDecision, num_experts: int | None = None) -> Tensor:
    """Switch/GShard auxiliary loss ``E * sum_e f_e * P_e`` (exactly 1.0 at perfect balance).

    ``f_e`` is the fraction of router choices to expert e *before* capacity dropping (so the loss still
    sees the demand that was dropped); it equals "tokens routed to e / T" divided by K. ``P_e`` is the mean
    router probability of e over non-padding tokens (sigmoid scores are normalised per token to sum to 1
    first). Only ``P`` carries a gradient. For expert choice every expert takes exactly c tokens, so
    ``f_e = 1/E`` and the loss is the constant 1.0 with zero gradient: expert choice is balanced by
    construction and needs no auxiliary loss.

    Example:
        >>> from moe_lab.nn.router import TopKRouter
        >>> loss = load_balancing_loss(TopKRouter(8, 4)(torch.randn(32, 8)))
        >>> loss.shape
        torch.Size([])
    """
    e = num_experts if num_experts is not None else decision.num_experts
    valid_T = _valid(decision)
    probs_TE = decision.router_probs.float()
    probs_TE = probs_TE / probs_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    n_valid = valid_T.sum()
    if int(n_valid) == 0:
        return probs_TE.sum() * 0.0
    p_E = (probs_TE * valid_T[:, None]).sum(0) / n_valid
    f_E = expert_choice_fractions(decision, e).to(p_E.device)
    return e * torch.sum(f_E * p_E)


def router_z_loss(decision: RoutingDecision) -> Tensor:
    """ST-MoE router z-loss: mean over non-padding tokens of ``logsumexp(logits)^2``.

    Example:
        >>> from moe_lab.nn.router import TopKRouter
        >>> bool(router_z_loss(TopKRouter(8, 4)(torch.randn(3, 8))) >= 0)
        True
    """
    valid_T = _valid(decision)
    z_T = torch.logsumexp(decision.router_logits.float(), dim=-1)
    n_valid = valid_T.sum()
    if int(n_valid) == 0:
        return z_T.sum() * 0.0
    return (z_T.square() * valid_T).sum() / n_valid
