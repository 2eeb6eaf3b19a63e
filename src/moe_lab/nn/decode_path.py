"""Small-batch MoE fast path for decoding: no sort, no histogram, no scatter bookkeeping.

At decode time an MoE layer sees one token per sequence (T = batch). The dropless grouped path
(:func:`moe_lab.nn.dispatch.moe_dropless`) then spends more time on its bookkeeping (argsort, bincount,
``.tolist()``, gathers, ``index_add``) than on the expert matmuls. For small T this module computes the same
``out[t] = sum_k w[t, k] * expert_{e[t, k]}(x[t])`` in one of two plain ways (:func:`small_batch_method`
picks one, or None: keep the grouped dispatch):

* ``"dense"``: every expert on every token as three batched matmuls over the stacked weights
  (``[E, T, D] @ [E, D, F]``), then each token gathers its k selected outputs and sums them weighted. With
  few experts (``E <= 2k``) this wastes at most half the expert FLOPs and replaces about twenty calls by
  five.
* ``"pairs"``: a Python loop over the kept (token, expert) slots, three matrix-vector products each; used
  for 1-2 tokens with many experts, where only the selected experts' weights are read.

Dropped or padding slots (``slot_mask`` False) never contribute: ``pairs`` skips them, ``dense`` multiplies by
their combine weight, which the router sets to exactly 0. Made for inference (autograd works through it, but
without the grouped path's memory-saving backward); the MoE layer uses it in eval mode when
:func:`small_batch_method` returns a method.

Shape legend: T tokens, K slots per token, E experts, D model dim, F expert FFN dim.

Example:
    >>> from moe_lab.nn.experts import Experts
    >>> from moe_lab.nn.router import TopKRouter
    >>> experts, router = Experts(4, 8, 16), TopKRouter(8, 4, top_k=2)
    >>> x_TD = torch.randn(3, 8)
    >>> small_batch_moe(x_TD, router(x_TD), experts).shape
    torch.Size([3, 8])
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lab.nn.experts import Experts
from moe_lab.nn.router import RoutingDecision

__all__ = ["DENSE_MAX_EXPERTS_PER_SLOT", "PAIRS_MAX_SLOTS", "small_batch_method", "small_batch_moe"]

PAIRS_MAX_SLOTS = 8
"""Largest ``T * K`` for the ``"pairs"`` loop (measured on CPU: 1-2 decode tokens with top-2 are 2x faster
than the grouped dispatch; at 16 slots the Python loop is slower than it)."""

DENSE_MAX_EXPERTS_PER_SLOT = 2
"""``"dense"`` computes every expert: used only when ``E <= 2 * K`` (at most 2x the needed expert FLOPs)."""

_DENSE_MAX_SLOTS = 16  # decode-sized batches only: beyond, the wasted FLOPs (and FLOP counts) grow


def small_batch_method(num_tokens: int, top_k: int, num_experts: int, training: bool) -> str | None:
    """Which small-batch method fits, or None for the grouped dispatch.

    Eval mode only. ``"dense"`` when ``E <= 2 * K`` (few experts: computing all of them
    costs at most twice the needed FLOPs and saves the bookkeeping) and ``T * K <= 16``; else ``"pairs"``
    when ``T * K <= PAIRS_MAX_SLOTS``; else None.

    >>> small_batch_method(1, 2, 4, False), small_batch_method(1, 2, 8, False), small_batch_method(8, 2, 8, False)
    ('dense', 'pairs', None)
    """
    slots = num_tokens * top_k
    if training or slots == 0:
        return None
    if num_experts <= DENSE_MAX_EXPERTS_PER_SLOT * top_k and slots <= _DENSE_MAX_SLOTS:
        return "dense"
    if slots <= PAIRS_MAX_SLOTS:
        return "pairs"
    return None


def _cast(w: Tensor, dtype: torch.dtype) -> Tensor:
    return w if w.dtype == dtype else w.to(dtype)


def _dense(x_TD: Tensor, decision: RoutingDecision, experts: Experts) -> Tensor:
    t, d = x_TD.shape
    dtype = x_TD.dtype
    x_ETD = x_TD[None].expand(experts.num_experts, t, d)
    h1_ETF = torch.bmm(x_ETD, _cast(experts.w1_EDF, dtype))
    h3_ETF = torch.bmm(x_ETD, _cast(experts.w3_EDF, dtype)) if experts.w3_EDF is not None else None
    y_ETD = torch.bmm(experts._hidden(h1_ETF, h3_ETF), _cast(experts.w2_EFD, dtype))
    idx_TK = decision.expert_indices
    k = idx_TK.shape[1]
    # y_ETD[e, t] for each slot (t, k): flat row e * T + t of y viewed as [E * T, D]
    rows_TK = idx_TK * t + torch.arange(t, device=x_TD.device)[:, None]
    y_TKD = y_ETD.reshape(-1, d).index_select(0, rows_TK.reshape(-1)).view(t, k, d)
    w_TK1 = _cast(decision.combine_weights, dtype)[..., None]
    return (y_TKD * w_TK1).sum(1)


def _pairs(x_TD: Tensor, decision: RoutingDecision, experts: Experts) -> Tensor:
    dtype = x_TD.dtype
    w1_EDF, w2_EFD = _cast(experts.w1_EDF, dtype), _cast(experts.w2_EFD, dtype)
    w3_EDF = _cast(experts.w3_EDF, dtype) if experts.w3_EDF is not None else None
    weights_TK = _cast(decision.combine_weights, dtype)
    keep = decision.slot_mask.tolist()
    rows: list[Tensor] = []
    for t, (experts_k, keep_k) in enumerate(zip(decision.expert_indices.tolist(), keep)):
        x_1D = x_TD[t : t + 1]
        acc_1D: Tensor | None = None
        for k, (e, kept) in enumerate(zip(experts_k, keep_k)):
            if not kept:
                continue
            h3_1F = x_1D @ w3_EDF[e] if w3_EDF is not None else None
            y_1D = (experts._hidden(x_1D @ w1_EDF[e], h3_1F) @ w2_EFD[e]) * weights_TK[t, k]
            acc_1D = y_1D if acc_1D is None else acc_1D + y_1D
        rows.append(acc_1D if acc_1D is not None else torch.zeros_like(x_1D))
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def small_batch_moe(
    x_TD: Tensor, decision: RoutingDecision, experts: Experts, method: str | None = None
) -> Tensor:
    """Routed-expert output ``[T, D]`` for a small T: ``out[t] = sum_k w[t, k] * expert_{e[t, k]}(x[t])``.

    Args:
        x_TD: tokens (the experts' input).
        decision: the router's decision for these T tokens (token choice: ``K`` slots per token).
        experts: the stacked expert weights.
        method: ``"dense"``, ``"pairs"`` or None (:func:`small_batch_method`'s choice, ``"pairs"`` when
            it has none).

    Same numbers as :func:`moe_lab.nn.dispatch.dispatch_combine` up to float rounding (the tests compare
    both with a per-token reference).
    """
    t, k = decision.expert_indices.shape
    if t != x_TD.shape[0]:
        raise ValueError(f"decision covers {t} tokens but x has {x_TD.shape[0]} rows")
    if method is None:
        method = small_batch_method(t, k, experts.num_experts, training=False) or "pairs"
    if method == "dense":
        return _dense(x_TD, decision, experts)
    if method == "pairs":
        return _pairs(x_TD, decision, experts)
    raise ValueError(f"method must be 'dense', 'pairs' or None, got {method!r}")
