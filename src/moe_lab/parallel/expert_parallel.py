"""Expert parallelism: each rank of an ``ep`` group holds E/ep experts; tokens travel by all-to-all.

Applied to a built model from outside (:func:`apply_expert_parallel`): each MoE layer's ``experts`` module is
replaced by :class:`ExpertParallelExperts`, whose stacked weights are one DTensor ``[E, ...]`` sharded along
the expert dimension over the ``ep`` mesh (so ``torch.distributed.checkpoint`` saves and reshards them
correctly; per-rank plain parameters were silently corrupted by DCP). The router, the dispatch plan and the
combine stay in the unchanged single-device code.

Forward for one layer, on each rank (shape legend: N rows sorted by global expert, R received rows,
E experts, L = E/ep local experts, D model dim):

1. exchange per-expert row counts (``all_to_all_single`` of ``[E]`` ints);
2. send each rank the rows of the experts it owns (``all_to_all_single``, uneven splits, autograd);
3. regroup the received rows by local expert, run the local experts, restore the received order;
4. send the outputs back (the inverse all-to-all); dispatch then combines them as usual.

Example (inside a 2-process job):
    >>> # apply_expert_parallel(model, ctx)   # ctx from moe_lab.parallel.init_distributed
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lab.nn.experts import grouped_matmul

__all__ = [
    "ExpertParallelExperts",
    "all_reduce_sum",
    "all_to_all",
    "apply_expert_parallel",
    "is_expert_param",
]


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; the backward is the inverse exchange."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group; the gradient of every input is the sum of the output gradients."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        g = grad.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def all_reduce_sum(x: Tensor, group: Any = None) -> Tensor:
    """Differentiable all-reduce (sum) over ``group``."""
    return _AllReduceSum.apply(x, group)  # type: ignore[no-any-return]


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: Any = None) -> Tensor:
    """Differentiable ``all_to_all_single`` of rows with uneven ``in_splits`` / ``out_splits``."""
    return _AllToAll.apply(x, out_splits, in_splits, group)  # type: ignore[no-any-return]


class ExpertParallelExperts(nn.Module):
    """The ``experts`` of one MoE layer, sharded over an expert-parallel group."""

    def __init__(self, experts: nn.Module, ep_mesh: Any) -> None:
        super().__init__()
        from torch.distributed.tensor import Shard, distribute_tensor

        self.num_experts = int(experts.num_experts)  # type: ignore[arg-type]
        self.hidden_size = int(experts.hidden_size)  # type: ignore[arg-type]
        self.ffn_hidden_size = int(experts.ffn_hidden_size)  # type: ignore[arg-type]
        self.activation = str(experts.activation)
        self.expert_dropout = float(getattr(experts, "expert_dropout", 0.0))
        self.ep_mesh = ep_mesh
        self.ep_size = int(ep_mesh.size())
        if self.num_experts % self.ep_size:
            raise ValueError(
                f"num_experts={self.num_experts} is not divisible by expert_parallel={self.ep_size}"
            )
        self.local_experts = self.num_experts // self.ep_size

        def shard(w: Tensor) -> nn.Parameter:
            return nn.Parameter(distribute_tensor(w.detach(), ep_mesh, [Shard(0)]))

        self.w1_EDF = shard(experts.w1_EDF)  # type: ignore[arg-type]
        w3 = getattr(experts, "w3_EDF", None)
        self.w3_EDF = shard(w3) if w3 is not None else None
        self.w2_EFD = shard(experts.w2_EFD)  # type: ignore[arg-type]

    @property
    def group(self) -> Any:
        return self.ep_mesh.get_group()

    def _local_ffn(self, x_RD: Tensor, counts: list[int]) -> Tensor:
        impl = "loop"
        w1 = self.w1_EDF.to_local().to(x_RD.dtype)  # type: ignore[attr-defined]
        w2 = self.w2_EFD.to_local().to(x_RD.dtype)  # type: ignore[attr-defined]
        h1 = grouped_matmul(x_RD, w1, counts, None, impl)
        if self.w3_EDF is not None:
            h = F.silu(h1) * grouped_matmul(x_RD, self.w3_EDF.to_local().to(x_RD.dtype), counts, None, impl)  # type: ignore[attr-defined]
        else:
            h = F.gelu(h1)
        if self.training and self.expert_dropout > 0:
            h = F.dropout(h, self.expert_dropout, training=True)
        return grouped_matmul(h, w2, counts, None, impl)

    def forward(self, x_ND: Tensor, counts: list[int], impl: str = "auto") -> Tensor:
        e, ep, local = self.num_experts, self.ep_size, self.local_experts
        if len(counts) != e or sum(counts) != x_ND.shape[0]:
            raise ValueError(f"counts must have {e} entries summing to {x_ND.shape[0]}, got {counts}")
        group = self.group
        device = x_ND.device
        counts_E = torch.tensor(counts, dtype=torch.int64, device=device)
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=group)  # [src rank, local expert] flattened
        recv_SL = recv_counts.view(ep, local)
        send_splits = counts_E.view(ep, local).sum(1).tolist()
        recv_splits = recv_SL.sum(1).tolist()
        x_RD = all_to_all(x_ND, recv_splits, send_splits, group)
        # rows from each source arrive sorted by local expert; regroup all of them by local expert
        local_id_R = torch.repeat_interleave(
            torch.arange(local, device=device).repeat(ep), recv_SL.reshape(-1)
        )
        order_R = torch.argsort(local_id_R, stable=True)
        y_sorted = self._local_ffn(x_RD.index_select(0, order_R), recv_SL.sum(0).tolist())
        y_RD = torch.empty_like(y_sorted).index_copy(0, order_R, y_sorted) if y_sorted.shape[0] else y_sorted
        return all_to_all(y_RD, send_splits, recv_splits, group)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, expert_parallel={self.ep_size}, local_experts={self.local_experts}"


def is_expert_param(name: str, param: Tensor) -> bool:
    """True for the stacked expert weights handled by expert parallelism (DTensors over the ep mesh)."""
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor) and ".experts." in f".{name}"


def apply_expert_parallel(model: nn.Module, ctx: Any) -> nn.Module:
    """Replace every MoE layer's experts by an :class:`ExpertParallelExperts` over ``ctx.ep_mesh``.

    Works for ``ep_size == 1`` too (each rank holds all experts as a DTensor over a one-rank mesh), which
    keeps one code path for the checkpoint format. The layers are switched to the dropless path.
    """
    for layer in model.moe_layers():  # type: ignore[operator]
        if getattr(layer.router, "top_k", None) is None:
            raise ValueError("expert parallelism needs a token-choice router")
        if type(layer.router).__name__ == "ExpertChoiceRouter":
            raise ValueError(
                "expert parallelism does not support router_type='expert_choice' (choices depend on all ranks' tokens)"
            )
        layer.experts = ExpertParallelExperts(layer.experts, ctx.ep_mesh)
        if layer.impl == "capacity":
            layer.impl = "loop"
    return model
