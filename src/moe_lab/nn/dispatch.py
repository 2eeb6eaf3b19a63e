"""Dispatch: permute token-slots by expert, run the experts, unpermute and combine.

Shape legend: T tokens, K slots per token, N kept slots (rows sorted by expert), E experts, C capacity
slots per expert, D model dim.

Two layouts, chosen by ``impl`` (not by copy-paste):

* dropless grouped (``"auto"``, ``"grouped_mm"``, ``"loop"``): kept slots are sorted by expert into
  contiguous row blocks (stable sort: token order inside a block), the experts run one matmul per block
  (:func:`moe_lab.nn.experts.grouped_matmul`), and each row is scaled by its combine weight and added back
  to its token (``index_add``). No compute is spent on dropped or padding slots.
* fixed capacity (``"capacity"``): every expert gets a ``[C, D]`` buffer (zero rows where unused) and the
  experts run as one batched matmul. Slots past ``C`` are dropped: they contribute 0 to the MoE output, so
  the token passes through the residual only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moe_lab.nn.experts import Experts, autocast_input
from moe_lab.nn.huge_pages import empty_large
from moe_lab.nn.router import RoutingDecision

__all__ = [
    "DISPATCH_IMPLS",
    "ROW_MULTIPLE_SHAPES",
    "DispatchPlan",
    "dispatch_combine",
    "moe_capacity",
    "moe_dropless",
    "plan_dispatch",
    "prefer_padded",
    "row_multiple",
]

DISPATCH_IMPLS = ("auto", "grouped_mm", "loop", "capacity")


@dataclass
class DispatchPlan:
    """Where each kept slot goes.

    Attributes:
        token_idx_N: source token of each row, rows sorted by expert (token order inside an expert).
        weights_N: combine weight of each row (float32, as the router made it).
        expert_N: expert of each row.
        counts: rows per expert, python ints (``len == E``).
    """

    token_idx_N: Tensor
    weights_N: Tensor
    expert_N: Tensor
    counts: list[int]


class _GatherRows(torch.autograd.Function):
    """``x[token]`` (rows sorted by expert) into an :func:`~moe_lab.nn.huge_pages.empty_large` buffer; backward ``index_add``."""

    @staticmethod
    def forward(ctx: Any, x_TD: Tensor, token_N: Tensor) -> Tensor:
        ctx.save_for_backward(token_N)
        ctx.num_tokens = x_TD.shape[0]
        out_ND = empty_large((token_N.shape[0], x_TD.shape[1]), x_TD)
        return torch.index_select(x_TD, 0, token_N, out=out_ND)

    @staticmethod
    def backward(ctx: Any, g_ND: Tensor) -> tuple[Tensor, None]:
        (token_N,) = ctx.saved_tensors
        return g_ND.new_zeros(ctx.num_tokens, g_ND.shape[1]).index_add_(0, token_N, g_ND), None


class _WeightedScatterAdd(torch.autograd.Function):
    """``out[token[n]] += w[n] * y[n]``; the backward reuses one ``[N, D]`` buffer for both gradients."""

    @staticmethod
    def forward(ctx: Any, y_ND: Tensor, w_N: Tensor, token_N: Tensor, num_tokens: int) -> Tensor:
        ctx.save_for_backward(y_ND, w_N, token_N)
        out_TD = y_ND.new_zeros(num_tokens, y_ND.shape[1])
        yw_ND = torch.mul(y_ND, w_N[:, None], out=empty_large(tuple(y_ND.shape), y_ND))
        return out_TD.index_add_(0, token_N, yw_ND)

    @staticmethod
    def backward(ctx: Any, g_TD: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        y_ND, w_N, token_N = ctx.saved_tensors
        g_ND = torch.index_select(g_TD, 0, token_N, out=empty_large(tuple(y_ND.shape), g_TD))
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.linalg.vecdot(g_ND, y_ND)
        grad_y = g_ND.mul_(w_N[:, None]) if ctx.needs_input_grad[0] else None
        return grad_y, grad_w, None, None


def plan_dispatch(decision: RoutingDecision, num_experts: int | None = None) -> DispatchPlan:
    """Sort the kept slots of ``decision`` by expert.

    Example:
        >>> from moe_lab.nn.router import TopKRouter
        >>> d = TopKRouter(8, 4, top_k=2)(torch.randn(3, 8))
        >>> sum(plan_dispatch(d).counts)
        6
    """
    e = num_experts if num_experts is not None else decision.num_experts
    idx_TK, mask_TK = decision.expert_indices, decision.slot_mask
    k = idx_TK.shape[1]
    key = idx_TK.reshape(-1)
    mask = mask_TK.reshape(-1)
    key = torch.where(mask, key, torch.full_like(key, e))
    order = torch.argsort(key, stable=True)
    counts_all = torch.bincount(key, minlength=e + 1)
    counts = counts_all[:e].tolist()
    order = order[: sum(counts)]
    return DispatchPlan(
        token_idx_N=torch.div(order, k, rounding_mode="floor"),
        weights_N=decision.combine_weights.reshape(-1)[order],
        expert_N=key[order],
        counts=counts,
    )


def prefer_padded(counts: list[int], num_threads: int | None = None) -> bool:
    """Whether ``impl="auto"`` on CPU runs the experts as batched matmuls over ``[E, max(counts), D]``
    (zero-padded, still dropless) instead of one matmul per expert block.

    With two or more threads a batched matmul hands whole experts to each thread, while a small per-expert
    matmul parallelises badly; the padding rows cost extra FLOPs. Measured on a 2-core CPU (forward +
    backward of one layer, ``benchmarks/moe_layer.py`` shapes): padded is 0.60-0.90x the time of the
    per-expert loop for 8-32 rows per expert (even with 1.4-3x padding), 0.81-0.97x for 64-512 rows per
    expert with under 10% padding, and slower beyond; with one thread it is slower everywhere. So: at
    least 2 threads, and either at most 32 rows per expert on average with at most 4x padding, or at most
    512 with at most 10% padding.

    >>> prefer_padded([40, 38, 41, 39, 40, 42, 40, 40], num_threads=2)
    True
    >>> prefer_padded([40, 38, 41, 39, 40, 42, 40, 40], num_threads=1)
    False
    """
    threads = torch.get_num_threads() if num_threads is None else num_threads
    n, e = sum(counts), len(counts)
    if threads < 2 or n == 0:
        return False
    mean, pad = n / e, e * max(counts) / n
    return (mean <= 32 and pad <= 4.0) or (mean <= 512 and pad <= 1.1)


def moe_dropless(x_TD: Tensor, decision: RoutingDecision, experts: Experts, impl: str = "auto") -> Tensor:
    """Grouped dropless path: compute only the kept slots, one block of rows per expert.

    With ``impl="auto"`` on a multi-threaded CPU, small per-expert blocks run instead as zero-padded batched
    matmuls (:func:`prefer_padded`); the result is the same (no slot is dropped).

    Example:
        >>> from moe_lab.nn.router import TopKRouter
        >>> x = torch.randn(5, 8)
        >>> moe_dropless(x, TopKRouter(8, 4)(x), Experts(4, 8, 16)).shape
        torch.Size([5, 8])
    """
    x_TD = autocast_input(x_TD)  # under autocast: gather and run the experts in its dtype
    plan = plan_dispatch(decision, experts.num_experts)
    if plan.token_idx_N.numel() == 0:
        return torch.zeros_like(x_TD)
    most = max(plan.counts)
    multiple = row_multiple(x_TD, most)  # > 1: bf16 / fp16 on CPU, blocks padded to repeating sizes
    if (
        impl == "auto"
        and x_TD.device.type == "cpu"
        and type(experts) is Experts  # subclasses (quantised, cached) only implement the grouped layout
        and prefer_padded(plan.counts)
    ):
        return _run_padded(x_TD, plan, experts, -(-most // multiple) * multiple)
    if multiple > 1:  # any experts type: rows are independent, padding rows are zeros and never read
        return _run_aligned(x_TD, plan, experts, multiple, impl)
    x_ND = _GatherRows.apply(x_TD, plan.token_idx_N)
    y_ND = experts(x_ND, plan.counts, impl=impl)
    return _WeightedScatterAdd.apply(y_ND, plan.weights_N.to(y_ND.dtype), plan.token_idx_N, x_TD.shape[0])


ROW_MULTIPLE_SHAPES = 8
"""With bfloat16 / float16 on CPU, expert blocks are padded to multiples of about ``max rows / 8``
(see :func:`row_multiple`)."""


def row_multiple(x: Tensor, max_rows: int) -> int:
    """Row multiple the dropless path pads each expert's block to when the largest block has ``max_rows``:
    for bfloat16 / float16 on CPU the power of two at or above ``max_rows / 8``, else 1.

    Low-precision CPU matmuls run through oneDNN, which compiles (JIT) a kernel for each new matrix shape
    and keeps it: about 4 ms per new row count, measured here, against 0.3 ms for a ``[600, 512] @ [512, 256]``
    product itself. Expert loads change every training step, so unpadded blocks compile on almost every call
    (and the kernel cache grows: 908 MiB peak RSS against 588 MiB padded, ``small`` preset, 4 steps). Padded
    with zero rows (whose outputs are never read) to multiples of ``m`` (``max_rows / 8 <= m < max_rows / 4``), a
    step has at most 9 distinct block sizes, which repeat from step to step; each block grows by less than
    ``m`` rows. Measured on the ``small`` preset (batch 8 x 256,
    about 900 rows in the largest block: multiple 128; 2 threads, new batches each step): 298-354 ms per step
    with 128, 366-410 with 64, 365-388 with 256. Small blocks (decode-sized, few possible sizes) get small
    multiples.

    >>> row_multiple(torch.ones(2, dtype=torch.bfloat16), 900), row_multiple(torch.ones(2, dtype=torch.bfloat16), 6)
    (128, 1)
    >>> row_multiple(torch.ones(2), 900)
    1
    """
    if (
        x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float16)
        and max_rows > ROW_MULTIPLE_SHAPES
    ):
        return 1 << math.ceil(math.log2(max_rows / ROW_MULTIPLE_SHAPES))
    return 1


def _block_layout(
    x_TD: Tensor, plan: DispatchPlan, sizes: list[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The sorted slots laid out in consecutive blocks of ``sizes[e]`` rows, zero rows where unused; slots past
    their block's size (token order inside an expert) are dropped.

    Returns ``(x_RD, row_N, token_N, weights_N)``: the rows, and for each slot that fits its row, token and
    combine weight.
    """
    shift, ends, src, dst = [], [], 0, 0
    for c, size in zip(plan.counts, sizes):
        shift.append(dst - src)
        src, dst = src + c, dst + size
        ends.append(dst)
    device = x_TD.device
    expert_N = plan.expert_N
    row_N = torch.arange(expert_N.numel(), device=device) + torch.tensor(shift, device=device)[expert_N]
    token_N, weights_N = plan.token_idx_N, plan.weights_N
    if any(c > size for c, size in zip(plan.counts, sizes)):
        keep_N = row_N < torch.tensor(ends, device=device)[expert_N]
        row_N, token_N, weights_N = row_N[keep_N], token_N[keep_N], weights_N[keep_N]
    x_RD = x_TD.new_zeros(dst, x_TD.shape[1]).index_copy(0, row_N, x_TD.index_select(0, token_N))
    return x_RD, row_N, token_N, weights_N


def _run_aligned(x_TD: Tensor, plan: DispatchPlan, experts: Experts, multiple: int, impl: str) -> Tensor:
    """The grouped layout with each expert's block padded with zero rows to a multiple of ``multiple``."""
    padded = [-(-c // multiple) * multiple for c in plan.counts]
    x_RD, row_N, token_N, weights_N = _block_layout(x_TD, plan, padded)
    y_ND = experts(x_RD, padded, impl=impl).index_select(0, row_N)
    return _WeightedScatterAdd.apply(y_ND, weights_N.to(y_ND.dtype), token_N, x_TD.shape[0])


def moe_capacity(
    x_TD: Tensor, decision: RoutingDecision, experts: Experts, capacity: int | None = None
) -> Tensor:
    """Fixed-capacity path: ``[E, C, D]`` buffers and one batched matmul per weight.

    ``capacity`` defaults to ``decision.capacity`` or, for a dropless decision, the largest expert load.
    Kept slots past the capacity (token order inside each expert) are dropped here and contribute 0.

    Example:
        >>> from moe_lab.nn.router import SwitchRouter
        >>> x = torch.randn(6, 8)
        >>> moe_capacity(x, SwitchRouter(8, 4, capacity_factor=1.0)(x), Experts(4, 8, 16)).shape
        torch.Size([6, 8])
    """
    x_TD = autocast_input(x_TD)
    plan = plan_dispatch(decision, experts.num_experts)
    if capacity is None:
        capacity = decision.capacity if decision.capacity is not None else max(plan.counts, default=0)
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    if plan.token_idx_N.numel() == 0 or capacity == 0:
        return torch.zeros_like(x_TD)
    return _run_padded(x_TD, plan, experts, capacity)


def _run_padded(x_TD: Tensor, plan: DispatchPlan, experts: Experts, capacity: int) -> Tensor:
    """``[E, C, D]`` buffers (zero rows where unused), batched matmuls, slots past C dropped."""
    e, d = experts.num_experts, x_TD.shape[1]
    x_RD, row_N, token_N, weights_N = _block_layout(x_TD, plan, [capacity] * e)
    y_RD = experts.forward_capacity(x_RD.view(e, capacity, d)).view(e * capacity, d)
    y_ND = y_RD.index_select(0, row_N) * weights_N.to(y_RD.dtype)[:, None]
    return torch.zeros_like(x_TD).index_add(0, token_N, y_ND)


def dispatch_combine(x_TD: Tensor, decision: RoutingDecision, experts: Experts, impl: str = "auto") -> Tensor:
    """Run the routed experts for ``decision`` and combine: ``out[t] = sum_k w[t,k] * expert_{e[t,k]}(x[t])``.

    ``impl``: ``"auto"`` | ``"grouped_mm"`` | ``"loop"`` (dropless grouped layout) or ``"capacity"``.
    Slots with ``slot_mask`` False (dropped, padding) contribute 0.
    """
    if impl not in DISPATCH_IMPLS:
        raise ValueError(f"impl must be one of {list(DISPATCH_IMPLS)}, got {impl!r}")
    if impl == "capacity":
        return moe_capacity(x_TD, decision, experts)
    return moe_dropless(x_TD, decision, experts, impl=impl)
