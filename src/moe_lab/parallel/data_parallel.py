"""Data parallelism (DDP or FSDP2), gradient sync of sharded experts, global norms and global router losses.

Every rank trains on its own slice of the global batch. Non-expert parameters are averaged over all ranks by
DDP or FSDP2 (``fully_shard``); the expert DTensors (see :mod:`moe_lab.parallel.expert_parallel`) are left out
of both and their gradients are summed over the data-parallel group by :func:`sync_expert_gradients`. Each
local expert gradient already sums the contributions of every rank of its ``ep`` group (the all-to-all's
backward brings them), so the sum over ``dp`` divided by the world size is the exact average.

Example (inside a job):
    >>> # model = apply_data_parallel(apply_expert_parallel(model, ctx), ctx, "fsdp")
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_lab.parallel.expert_parallel import all_reduce_sum, is_expert_param

__all__ = [
    "all_reduce_mean",
    "apply_data_parallel",
    "clip_grad_norm",
    "install_global_router_losses",
    "sync_expert_gradients",
    "unwrap",
]


def unwrap(model: nn.Module) -> Any:
    """The model inside a DDP wrapper (FSDP2 does not wrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _world_mesh(ctx: Any) -> Any:
    try:
        return ctx.mesh._flatten("world")
    except Exception:  # pragma: no cover - older torch
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(ctx.device.type, (ctx.world_size,), mesh_dim_names=("world",))


def apply_data_parallel(model: Any, ctx: Any, mode: str = "ddp") -> Any:
    """Wrap ``model`` for data parallelism over all ranks; expert DTensors are excluded (synced by hand)."""
    if not ctx.distributed:
        return model
    experts = {p for n, p in model.named_parameters() if is_expert_param(n, p)}
    if mode == "ddp":
        ignore = [n for n, p in model.named_parameters() if p in experts]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers=False is what we mean here
            return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        mesh = _world_mesh(ctx)
        units: list[nn.Module] = list(model.layers)  # type: ignore[attr-defined]
        for unit in [*units, model]:
            fully_shard(unit, mesh=mesh, ignored_params=experts)
            if ctx.device.type != "cuda":
                # gloo has no AVG reduction: reduce with SUM and divide by the world size ourselves
                unit.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]
                unit.set_gradient_divide_factor(float(ctx.world_size))  # type: ignore[operator]
        return model
    raise ValueError(f"parallel.data_parallel must be 'ddp' or 'fsdp', got {mode!r}")


def sync_expert_gradients(model: nn.Module, ctx: Any) -> None:
    """Sum expert gradients over the data-parallel group and divide by the world size (call after backward)."""
    if not ctx.distributed:
        return
    grads = [
        p.grad.to_local()
        for n, p in unwrap(model).named_parameters()
        if p.grad is not None and is_expert_param(n, p)
    ]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if ctx.dp_size > 1:
        dist.all_reduce(flat, group=ctx.dp_group)
    flat.div_(ctx.world_size)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def _sq_norm_by_group(params: list[nn.Parameter]) -> list[tuple[Tensor, Any]]:
    from torch.distributed.tensor import DTensor

    out: list[tuple[Tensor, Any]] = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            sharded = any(pl.is_shard() for pl in g.placements)
            out.append((g.to_local().float().pow(2).sum(), g.device_mesh.get_group() if sharded else None))
        else:
            out.append((g.float().pow(2).sum(), None))
    return out


def clip_grad_norm(model: nn.Module, max_norm: float | None, ctx: Any) -> float:
    """Global gradient norm over all ranks (sharded and replicated parameters alike); clips when ``max_norm``.

    Returns the norm before clipping.
    """
    params = [p for p in unwrap(model).parameters() if p.grad is not None]
    parts = _sq_norm_by_group(params)
    total = torch.zeros((), dtype=torch.float32, device=ctx.device)
    by_group: dict[Any, Tensor] = {}
    for sq, group in parts:
        if group is None:
            total = total + sq.to(total.device)
        else:
            by_group[group] = by_group.get(group, torch.zeros_like(total)) + sq.to(total.device)
    for group, sq in by_group.items():
        dist.all_reduce(sq, group=group)
        total = total + sq
    norm = math.sqrt(float(total))
    if max_norm is not None and max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            g = p.grad
            assert g is not None
            (g.to_local() if hasattr(g, "to_local") else g).mul_(scale)
    return norm


def all_reduce_mean(value: float | Tensor, ctx: Any) -> float:
    """The mean of a scalar over all ranks (the value itself in one process)."""
    t = torch.as_tensor(
        float(value), dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu"
    )
    if ctx.distributed:
        dist.all_reduce(t)
        t /= ctx.world_size
    return float(t)


def _global_load_balancing_loss(decision: Any, group: Any) -> Tensor:
    """Switch/GShard loss with ``f`` and ``P`` averaged over every rank's tokens (differentiable in P)."""
    e = decision.num_experts
    valid = (
        torch.ones(decision.num_tokens, dtype=torch.bool, device=decision.router_logits.device)
        if decision.token_mask is None
        else decision.token_mask.to(torch.bool)
    )
    probs = decision.router_probs.float()
    probs = probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    p_sum_E = (probs * valid[:, None]).sum(0)
    chosen = (decision.slot_mask | decision.dropped) & valid[:, None]
    counts = torch.bincount(decision.expert_indices[chosen], minlength=e).float()
    stats = torch.cat([counts, valid.sum().float().reshape(1)]).detach()
    dist.all_reduce(stats, group=group)
    p_global = all_reduce_sum(p_sum_E, group) / stats[-1].clamp_min(1.0)
    f_global = stats[:-1] / stats[:-1].sum().clamp_min(1.0)
    return e * torch.sum(f_global * p_global)


def install_global_router_losses(model: nn.Module, ctx: Any) -> None:
    """Make the model's load-balancing loss use global (all-rank) counts and probabilities.

    With it, ``mean over ranks`` of the per-rank loss and its gradient equal the single-process values on
    the global batch. The z-loss is a per-token mean and needs nothing. Replaces the bound method
    ``_router_losses`` of this model instance only.
    """
    if not ctx.distributed:
        return
    inner = unwrap(model)
    from moe_lab.nn.losses import router_z_loss

    def _router_losses(routing: list[Any], like: Tensor) -> tuple[Tensor, Tensor]:
        cfg = inner.config  # type: ignore[attr-defined]
        zero = like.new_zeros((), dtype=torch.float32)
        aux, z = zero, zero
        if cfg.aux_loss_coef > 0 and routing:
            aux = cfg.aux_loss_coef * sum((_global_load_balancing_loss(d, None) for d in routing), zero)
        if cfg.z_loss_coef > 0 and routing:
            z = cfg.z_loss_coef * sum((router_z_loss(d) for d in routing), zero)
        return aux, z

    inner._router_losses = _router_losses
