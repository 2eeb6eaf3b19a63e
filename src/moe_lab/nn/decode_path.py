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
  ``[E', C, D]`` block (C = the largest expert load) and one batched matmul per weight over the touched
  experts (E' of them: a strided view from the first to the last touched expert, no weight copy); the
  layout comes from the expert ids read once to the host.
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

from collections.abc import Callable
from itertools import accumulate
from math import gcd

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_lab.nn.experts import Experts, grouped_mm_supported
from moe_lab.nn.router import RoutingDecision

__all__ = [
    "DENSE_MAX_EXPERTS_PER_SLOT",
    "GROUPED_MAX_SLOTS",
    "PAIRS_MAX_SLOTS",
    "pairs_moe",
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


ExpertTriple = tuple[Tensor, Tensor | None, Tensor]  # (w1 [D, F], w3 [D, F] or None, w2 [F, D]) of one expert


def pairs_moe(
    x_TD: Tensor,
    decision: RoutingDecision,
    weights_for: Callable[[dict[int, int]], dict[int, ExpertTriple]],
    hidden: Callable[[Tensor, Tensor | None], Tensor],
) -> Tensor:
    """The ``"pairs"`` method with the weights from anywhere.

    A Python loop over the kept (token, slot) pairs, three matrix-vector products each, weighted and summed
    per token. ``weights_for(used)`` is called once, before any matmul, with the kept experts in order of
    first use (slot order of the first token, then the next token's new experts), each with its number of
    kept slots, and returns each one's matrices; ``hidden(h1, h3)`` is the activation (``silu(h1) * h3`` for
    SwiGLU, ``gelu(h1)`` without ``w3``). Used by the stacked experts (``"pairs"``) and by the offloaded,
    quantised and subset experts of :mod:`moe_lab.inference.expert_modules`, so all give the same bits.

    >>> w1, w2 = torch.randn(3, 4, 6), torch.randn(3, 6, 4)
    >>> from moe_lab.nn.router import TopKRouter
    >>> x = torch.randn(2, 4)
    >>> mats = lambda used: {e: (w1[e], None, w2[e]) for e in used}
    >>> pairs_moe(x, TopKRouter(4, 3, top_k=2)(x), mats, lambda h1, h3: F.gelu(h1)).shape
    torch.Size([2, 4])
    """
    dtype = x_TD.dtype
    # the weights as Python floats (exact: a float32 value round-trips through a double), no 0-dim tensors
    weights = _cast(decision.combine_weights, dtype).tolist()
    experts_TK = decision.expert_indices.tolist()
    keep = [[True] * len(row) for row in experts_TK] if decision.all_kept else decision.slot_mask.tolist()
    used: dict[int, int] = {}
    for experts_k, keep_k in zip(experts_TK, keep):
        for e, kept in zip(experts_k, keep_k):
            if kept:
                used[e] = used.get(e, 0) + 1
    mats = {
        e: (_cast(w1, dtype), _cast(w3, dtype) if w3 is not None else None, _cast(w2, dtype))
        for e, (w1, w3, w2) in weights_for(used).items()
    }
    rows: list[Tensor] = []
    for t, (experts_k, keep_k) in enumerate(zip(experts_TK, keep)):
        x_1D = x_TD[t : t + 1]
        acc_1D: Tensor | None = None
        for k, (e, kept) in enumerate(zip(experts_k, keep_k)):
            if not kept:
                continue
            w1_DF, w3_DF, w2_FD = mats[e]
            h3_1F = x_1D @ w3_DF if w3_DF is not None else None
            y_1D = (hidden(x_1D @ w1_DF, h3_1F) @ w2_FD) * weights[t][k]
            acc_1D = y_1D if acc_1D is None else acc_1D + y_1D
        rows.append(acc_1D if acc_1D is not None else torch.zeros_like(x_1D))
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _pairs(x_TD: Tensor, decision: RoutingDecision, experts: Experts) -> Tensor:
    w1_EDF, w3_EDF, w2_EFD = experts.w1_EDF, experts.w3_EDF, experts.w2_EFD

    def weights_for(used: dict[int, int]) -> dict[int, ExpertTriple]:
        return {e: (w1_EDF[e], w3_EDF[e] if w3_EDF is not None else None, w2_EFD[e]) for e in used}

    return pairs_moe(x_TD, decision, weights_for, experts._hidden)


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


def _expert_views(experts: Experts, first: int, step: int, n: int) -> list[Tensor | None]:
    """Experts ``first, first + step, ...`` (n of them) of each stacked weight as a strided view (no copy).

    >>> ex = Experts(6, 4, 8)
    >>> w1 = _expert_views(ex, 1, 3, 2)[0]
    >>> w1.shape, bool(torch.equal(w1[1], ex.w1_EDF[4]))
    (torch.Size([2, 4, 8]), True)
    """
    views: list[Tensor | None] = []
    for weight in (experts.w1_EDF, experts.w3_EDF, experts.w2_EFD):
        if weight is None or (first == 0 and step == 1 and n == weight.shape[0]):
            views.append(weight)
            continue
        w: Tensor = weight if weight.is_contiguous() else weight.contiguous()
        rows, cols = w.shape[1], w.shape[2]
        offset = w.storage_offset() + first * rows * cols
        views.append(w.as_strided((n, rows, cols), (step * rows * cols, cols, 1), offset))
    return views


def _padded(x_TD: Tensor, decision: RoutingDecision, experts: Experts) -> Tensor:
    t, d = x_TD.shape
    k = decision.expert_indices.shape[1]
    e, dtype = experts.num_experts, x_TD.dtype
    # the layout is worked out on the host from the (few) expert ids: one read of them instead of a dozen
    # small tensor ops (one-hot, cumsum, gathers, scatters); a dropped slot has id -1
    kept_ids = (
        decision.expert_indices
        if decision.all_kept
        else torch.where(decision.slot_mask, decision.expert_indices, -1)
    )
    sel = kept_ids.reshape(-1).tolist()
    loads = [0] * e
    rank = [0] * len(sel)
    for n, ex in enumerate(sel):
        if ex >= 0:
            rank[n] = loads[ex]
            loads[ex] += 1
    touched = [j for j in range(e) if loads[j]]
    if not touched:
        return torch.zeros_like(x_TD)
    # only touched experts' weights are read: the blocks are experts first, first + step, ..., last (a
    # strided view of the stacked weights; one or two experts always fit exactly, more may take untouched
    # ones in between, whose blocks are computed but never read)
    first, step = touched[0], 0
    for j in touched[1:]:
        step = gcd(step, j - first)
    step = max(step, 1)
    blocks = [loads[j] for j in range(first, touched[-1] + 1, step)]
    n_e, cap = len(blocks), max(blocks)
    dropped = len(sel) - sum(loads)
    if dropped and min(blocks) == cap:
        cap += 1  # a dropped slot reads a padding row: with every block full, add one
    # row r of the [n_e * cap] layout holds token src[r] (row t of x padded with one zero row: padding).
    # A zero row's output is exactly zero (bias-free experts, act(0) = 0): dropped slots read one.
    src = [t] * (n_e * cap)
    row = [next(i * cap + n for i, n in enumerate(blocks) if n < cap) if dropped else 0] * len(sel)
    for n, ex in enumerate(sel):
        if ex >= 0:
            row[n] = (ex - first) // step * cap + rank[n]
            src[row[n]] = n // k
    device = x_TD.device
    if t == 1 and not dropped:  # one token: each block is that token (cap 1)
        x_ECD = x_TD.expand(n_e, 1, d)
    else:
        x_ECD = F.pad(x_TD, (0, 0, 0, 1)).index_select(0, torch.tensor(src, device=device)).view(n_e, cap, d)
    w1, w3, w2 = (None if w is None else _cast(w, dtype) for w in _expert_views(experts, first, step, n_e))
    assert w1 is not None and w2 is not None
    h3 = torch.bmm(x_ECD, w3) if w3 is not None else None
    y_RD = torch.bmm(experts._hidden(torch.bmm(x_ECD, w1), h3), w2).view(n_e * cap, d)
    if row != list(range(n_e * cap)):  # the usual case at one token and k blocks needs no gather
        y_RD = y_RD.index_select(0, torch.tensor(row, device=device))
    w_N1 = _cast(decision.combine_weights, dtype).reshape(-1, 1)
    return (y_RD * w_N1).view(t, k, d).sum(1)


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
