"""LoRA layers: :class:`LoRALinear`, :class:`LoRAExperts`, and the fused product both are built on.

:func:`lora_matmul` computes a base matmul and its low-rank update as one autograd node.

Shape legend: N rows (tokens, or token-slots sorted by expert), E groups of consecutive rows (experts; one
group for a plain linear layer or an adapter shared by all experts), X input width, Y_k output width of base
weight k, r LoRA rank. Several base weights may share one adapter (gate and up projections, like peft on a
fused ``gate_up_proj``): their outputs are the column blocks of ``B``.

Per group ``e`` of rows: ``y_k = x @ w_k[e] + scale * (xd @ A[e]) @ B[e][:, cols_k]``, with ``xd`` the adapter
input (``x`` after dropout, or ``x`` itself). Against the same thing composed from autograd ops this

- multiplies by ``scale`` on the small ``[N, r]`` activation, not on ``[N, Y]`` outputs and their gradients,
- adds the low-rank update into the base output in place (``addmm_``) instead of allocating and adding an
  ``[N, Y]`` tensor, and accumulates the adapter's input gradient into the base one the same way,
- builds no ``[E, X, Y]`` weight delta, and computes a base weight gradient only when the base weight
  requires one (frozen bases skip it),
- keeps ``A`` as ``A^T`` (``[r, X]`` row-major) for ``x @ A`` and computes ``grad(A)^T = gh^T @ x``: with
  the rank-r side in that layout, these thin products run several times faster on CPU BLAS.

On CPU the rank-r products loop over groups (``_grouped_mm`` loops there too, and a loop can accumulate in
place); on accelerators with ``impl="grouped_mm"`` they use ``torch._grouped_mm``.

The obvious autograd composition is the reference in ``tests/finetune/test_lora_layers.py`` (outputs and every
gradient compared on random inputs).

Example:
    >>> x, w = torch.randn(5, 4), torch.randn(2, 4, 3)
    >>> a, b = torch.randn(2, 4, 2), torch.randn(2, 2, 3)
    >>> (y,) = lora_matmul(x, None, [w], a, b, 0.5, [2, 3], None, "loop")
    >>> bool(torch.allclose(y[:2], x[:2] @ (w[0] + 0.5 * a[0] @ b[0]), atol=1e-5))
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from moe_lab.nn.experts import Experts, autocast_input, grouped_matmul, grouped_mm_supported

__all__ = ["LoRAExperts", "LoRALinear", "lora_matmul"]


def _groups(t: Tensor, counts: list[int]) -> tuple[Tensor, ...]:
    return t.split(counts) if len(counts) > 1 else (t,)


def _grouped_small(x: Tensor, impl: str, rank: int, groups: int) -> bool:
    """Run the rank-r products with ``torch._grouped_mm`` (one launch) rather than a loop over groups.

    Only on accelerators: on CPU ``_grouped_mm`` loops over groups itself, and the loop lets us accumulate
    into the base output in place.
    """
    return (
        groups > 1 and impl == "grouped_mm" and x.device.type != "cpu" and (rank * x.element_size()) % 16 == 0
    )


def _mm_rows(x: Tensor, w: Tensor, counts: list[int], offs: Tensor | None, grouped: bool) -> Tensor:
    """``x[rows of e] @ w[e]`` into a fresh ``[N, w.shape[2]]`` tensor."""
    if grouped:
        return torch._grouped_mm(x, w.contiguous(), offs=offs)
    out = x.new_empty(x.shape[0], w.shape[2])
    for oe, xe, we in zip(_groups(out, counts), _groups(x, counts), w.unbind(0)):
        torch.mm(xe, we, out=oe)
    return out


def _addmm_rows_(
    out: Tensor, x: Tensor, w: Tensor, counts: list[int], offs: Tensor | None, grouped: bool, alpha: float
) -> None:
    """``out[rows of e] += alpha * x[rows of e] @ w[e]`` in place."""
    if grouped:
        out.add_(torch._grouped_mm(x, w.contiguous(), offs=offs), alpha=alpha)
        return
    for oe, xe, we in zip(_groups(out, counts), _groups(x, counts), w.unbind(0)):
        oe.addmm_(xe, we, alpha=alpha)


def _weight_grad(x: Tensor, g: Tensor, counts: list[int], shape: tuple[int, ...]) -> Tensor:
    """``grad[e] = x[rows of e]^T @ g[rows of e]`` as one ``[E, X, Y]`` tensor."""
    grad = x.new_empty(shape)
    for ge, xe, gye in zip(grad.unbind(0), _groups(x, counts), _groups(g, counts)):
        if xe.shape[0] == 0:
            ge.zero_()
        else:
            torch.mm(xe.t(), gye, out=ge)
    return grad


class _LoRAMatmul(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        xd: Tensor | None,
        a: Tensor,
        b: Tensor,
        scale: float,
        counts: list[int],
        offs: Tensor | None,
        impl: str,
        *ws: Tensor,
    ) -> tuple[Tensor, ...]:
        n = x.shape[0]
        a3, b3 = (a, b) if a.dim() == 3 else (a[None], b[None])
        lcounts = counts if a.dim() == 3 else [n]
        grouped = _grouped_small(x, impl, a3.shape[2], len(lcounts))
        cols = [w.shape[2] for w in ws]
        ys = [grouped_matmul(x, w, counts, offs, impl) for w in ws]
        # A^T [E, r, X] row-major: BLAS is several times faster on x @ A and its gradient with this layout
        at3 = a3.transpose(1, 2).contiguous()
        h = _mm_rows(x if xd is None else xd, at3.transpose(1, 2), lcounts, offs, grouped).mul_(scale)
        for y, bk in zip(ys, b3.split(cols, dim=2)):
            _addmm_rows_(y, h, bk, lcounts, offs, grouped, 1.0)
        ctx.save_for_backward(x, xd, at3, b3, h, *ws)
        ctx.meta = (scale, counts, offs, impl, lcounts, grouped, cols, a.dim())
        return tuple(ys)

    @staticmethod
    def backward(ctx: Any, *gs: Tensor) -> tuple[Tensor | None, ...]:
        x, xd, at3, b3, h, *ws = ctx.saved_tensors
        scale, counts, offs, impl, lcounts, grouped, cols, a_dim = ctx.meta
        need_x, need_xd, need_a, need_b = ctx.needs_input_grad[:4]
        need_w = ctx.needs_input_grad[8:]
        gs = tuple(g.contiguous() for g in gs)  # zero-stride gradients are rejected by _grouped_mm
        b_ks = b3.split(cols, dim=2)
        # gradient of the rank-r activation h / scale: sum_k g_k @ B_k^T
        gh = _mm_rows(gs[0], b_ks[0].transpose(1, 2), lcounts, offs, grouped)
        for g, bk in zip(gs[1:], b_ks[1:]):
            _addmm_rows_(gh, g, bk.transpose(1, 2), lcounts, offs, grouped, 1.0)
        grad_x = grad_xd = grad_a = grad_b = None
        if need_x:
            gx = grouped_matmul(gs[0], ws[0].transpose(1, 2), counts, offs, impl)
            for g, w in zip(gs[1:], ws[1:]):
                gx.add_(grouped_matmul(g, w.transpose(1, 2), counts, offs, impl))
            if xd is None:
                _addmm_rows_(gx, gh, at3, lcounts, offs, grouped, scale)
            grad_x = gx
        if xd is not None and need_xd:
            grad_xd = _mm_rows(gh, at3, lcounts, offs, grouped).mul_(scale)
        if need_a:  # as grad(A)^T = gh^T @ x, the fast layout (see forward)
            grad_a = _weight_grad(gh, x if xd is None else xd, lcounts, tuple(at3.shape)).mul_(scale)
            grad_a = grad_a.transpose(1, 2) if a_dim == 3 else grad_a[0].t()
        if need_b:
            parts = [_weight_grad(h, g, lcounts, (len(lcounts), h.shape[1], g.shape[1])) for g in gs]
            grad_b = parts[0] if len(parts) == 1 else torch.cat(parts, 2)
            grad_b = grad_b if a_dim == 3 else grad_b[0]
        grad_ws = [
            _weight_grad(x, g, counts, tuple(w.shape)) if need else None for g, w, need in zip(gs, ws, need_w)
        ]
        return (grad_x, grad_xd, grad_a, grad_b, None, None, None, None, *grad_ws)


def lora_matmul(
    x_NX: Tensor,
    xd_NX: Tensor | None,
    ws: list[Tensor],
    a: Tensor,
    b: Tensor,
    scale: float,
    counts: list[int],
    offs_E: Tensor | None,
    impl: str,
) -> tuple[Tensor, ...]:
    """Base products plus one LoRA update: ``y_k = x @ ws[k] + scale * (xd @ A) @ B[..., cols_k]`` per group.

    Args:
        x_NX: input rows, sorted by group (``sum(counts) == N``).
        xd_NX: the adapter's input (``x`` after dropout); ``None`` means ``x`` itself.
        ws: stacked base weights ``[E, X, Y_k]`` (one group, ``[1, X, Y]``, for a linear layer).
        a: ``[E, X, r]`` per group, or ``[X, r]`` shared by every group.
        b: ``[E, r, sum(Y_k)]`` or ``[r, sum(Y_k)]``; columns split among ``ws`` in order.
        scale: ``alpha / r``.
        counts: rows per group (python ints).
        offs_E: ``cumsum(counts)`` as int32 on the device for ``impl="grouped_mm"`` (computed when None).
        impl: base matmul implementation, as for :func:`moe_lab.nn.experts.grouped_matmul`.

    Returns:
        One ``[N, Y_k]`` output per base weight.
    """
    if a.dim() != b.dim() or a.dim() not in (2, 3):
        raise ValueError(f"LoRA A/B must both be 2-D or 3-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if b.shape[-1] != sum(w.shape[2] for w in ws):
        raise ValueError(f"B has {b.shape[-1]} columns, the base weights {[w.shape[2] for w in ws]}")
    if impl == "grouped_mm" and offs_E is None:
        offs_E = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x_NX.device)
    # one compute dtype for every product: the autocast dtype under autocast (the function's in-place and
    # out= products are not on autocast's lists, so mixed float32 / bfloat16 operands would meet there)
    x_NX = autocast_input(x_NX)
    dt = x_NX.dtype
    xd_NX = None if xd_NX is None else xd_NX.to(dt)
    a, b, ws = a.to(dt), b.to(dt), [w.to(dt) for w in ws]
    out: tuple[Tensor, ...] = _LoRAMatmul.apply(x_NX, xd_NX, a, b, scale, counts, offs_E, impl, *ws)
    return out


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(dropout(x)))`` around an ``nn.Linear`` (A: [r, in], B: [out, r])."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xd = self.dropout(x2) if self.training and isinstance(self.dropout, nn.Dropout) else None
        w = self.base_layer.weight.t()[None]  # lora_matmul casts every operand to one compute dtype
        (y,) = lora_matmul(
            x2, xd, [w], self.lora_A.t(), self.lora_B.t(), self.scale, [x2.shape[0]], None, "loop"
        )
        if self.base_layer.bias is not None:
            y = y + self.base_layer.bias.to(y.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    def delta(self) -> Tensor:
        """The merged update ``scale * B @ A`` (shape of the base weight)."""
        return (self.lora_B @ self.lora_A) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base_layer.weight += self.delta().to(self.base_layer.weight.dtype)
        return self.base_layer


class LoRAExperts(nn.Module):
    """Stacked :class:`~moe_lab.nn.experts.Experts` with adapters on ``w1_EDF``/``w3_EDF``/``w2_EFD``.

    Same call signature as the wrapped experts (``forward(x_ND, counts, impl)``, ``forward_capacity``);
    other attributes (``num_experts``, ``w1_EDF``, ...) are read from the base. Adapters are keyed by the
    weight they adapt (``"w1"``, ``"w3"``, ``"w2"``), or ``"w13"`` for one adapter on gate and up together.
    """

    def __init__(
        self,
        base: Experts,
        rank: int,
        alpha: float,
        dropout: float,
        expert_wise: bool,
        weights: list[str],
        fused_gate_up: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base
        self.scale = alpha / rank
        self.expert_wise = expert_wise
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        names = [n for n in weights if n != "w3" or base.w3_EDF is not None]  # GELU experts have no w3
        fuse = fused_gate_up and "w1" in names and "w3" in names
        self.groups: dict[str, tuple[str, ...]] = {"w13": ("w1", "w3")} if fuse else {}
        self.groups.update({n: (n,) for n in names if not (fuse and n in ("w1", "w3"))})
        for key, members in self.groups.items():
            ws = [self._weight(m) for m in members]
            e, x_dim = ws[0].shape[:2]
            lead = (e,) if expert_wise else ()
            a = ws[0].new_empty(*lead, x_dim, rank)
            for i in range(e if expert_wise else 1):  # kaiming-uniform per expert, like nn.Linear's init
                nn.init.kaiming_uniform_((a[i] if expert_wise else a).T, a=math.sqrt(5))
            self.lora_A[key] = nn.Parameter(a)
            self.lora_B[key] = nn.Parameter(ws[0].new_zeros(*lead, rank, sum(w.shape[2] for w in ws)))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_layer"], name)

    def _weight(self, name: str) -> Tensor:
        w: Tensor = getattr(self.base_layer, f"{name}_EFD" if name == "w2" else f"{name}_EDF")
        return w

    def _project(
        self, names: tuple[str, ...], x: Tensor, counts: list[int] | None, impl: str
    ) -> list[Tensor]:
        """Outputs of base weights ``names`` (all fed ``x``) with their adapters; ``counts=None``: capacity."""
        out: dict[str, Tensor] = {}
        xd = self.dropout(x) if self.training and isinstance(self.dropout, nn.Dropout) else None
        offs = None
        if counts is not None and impl == "grouped_mm":
            offs = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x.device)
        for key, members in self.groups.items():
            if members[0] not in names:
                continue
            a, b = self.lora_A[key].to(x.dtype), self.lora_B[key].to(x.dtype)
            ws = [self._weight(m).to(x.dtype) for m in members]
            if counts is not None:
                out.update(zip(members, lora_matmul(x, xd, ws, a, b, self.scale, counts, offs, impl)))
                continue
            h = (x if xd is None else xd) @ a * self.scale  # x_ECD: [E, C, X] @ [E, X, r] or [X, r]
            upd = h @ b
            for m, w, u in zip(members, ws, upd.split([w.shape[2] for w in ws], dim=-1)):
                out[m] = torch.bmm(x, w) + u
        for n in names:
            if n not in out:
                w = self._weight(n).to(x.dtype)
                out[n] = torch.bmm(x, w) if counts is None else grouped_matmul(x, w, counts, offs, impl)
        return [out[n] for n in names]

    def forward(self, x_ND: Tensor, counts: list[int], impl: str = "auto") -> Tensor:
        base = self.base_layer
        if impl == "auto":
            ok = grouped_mm_supported(base.hidden_size, base.ffn_hidden_size, x_ND.dtype)
            impl = "grouped_mm" if ok else "loop"
        if len(counts) != base.num_experts or sum(counts) != x_ND.shape[0]:
            raise ValueError(f"counts must have {base.num_experts} entries summing to {x_ND.shape[0]}")
        if base.w3_EDF is None:
            (h1,), h3 = self._project(("w1",), x_ND, counts, impl), None
        else:
            h1, h3 = self._project(("w1", "w3"), x_ND, counts, impl)
        return self._project(("w2",), base._hidden(h1, h3), counts, impl)[0]

    def forward_capacity(self, x_ECD: Tensor) -> Tensor:
        base = self.base_layer
        if base.w3_EDF is None:
            (h1,), h3 = self._project(("w1",), x_ECD, None, ""), None
        else:
            h1, h3 = self._project(("w1", "w3"), x_ECD, None, "")
        return self._project(("w2",), base._hidden(h1, h3), None, "")[0]

    def delta(self, key: str) -> Tensor:
        """The merged update of adapter ``key``, ``[E, X, Y]`` (``"w13"``: w1's columns, then w3's)."""
        a, b = self.lora_A[key], self.lora_B[key]
        d = torch.bmm(a, b) if self.expert_wise else (a @ b)[None]
        return d * self.scale

    def merged(self) -> Experts:
        with torch.no_grad():
            for key, members in self.groups.items():
                ws = [self._weight(m) for m in members]
                for w, d in zip(ws, self.delta(key).split([w.shape[2] for w in ws], dim=-1)):
                    w += d.to(w.dtype)
        return self.base_layer
