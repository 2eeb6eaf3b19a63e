"""What :class:`moe_lab.train.MoETrainer` does differently on several processes (``torchrun``).

The trainer calls these helpers only when the world size is above 1; a single-process run never touches
``torch.distributed``. The recipe (see ``docs/guides/distributed.md``):

* every rank builds the same model (same seed), then :func:`parallelize` applies expert parallelism
  (``parallel.expert_parallel > 1``), the global load-balancing loss and DDP / FSDP2;
* every rank draws the same global batch and trains on its slice (:func:`rank_slice`), so a run equals
  one process on the global batch;
* losses, routing counts and stop decisions are all-reduced, so every rank logs and decides the same;
* checkpoints are DCP folders (:func:`save_dcp_checkpoint`) following the atomic protocol of
  :mod:`moe_lab.train.checkpoint`; :func:`load_dcp_checkpoint` reshards them to any world size.

Example (inside ``torchrun --nproc-per-node 2``):
    >>> # ctx = job_context(ParallelConfig(expert_parallel=2), num_experts=4)
    >>> # wrapped = parallelize(model, ctx, "ddp")       # then build the optimizer over unwrap(wrapped)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_lab.parallel import (
    ParallelConfig,
    ParallelContext,
    apply_data_parallel,
    apply_expert_parallel,
    init_distributed,
    install_global_router_losses,
    load_distributed,
    save_distributed,
    shutdown,
    single_process_context,
)
from moe_lab.train.checkpoint import (
    LoadedCheckpoint,
    check_model_config,
    finalize_checkpoint,
    restore_rng_state,
)
from moe_lab.train.setup import resolve_device

__all__ = [
    "any_rank",
    "broadcast_text",
    "check_batch_size",
    "eval_part",
    "finish_process",
    "global_routing",
    "is_main_process",
    "job_context",
    "load_dcp_checkpoint",
    "load_named_optimizer_state",
    "mean_over_ranks",
    "parallelize",
    "preload_single_file",
    "rank_slice",
    "save_dcp_checkpoint",
    "sum_over_ranks",
    "world_size_from_env",
]

_JOB: ParallelContext | None = None  # the context of this process's job, for finish_process()


def world_size_from_env() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 outside a job)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def is_main_process() -> bool:
    """True outside a job and on rank 0."""
    return not dist.is_initialized() or dist.get_rank() == 0


def job_context(
    cfg: ParallelConfig, *, num_experts: int | None = None, device: str = "auto"
) -> ParallelContext:
    """The job's :class:`ParallelContext`: a single-process one when ``WORLD_SIZE`` is 1 (``parallel.*`` is
    then ignored), else the process group and ``(dp, ep)`` mesh, made once per process."""
    global _JOB
    if world_size_from_env() <= 1:
        return single_process_context(resolve_device(device))
    if _JOB is not None and dist.is_initialized():
        if _JOB.ep_size != cfg.expert_parallel:
            raise ValueError(
                f"parallel.expert_parallel={cfg.expert_parallel} differs from this job's ({_JOB.ep_size})"
            )
        return _JOB
    _JOB = init_distributed(cfg, num_experts=num_experts, device=device)
    return _JOB


def finish_process(exit_code: int) -> None:
    """End a ``torchrun`` worker: on success a barrier, destroy the group and exit (:func:`shutdown`);
    on failure exit at once (the other ranks may be blocked in a collective; torchrun stops them)."""
    if not dist.is_initialized():
        sys.exit(exit_code)
    if exit_code == 0 and _JOB is not None:
        shutdown(_JOB, exit_code=0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def check_batch_size(batch_size: int, world_size: int) -> None:
    """The global batch must split evenly over the ranks."""
    if batch_size % world_size:
        raise ValueError(
            f"train.batch_size={batch_size} (the global batch) is not divisible by the world size {world_size}"
        )


def parallelize(model: nn.Module, ctx: ParallelContext, mode: str) -> nn.Module:
    """Expert parallelism (when ``ctx.ep_size > 1``), global router losses, then DDP / FSDP2.

    Call after ``model.to(device)`` and before building the optimizer (over :func:`moe_lab.parallel.unwrap`
    of the result, whose parameter names are the plain model's). Returns the module to call forward on.
    """
    if ctx.ep_size > 1:
        model = apply_expert_parallel(model, ctx)
    install_global_router_losses(model, ctx)
    return apply_data_parallel(model, ctx, mode)  # type: ignore[no-any-return]


def rank_slice(batch: dict[str, Tensor], ctx: ParallelContext) -> dict[str, Tensor]:
    """This rank's rows ``[rank*B/W : (rank+1)*B/W]`` of a global batch."""
    n = next(iter(batch.values())).shape[0]
    per = n // ctx.world_size
    lo = ctx.rank * per
    return {k: v[lo : lo + per] for k, v in batch.items()}


def _reduce(t: Tensor, ctx: ParallelContext, op: Any = None) -> Tensor:
    buf = t.to(ctx.device) if ctx.device.type == "cuda" else t.cpu()
    dist.all_reduce(buf, op=op or dist.ReduceOp.SUM)
    return buf.cpu()


def sum_over_ranks(values: Tensor, ctx: ParallelContext) -> Tensor:
    """Element-wise sum of a small float64 tensor over all ranks (identical result on every rank)."""
    return _reduce(values.detach().double(), ctx)


def mean_over_ranks(values: Tensor, ctx: ParallelContext) -> Tensor:
    """Element-wise mean of a small float64 tensor over all ranks."""
    return sum_over_ranks(values, ctx) / ctx.world_size


def eval_part(batch: dict[str, Tensor], ctx: ParallelContext) -> tuple[dict[str, Tensor], float]:
    """What this rank evaluates of an eval batch, and the weight of its result in the all-rank sum.

    Every rank must make the same forward calls (the all-to-all and FSDP2 gathers are collective): a batch
    that splits evenly is sliced; a ragged last batch is run whole on every rank and counted on rank 0.
    """
    n = next(iter(batch.values())).shape[0]
    if n % ctx.world_size == 0:
        return rank_slice(batch, ctx), 1.0
    return batch, 1.0 if ctx.is_main else 0.0


def any_rank(flag: bool, ctx: ParallelContext) -> bool:
    """True on every rank when it is True on any rank."""
    return bool(_reduce(torch.tensor([int(flag)], dtype=torch.int64), ctx, dist.ReduceOp.MAX)[0])


def broadcast_text(text: str, ctx: ParallelContext, max_bytes: int = 4096) -> str:
    """Rank 0's ``text`` on every rank (e.g. a time-stamped run name)."""
    raw = text.encode("utf-8")[:max_bytes] if ctx.is_main else b""
    buf = torch.zeros(max_bytes + 1, dtype=torch.int64)
    buf[0] = len(raw)
    buf[1 : 1 + len(raw)] = torch.tensor(list(raw), dtype=torch.int64)
    buf = buf.to(ctx.device) if ctx.device.type == "cuda" else buf
    dist.broadcast(buf, src=0)
    n = int(buf[0])
    return bytes(buf[1 : 1 + n].cpu().tolist()).decode("utf-8")


def global_routing(routing: list[Any], ctx: ParallelContext) -> tuple[list[Any], float]:
    """The step's decisions with ``tokens_per_expert`` summed over all ranks, and the global drop rate.

    One all-reduce for every layer: ``[kept per expert..., dropped, chosen]``. The returned decisions keep
    this rank's tokens otherwise (indices, probabilities), so per-token analytics stay consistent.
    """
    if not routing:
        return routing, 0.0
    parts = []
    for d in routing:
        dropped = d.dropped.sum().reshape(1)
        chosen = (d.slot_mask.sum() + d.dropped.sum()).reshape(1)
        parts.append(torch.cat([d.tokens_per_expert.reshape(-1), dropped, chosen]).to(torch.int64).cpu())
    flat = _reduce(torch.cat(parts), ctx)
    out, rates, offset = [], [], 0
    for d in routing:
        e = d.tokens_per_expert.numel()
        counts = flat[offset : offset + e].to(d.tokens_per_expert.device, d.tokens_per_expert.dtype)
        dropped, chosen = int(flat[offset + e]), int(flat[offset + e + 1])
        offset += e + 2
        out.append(dataclasses.replace(d, tokens_per_expert=counts))
        rates.append(dropped / chosen if chosen > 0 else 0.0)
    return out, sum(rates) / len(rates)


# ---- checkpoints -------------------------------------------------------------------------------------
def save_dcp_checkpoint(
    checkpoints_dir: str | os.PathLike[str],
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict[str, Any],
    ctx: ParallelContext,
) -> Path:
    """Collective: every rank writes its DCP shards into a temp dir; rank 0 adds ``rng_state.pt``,
    ``trainer_state.json`` and ``COMPLETE``, then renames it to ``step-<step>`` (barriers around)."""
    d = Path(checkpoints_dir)
    tmp = d / f".tmp-step-{step}-dcp"
    if ctx.is_main:
        d.mkdir(parents=True, exist_ok=True)
    save_distributed(tmp, model, optimizer)  # atomic itself; ends with a barrier
    final = d / f"step-{step}"
    if ctx.is_main:
        try:
            finalize_checkpoint(tmp, final, step, {"format": "dcp", **trainer_state})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    dist.barrier()
    return final


def load_dcp_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    model_config: dict[str, Any] | None = None,
    restore_rng: bool = True,
) -> LoadedCheckpoint:
    """Load a DCP checkpoint into ``model`` (and ``optimizer``), resharded to this job's layout; works at
    world size 1 without a process group. Same checks and return value as
    :func:`moe_lab.train.checkpoint.load_checkpoint`."""
    p = Path(path)
    try:
        meta = json.loads((p / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {p / 'trainer_state.json'}: {err}") from None
    if model_config is not None and "model_config" in meta:
        check_model_config(meta["model_config"], model_config, where=f"checkpoint {p}")
    with warnings.catch_warnings():  # DCP warns that it loads "in a single process": that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_distributed(p, model, optimizer)
    if restore_rng and (p / "rng_state.pt").is_file():
        restore_rng_state(torch.load(p / "rng_state.pt", map_location="cpu", weights_only=True))
    return LoadedCheckpoint(path=p, step=int(meta.get("step", 0)), trainer_state=meta)


def preload_single_file(
    path: Path,
    *,
    model: nn.Module,
    cfg: Any,
    model_config: dict[str, Any] | None,
    device: torch.device,
    optimizer_factory: Any = None,
) -> tuple[LoadedCheckpoint, dict[str, Any] | None]:
    """Resume a single-process checkpoint on several processes, step 1 (before parallelising): load the
    weights (and RNG) into the plain ``model`` and return the optimizer state keyed by parameter names,
    for :func:`load_named_optimizer_state` once the model is parallelised and the optimizer built.
    ``optimizer_factory(model, cfg)`` must build the optimizer the checkpoint was saved from (default:
    :func:`moe_lab.train.optim.build_optimizer`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from moe_lab.train.checkpoint import load_checkpoint
    from moe_lab.train.optim import build_optimizer

    loaded = load_checkpoint(path, model=model, model_config=model_config, map_location=device)
    if not (path / "optimizer.pt").is_file():
        return loaded, None
    plain = (optimizer_factory or build_optimizer)(model, cfg)
    plain.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    named = get_optimizer_state_dict(model, plain, options=StateDictOptions(full_state_dict=True))
    return loaded, named


def load_named_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Step 2: load the named full optimizer state into the parallelised model's optimizer (sharded as
    its parameters are)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
