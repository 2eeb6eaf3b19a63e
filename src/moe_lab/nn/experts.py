"""Expert FFNs held as stacked weights, computed per contiguous block of rows (grouped matmul).

Shape legend: N token-slots sorted by expert (rows), E experts, C capacity slots per expert, D model dim,
F expert FFN dim. ``counts_E`` gives how many consecutive rows of ``x_ND`` belong to each expert.

Implementations (``impl``): ``"grouped_mm"`` uses ``torch._grouped_mm`` (one call per weight, autograd
included); ``"loop"`` runs one plain matmul per expert; ``"auto"`` picks ``grouped_mm`` when this torch
has it and the row strides of D and F elements are multiples of 16 bytes (its rule), else ``"loop"``. The obvious per-expert reference lives in ``tests/nn/_moe_reference.py`` and the tests compare every
implementation with it (outputs and all gradients).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lab.nn.huge_pages import HUGE_PAGE_BYTES, empty_large

__all__ = [
    "ACTIVATIONS",
    "EXPERT_IMPLS",
    "Experts",
    "SharedExperts",
    "autocast_input",
    "grouped_matmul",
    "grouped_mm_supported",
    "has_grouped_mm",
]

ACTIVATIONS = ("swiglu", "gelu")
EXPERT_IMPLS = ("auto", "grouped_mm", "loop")


def has_grouped_mm() -> bool:
    """True when this torch build provides ``torch._grouped_mm``."""
    return hasattr(torch, "_grouped_mm")


_LARGE_BYTES = HUGE_PAGE_BYTES  # from 2 MiB a pooled output (no page faults) beats the C++ loop's fresh one


def autocast_input(x: Tensor) -> Tensor:
    """``x`` in the autocast dtype when autocast is on for its device (and ``x`` is floating point), else ``x``.

    ``torch._grouped_mm``, the batched matmuls of the expert layouts and the custom autograd functions here
    are not on autocast's cast lists, so without this the routed experts (most of an MoE model's FLOPs) would
    run in float32 under ``torch.autocast``, where an ``nn.Linear`` runs in bfloat16.

    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     autocast_input(torch.ones(2)).dtype
    torch.bfloat16
    >>> autocast_input(torch.ones(2)).dtype
    torch.float32
    """
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        if x.dtype != dtype:
            return x.to(dtype)
    return x


def _weight_grad(x_NX: Tensor, g_NY: Tensor, counts: list[int], shape: tuple[int, ...]) -> Tensor:
    """``grad_w[e] = x[rows of e]^T @ g[rows of e]`` written in place into one fresh ``[E, X, Y]`` buffer."""
    grad_EXY = empty_large(shape, g_NY)
    for e, (xe, ge) in enumerate(zip(x_NX.split(counts), g_NY.split(counts))):
        if xe.shape[0] == 0:
            grad_EXY[e].zero_()
        else:
            torch.mm(xe.t(), ge, out=grad_EXY[e])
    return grad_EXY


def _gmm(x_NX: Tensor, w_EXY: Tensor, counts: list[int], offs_E: Tensor) -> Tensor:
    """``torch._grouped_mm``; on CPU the same per-block matmuls written into one :func:`~moe_lab.nn.huge_pages.empty_large` buffer
    (the CPU kernel loops over the blocks too, but its fresh output is page-faulted 4 KiB at a time)."""
    nbytes = x_NX.shape[0] * w_EXY.shape[2] * x_NX.element_size()
    if x_NX.device.type != "cpu" or nbytes < _LARGE_BYTES:  # small outputs: no page-fault cost to avoid
        return torch._grouped_mm(x_NX, w_EXY, offs=offs_E)
    out_NY = empty_large((x_NX.shape[0], w_EXY.shape[2]), x_NX)
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(x_NX[start : start + n], w_EXY[e], out=out_NY[start : start + n])
            start += n
    return out_NY


class _SwiGLU(torch.autograd.Function):
    """``silu(h1) * h3``, saving only its inputs (autograd would also keep ``silu(h1)``), with its output
    and gradients in :func:`~moe_lab.nn.huge_pages.empty_large` buffers."""

    @staticmethod
    def forward(ctx: Any, h1: Tensor, h3: Tensor) -> Tensor:
        ctx.save_for_backward(h1, h3)
        out = empty_large(tuple(h1.shape), h1)
        return torch.ops.aten.silu.out(h1, out=out).mul_(h3)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor]:
        h1, h3 = ctx.saved_tensors
        g_h3 = torch.ops.aten.silu.out(h1, out=empty_large(tuple(h1.shape), h1)).mul_(g)
        g_h1 = torch.mul(g, h3, out=empty_large(tuple(h1.shape), h1))
        return torch.ops.aten.silu_backward.grad_input(g_h1, h1, grad_input=g_h1), g_h3


class _GroupedMM(torch.autograd.Function):
    """``torch._grouped_mm`` with our backward: the weight gradient goes straight into one buffer."""

    @staticmethod
    def forward(ctx: Any, x_NX: Tensor, w_EXY: Tensor, counts: list[int], offs_E: Tensor) -> Tensor:
        ctx.save_for_backward(x_NX, w_EXY)
        ctx.counts = counts
        ctx.offs = offs_E
        return _gmm(x_NX, w_EXY, counts, offs_E)

    @staticmethod
    def backward(ctx: Any, g_NY: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x_NX, w_EXY = ctx.saved_tensors
        g_NY = g_NY.contiguous()  # zero-stride gradients (from .sum()) are rejected by _grouped_mm
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _gmm(g_NY, w_EXY.transpose(1, 2), ctx.counts, ctx.offs)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(x_NX, g_NY, ctx.counts, tuple(w_EXY.shape))
        return grad_x, grad_w, None, None


class _PooledBMM(torch.autograd.Function):
    """``torch.bmm(a, b)`` whose output and gradients are :func:`~moe_lab.nn.huge_pages.empty_large` buffers
    (CPU: reused, not page-faulted anew each step; the padded expert layout's weight gradients are E full
    weight matrices)."""

    @staticmethod
    def forward(ctx: Any, a_EMK: Tensor, b_EKN: Tensor) -> Tensor:
        ctx.save_for_backward(a_EMK, b_EKN)
        out = empty_large((a_EMK.shape[0], a_EMK.shape[1], b_EKN.shape[2]), a_EMK)
        return torch.bmm(a_EMK, b_EKN, out=out)

    @staticmethod
    def backward(ctx: Any, g_EMN: Tensor) -> tuple[Tensor | None, Tensor | None]:
        a_EMK, b_EKN = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.bmm(g_EMN, b_EKN.transpose(1, 2), out=empty_large(tuple(a_EMK.shape), g_EMN))
        if ctx.needs_input_grad[1]:
            grad_b = torch.bmm(a_EMK.transpose(1, 2), g_EMN, out=empty_large(tuple(b_EKN.shape), g_EMN))
        return grad_a, grad_b


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """Batched matmul; with autograd on CPU through :class:`_PooledBMM` (same numbers)."""
    if a.device.type == "cpu" and torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _PooledBMM.apply(a, b)
    return torch.bmm(a, b)


def grouped_matmul(
    x_ND: Tensor, w_EXY: Tensor, counts: list[int], offs_E: Tensor | None, impl: str
) -> Tensor:
    """``y[rows of e] = x[rows of e] @ w[e]`` for consecutive row blocks of sizes ``counts``.

    Args:
        x_ND: rows sorted by expert, ``sum(counts) == N``.
        w_EXY: stacked weights ``[E, X, Y]`` with ``X == x_ND.shape[1]``.
        counts: rows per expert (python ints).
        offs_E: ``cumsum(counts)`` as int32 on ``x_ND``'s device (computed when None).
        impl: ``"grouped_mm"``, ``"loop"`` or ``"auto"`` (``grouped_mm`` when its 16-byte stride rule
            holds for these sizes, else ``loop``).

    Example:
        >>> x, w = torch.randn(5, 4), torch.randn(2, 4, 3)
        >>> y = grouped_matmul(x, w, [2, 3], None, "loop")
        >>> bool(torch.allclose(y[:2], x[:2] @ w[0]))
        True
    """
    if impl == "auto":
        ok = grouped_mm_supported(w_EXY.shape[1], w_EXY.shape[2], x_ND.dtype)
        impl = "grouped_mm" if ok else "loop"
    if impl == "grouped_mm":
        if offs_E is None:
            offs_E = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x_ND.device)
        return _GroupedMM.apply(x_ND, w_EXY, counts, offs_E)
    if impl == "loop":
        # unbind once: indexing w[e] per expert makes autograd allocate a full [E, X, Y] gradient per expert.
        outs = [xe @ we for xe, we in zip(x_ND.split(counts), w_EXY.unbind(0)) if xe.shape[0] > 0]
        if not outs:  # no rows at all: keep the autograd graph (zero gradients)
            return x_ND @ w_EXY[0]
        if len(outs) == 1:
            return outs[0]
        return torch.cat(outs)
    raise ValueError(f"impl must be one of {list(EXPERT_IMPLS)}, got {impl!r}")


def grouped_mm_supported(hidden_size: int, ffn_hidden_size: int, dtype: torch.dtype) -> bool:
    """``torch._grouped_mm`` exists and its 16-byte stride rule holds for rows of D and F elements."""
    size = torch.empty((), dtype=dtype).element_size()
    return has_grouped_mm() and (hidden_size * size) % 16 == 0 and (ffn_hidden_size * size) % 16 == 0


def _resolve_impl(impl: str, hidden_size: int, ffn_hidden_size: int, dtype: torch.dtype) -> str:
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"impl must be one of {list(EXPERT_IMPLS)}, got {impl!r}")
    ok = grouped_mm_supported(hidden_size, ffn_hidden_size, dtype)
    if impl == "auto":
        return "grouped_mm" if ok else "loop"
    if impl == "grouped_mm" and not ok:
        raise ValueError(
            "impl='grouped_mm' needs torch._grouped_mm (torch >= 2.8) and hidden_size and ffn_hidden_size "
            f"whose rows are multiples of 16 bytes (got D={hidden_size}, F={ffn_hidden_size}, {dtype}); "
            "use impl='loop' or 'auto'"
        )
    return impl


class Experts(nn.Module):
    """E expert FFNs with stacked weights.

    SwiGLU: ``w1_EDF`` (gate), ``w3_EDF`` (up), ``w2_EFD`` (down); ``out = (silu(x @ w1) * (x @ w3)) @ w2``.
    GELU: ``w1_EDF``, ``w2_EFD``; ``out = gelu(x @ w1) @ w2`` (exact erf GELU).

    Args:
        num_experts: E.
        hidden_size: D.
        ffn_hidden_size: F, per expert.
        activation: ``"swiglu"`` or ``"gelu"``.
        init_std: std of the normal init of the input projections.
        output_init_std: std for ``w2_EFD`` (e.g. GPT-2's ``init_std / sqrt(2 * n_layers)``); default init_std.
        expert_dropout: dropout on the hidden activation in training.

    Example:
        >>> experts = Experts(4, 16, 32)
        >>> x = torch.randn(6, 16)
        >>> experts(x, [1, 0, 5, 0]).shape
        torch.Size([6, 16])
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        *,
        activation: str = "swiglu",
        init_std: float = 0.02,
        output_init_std: float | None = None,
        expert_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_experts", num_experts),
            ("hidden_size", hidden_size),
            ("ffn_hidden_size", ffn_hidden_size),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        if not 0.0 <= expert_dropout < 1.0:
            raise ValueError(f"expert_dropout must be in [0, 1), got {expert_dropout!r}")
        if init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {init_std!r}")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.activation = activation
        self.expert_dropout = float(expert_dropout)
        self.init_std = float(init_std)
        self.output_init_std = float(output_init_std) if output_init_std is not None else float(init_std)
        e, d, f = num_experts, hidden_size, ffn_hidden_size
        self.w1_EDF = nn.Parameter(torch.empty(e, d, f))
        self.w3_EDF: nn.Parameter | None = (
            nn.Parameter(torch.empty(e, d, f)) if activation == "swiglu" else None
        )
        self.w2_EFD = nn.Parameter(torch.empty(e, f, d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w1_EDF, std=self.init_std)
        if self.w3_EDF is not None:
            nn.init.normal_(self.w3_EDF, std=self.init_std)
        nn.init.normal_(self.w2_EFD, std=self.output_init_std)

    def _hidden(self, h1: Tensor, h3: Tensor | None) -> Tensor:
        if h3 is None:
            h = F.gelu(h1)
        elif (
            torch.is_grad_enabled()
            and (h1.requires_grad or h3.requires_grad)
            and h1.shape == h3.shape
            and h1.dtype == h3.dtype
        ):  # training: fewer saved tensors, huge-page buffers
            h = _SwiGLU.apply(h1, h3)
        else:
            h = F.silu(h1) * h3
        if self.training and self.expert_dropout > 0:
            h = F.dropout(h, self.expert_dropout, training=True)
        return h

    def forward(self, x_ND: Tensor, counts: list[int], impl: str = "auto") -> Tensor:
        """Rows of ``x_ND`` sorted by expert (``counts[e]`` rows for expert e) -> expert outputs ``[N, D]``."""
        x_ND = autocast_input(x_ND)
        impl = _resolve_impl(impl, self.hidden_size, self.ffn_hidden_size, x_ND.dtype)
        if len(counts) != self.num_experts or sum(counts) != x_ND.shape[0]:
            raise ValueError(
                f"counts must have {self.num_experts} entries summing to {x_ND.shape[0]}, got {counts}"
            )
        offs = None
        if impl == "grouped_mm":
            offs = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x_ND.device)
        w1, w2 = self.w1_EDF.to(x_ND.dtype), self.w2_EFD.to(x_ND.dtype)
        h1 = grouped_matmul(x_ND, w1, counts, offs, impl)
        h3 = None
        if self.w3_EDF is not None:
            h3 = grouped_matmul(x_ND, self.w3_EDF.to(x_ND.dtype), counts, offs, impl)
        return grouped_matmul(self._hidden(h1, h3), w2, counts, offs, impl)

    def forward_capacity(self, x_ECD: Tensor) -> Tensor:
        """Fixed-capacity layout: ``x_ECD`` (C slots per expert, unused slots zero) -> ``[E, C, D]``."""
        x_ECD = autocast_input(x_ECD)
        h1 = _bmm(x_ECD, self.w1_EDF.to(x_ECD.dtype))
        h3 = _bmm(x_ECD, self.w3_EDF.to(x_ECD.dtype)) if self.w3_EDF is not None else None
        return _bmm(self._hidden(h1, h3), self.w2_EFD.to(x_ECD.dtype))

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"ffn_hidden_size={self.ffn_hidden_size}, activation={self.activation!r}"
        )


class SharedExperts(nn.Module):
    """Always-on experts (DeepSeekMoE), held as one dense FFN of width ``num_shared * ffn_hidden_size``.

    With ``gate=True`` the output is scaled by ``sigmoid(x @ g)`` (Qwen2-MoE), ``g = Linear(D, 1)``; the
    gate lives in the MoE layer as ``shared_expert_gate``, this module is the FFN only.

    Example:
        >>> shared = SharedExperts(16, 32, num_shared_experts=2)
        >>> shared(torch.randn(3, 16)).shape
        torch.Size([3, 16])
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_shared_experts: int = 1,
        *,
        activation: str = "swiglu",
        init_std: float = 0.02,
        output_init_std: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_shared_experts, int) or num_shared_experts <= 0:
            raise ValueError(f"num_shared_experts must be a positive int, got {num_shared_experts!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        width = num_shared_experts * ffn_hidden_size
        self.activation = activation
        self.w1 = nn.Linear(hidden_size, width, bias=False)
        self.w3 = nn.Linear(hidden_size, width, bias=False) if activation == "swiglu" else None
        self.w2 = nn.Linear(width, hidden_size, bias=False)
        nn.init.normal_(self.w1.weight, std=init_std)
        if self.w3 is not None:
            nn.init.normal_(self.w3.weight, std=init_std)
        nn.init.normal_(self.w2.weight, std=output_init_std if output_init_std is not None else init_std)

    def forward(self, x_TD: Tensor) -> Tensor:
        h = F.silu(self.w1(x_TD)) * self.w3(x_TD) if self.w3 is not None else F.gelu(self.w1(x_TD))
        return self.w2(h)
