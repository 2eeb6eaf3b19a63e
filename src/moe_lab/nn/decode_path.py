"""Small-batch MoE fast path for decoding: no sort, no histogram, no scatter bookkeeping.

At decode time an MoE layer sees one token per sequence (T = batch). The dropless grouped path
(:func:`moe_lab.nn.dispatch.moe_dropless`) then spends more time on its bookkeeping (argsort, bincount,
``.tolist()``, gathers, ``index_add``) than on the expert matmuls. For small T this module computes the same
``out[t] = sum_k w[t, k] * expert_{e[t, k]}(x[t])`` in one of these plain ways (:func:`small_batch_method`
picks one, or None: keep the grouped dispatch):

* ``"dense"``: every expert on every token as three batched matmuls over the stacked weights
  (``[E, T, D] @ [E, D, F]``), then each token gathers its k selected outputs and sums them weighted. With
  few experts (``E <= 2k``) this wastes at most half the expert FLOPs and replaces about twenty calls by
  five.
* ``"pairs"``: a Python loop over the kept (token, expert) slots, three matrix-vector products each; used
  for 1-2 tokens with many experts, where only the selected experts' weights are read.
* ``"padded"``: with several CPU threads and most experts touched, each expert's slots in a zero-padded
  ``[E, C, D]`` block (C = the largest expert load) and one batched matmul per weight over all experts.
* ``"grouped"``: the grouped dispatch's arithmetic (slots sorted by expert, one matmul per expert block
  and weight, weighted ``index_add``) without its training machinery (autograd functions, offset
  tensors, dtype casts); used for the remaining decode-sized batches (``T * K <= 64``), e.g. 8 sequences
  with 8 experts and top-2, where each expert sees about two rows.

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

from itertools import accumulate

import torch
from torch import Tensor

from moe_lab.nn.experts import Experts, grouped_mm_supported
from moe_lab.nn.router import RoutingDecision

__all__ = [
    "DENSE_MAX_EXPERTS_PER_SLOT",
    "GROUPED_MAX_SLOTS",
    "PAIRS_MAX_SLOTS",
    "small_batch_method",
    "small_batch_moe",
]

PAIRS_MAX_SLOTS = 8
"""Largest ``T * K`` for the ``"pairs"`` loop (measured on CPU: 1-2 decode tokens with top-2 are 2x faster
than the grouped dispatch; at 16 slots the Python loop is slower than it)."""

DENSE_MAX_EXPERTS_PER_SLOT = 2
"""``"dense"`` computes every expert: used only when ``E <= 2 * K`` (at most 2x the needed expert FLOPs)."""

_DENSE_MAX_SLOTS = 16  # decode-sized batches only: beyond, the wasted FLOPs (and FLOP counts) grow

GROUPED_MAX_SLOTS = 64
"""Largest ``T * K`` for ``"grouped"`` (decode batches); larger batches use the grouped dispatch itself,
whose bookkeeping is then small next to the matmuls."""


def small_batch_method(
    num_tokens: int, top_k: int, num_experts: int, training: bool, num_threads: int = 1
) -> str | None:
    """Which small-batch method fits, or None for the grouped dispatch.

    Eval mode only. ``"dense"`` when ``E <= 2 * K`` (few experts: computing all of them
    costs at most twice the needed FLOPs and saves the bookkeeping) and ``T * K <= 16``; else ``"pairs"``
    when ``T * K <= PAIRS_MAX_SLOTS``; else ``"grouped"`` when ``T * K <= GROUPED_MAX_SLOTS``; else None.
    With ``num_threads >= 2`` (CPU threads) and at least as many slots as experts (most experts touched),
    ``"padded"`` replaces ``"pairs"`` and ``"grouped"``: one batched matmul per weight over all experts
    splits whole experts between the threads, where a 2-row matmul per expert barely uses the second one
    (measured on 2 cores, 4 layers of 8 experts, top-2: 4.8 ms instead of 6.9 ms per decode step at batch 8;
    64 experts, top-8: 17 ms instead of 21-30 ms at batch 8-32).

    >>> small_batch_method(1, 2, 4, False), small_batch_method(1, 2, 8, False), small_batch_method(8, 2, 8, False)
    ('dense', 'pairs', 'grouped')
    >>> small_batch_method(8, 2, 8, False, num_threads=2)
    'padded'
    >>> small_batch_method(64, 2, 8, False) is None
    True
    """
    slots = num_tokens * top_k
    if training or slots == 0:
        return None
    if num_experts <= DENSE_MAX_EXPERTS_PER_SLOT * top_k and slots <= _DENSE_MAX_SLOTS:
        return "dense"
    padded = num_threads >= 2 and slots >= num_experts
    if slots <= PAIRS_MAX_SLOTS and not padded:
        return "pairs"
    if slots <= GROUPED_MAX_SLOTS:
        return "padded" if padded else "grouped"
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
    # the weights as Python floats (exact: a float32 value round-trips through a double), no 0-dim tensors
    weights = _cast(decision.combine_weights, dtype).tolist()
    keep = decision.slot_mask.tolist()
    rows: list[Tensor] = []
    for t, (experts_k, keep_k) in enumerate(zip(decision.expert_indices.tolist(), keep)):
        x_1D = x_TD[t : t + 1]
        acc_1D: Tensor | None = None
        for k, (e, kept) in enumerate(zip(experts_k, keep_k)):
            if not kept:
                continue
            h3_1F = x_1D @ w3_EDF[e] if w3_EDF is not None else None
            y_1D = (experts._hidden(x_1D @ w1_EDF[e], h3_1F) @ w2_EFD[e]) * weights[t][k]
            acc_1D = y_1D if acc_1D is None else acc_1D + y_1D
        rows.append(acc_1D if acc_1D is not None else torch.zeros_like(x_1D))
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _grouped(x_TD: Tensor, decision: RoutingDecision, experts: Experts, impl: str = "auto") -> Tensor:
    t, d = x_TD.shape
    k = decision.expert_indices.shape[1]
    e, dtype = experts.num_experts, x_TD.dtype
    # kept slots sorted by expert (stable: token order inside an expert); dropped/padding slots sort last
    key_N = torch.where(decision.slot_mask, decision.expert_indices, e).reshape(-1)
    order_N = torch.argsort(key_N, stable=True)
    counts = torch.bincount(key_N, minlength=e + 1).tolist()
    if counts[e]:
        order_N = order_N[: t * k - counts[e]]
    if order_N.numel() == 0:
        return torch.zeros_like(x_TD)
    token_N = torch.div(order_N, k, rounding_mode="floor")
    x_ND = x_TD.index_select(0, token_N)
    w1_EDF, w2_EFD = _cast(experts.w1_EDF, dtype), _cast(experts.w2_EFD, dtype)
    w3_EDF = _cast(experts.w3_EDF, dtype) if experts.w3_EDF is not None else None
    counts = counts[:e]
    eager_cpu = x_TD.device.type == "cpu" and not torch.compiler.is_compiling()  # fp32 _grouped_mm: eager CPU
    if impl != "loop" and eager_cpu and grouped_mm_supported(d, experts.ffn_hidden_size, dtype):
        # one call per weight; the CPU kernel loops over the blocks in C++ (same matmuls as the loop below)
        offs_E = torch.tensor(list(accumulate(counts)), dtype=torch.int32)
        h3_NF = torch._grouped_mm(x_ND, w3_EDF, offs=offs_E) if w3_EDF is not None else None
        h_NF = experts._hidden(torch._grouped_mm(x_ND, w1_EDF, offs=offs_E), h3_NF)
        y_ND = torch._grouped_mm(h_NF, w2_EFD, offs=offs_E)
    else:
        blocks: list[Tensor] = []
        start = 0
        for j, n in enumerate(counts):
            if n:
                xe = x_ND[start : start + n]
                h3 = xe @ w3_EDF[j] if w3_EDF is not None else None
                blocks.append(experts._hidden(xe @ w1_EDF[j], h3) @ w2_EFD[j])
                start += n
        y_ND = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    w_N = _cast(decision.combine_weights, dtype).reshape(-1).index_select(0, order_N)
    return x_TD.new_zeros(t, d).index_add_(0, token_N, y_ND * w_N[:, None])


def _padded(x_TD: Tensor, decision: RoutingDecision, experts: Experts) -> Tensor:
    t, d = x_TD.shape
    k = decision.expert_indices.shape[1]
    e, dtype = experts.num_experts, x_TD.dtype
    # slot n = (token n // k, its k-th choice); its row inside its expert's block = earlier slots of that expert
    idx_N = decision.expert_indices.reshape(-1)
    onehot_NE = torch.zeros(t * k, e, dtype=torch.int32, device=x_TD.device)
    onehot_NE.scatter_(1, idx_N[:, None], decision.slot_mask.reshape(-1, 1).to(torch.int32))
    rank_NE = onehot_NE.cumsum(0)
    cap = int(rank_NE[-1].max())
    if cap == 0:
        return torch.zeros_like(x_TD)
    # kept slot -> row (expert * cap + rank - 1); dropped slots -> one spare zero row at the end
    row_N = idx_N * cap + rank_NE.gather(1, idx_N[:, None]).squeeze(1) - 1
    row_N = torch.where(decision.slot_mask.reshape(-1), row_N, e * cap)
    x_RD = x_TD.new_zeros(e * cap + 1, d)
    x_RD.index_copy_(0, row_N, x_TD.repeat_interleave(k, 0))
    y_ECD = experts.forward_capacity(x_RD[:-1].view(e, cap, d))
    y_RD = torch.cat([y_ECD.view(e * cap, d), x_RD.new_zeros(1, d)])
    w_N1 = _cast(decision.combine_weights, dtype).reshape(-1, 1)
    return (y_RD.index_select(0, row_N) * w_N1).view(t, k, d).sum(1)


def small_batch_moe(
    x_TD: Tensor,
    decision: RoutingDecision,
    experts: Experts,
    method: str | None = None,
    impl: str = "auto",
) -> Tensor:
    """Routed-expert output ``[T, D]`` for a small T: ``out[t] = sum_k w[t, k] * expert_{e[t, k]}(x[t])``.

    Args:
        x_TD: tokens (the experts' input).
        decision: the router's decision for these T tokens (token choice: ``K`` slots per token).
        experts: the stacked expert weights.
        method: ``"dense"``, ``"pairs"``, ``"grouped"``, ``"padded"`` or None (:func:`small_batch_method`'s choice,
            ``"grouped"`` when it has none).
        impl: the layer's expert implementation; ``"loop"`` makes ``"grouped"`` use plain per-expert
            matmuls (as the dispatch does) instead of ``torch._grouped_mm``.

    Same numbers as :func:`moe_lab.nn.dispatch.dispatch_combine` up to float rounding (the tests compare
    both with a per-token reference).
    """
    t, k = decision.expert_indices.shape
    if t != x_TD.shape[0]:
        raise ValueError(f"decision covers {t} tokens but x has {x_TD.shape[0]} rows")
    if method is None:
        threads = torch.get_num_threads() if x_TD.device.type == "cpu" else 1
        method = small_batch_method(t, k, experts.num_experts, False, threads) or "grouped"
    if method == "dense":
        return _dense(x_TD, decision, experts)
    if method == "pairs":
        return _pairs(x_TD, decision, experts)
    if method == "grouped":
        return _grouped(x_TD, decision, experts, impl)
    if method == "padded":
        return _padded(x_TD, decision, experts)
    raise ValueError(f"method must be 'dense', 'pairs', 'grouped', 'padded' or None, got {method!r}")
