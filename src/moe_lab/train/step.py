"""One optimizer step and one evaluation pass of :class:`moe_lab.train.MoETrainer`.

Kept apart from the trainer's bookkeeping. A batch's ``task_ids`` (when the data has them) go to the
model's forward as ``task_ids``. In a ``torchrun`` job each rank trains on its slice of the
global batch, then expert gradients are synced, the gradient norm is the global one, and losses and
routing counts are all-reduced, so every rank logs (and decides) the same numbers.

Example:
    >>> # metrics, routing = train_step(trainer)
    >>> # result = evaluate_lm_loss(trainer, dataset, max_batches=20, batch_size=16)
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from moe_lab.parallel import clip_grad_norm, sync_expert_gradients
from moe_lab.train import distributed as mdist
from moe_lab.train.batches import eval_batches
from moe_lab.train.optim import set_lr
from moe_lab.train.results import EvalResult
from moe_lab.train.routing_stats import drop_rate, expert_load, merge_decisions

__all__ = ["evaluate_lm_loss", "extra_inputs", "train_step"]


def extra_inputs(tr: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model keyword inputs beyond ids / mask / labels, only those the batch has: ``task_ids`` ``[B]`` for
    task-adaptive routing. A model without tasks never sees the keyword."""
    task_ids = batch.get("task_ids")
    return {} if task_ids is None else {"task_ids": task_ids.to(tr.device, non_blocking=True)}


def _clip(tr: Any) -> float:
    cfg = tr.config
    if tr.ctx.distributed:
        sync_expert_gradients(tr.model, tr.ctx)
        return clip_grad_norm(tr.model, cfg.grad_clip, tr.ctx)
    params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    return float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf")))


@torch.enable_grad()  # even when the caller turned gradients off globally
def train_step(tr: Any) -> tuple[dict[str, Any], list[Any]]:
    """``grad_accum_steps`` micro-batches, clip, AdamW step, router biases; returns (metrics, routing).

    ``routing`` holds this rank's detached decisions; the metrics' ``expert_load``/``drop_rate`` and the
    aux-free bias update use every rank's counts (so the biases stay identical on all ranks).
    """
    cfg = tr.config
    assert tr.optimizer is not None and tr._iter is not None
    tr._fwd.train()
    t0 = time.perf_counter()
    lr = set_lr(tr.optimizer, tr.state.step, cfg, tr.total_steps)
    ga = cfg.grad_accum_steps
    sums = torch.zeros(4, dtype=torch.float64)
    tokens = 0
    decisions = []
    dist_run = tr.ctx.distributed
    for _ in range(ga):
        batch = next(tr._iter)  # the global batch: its tokens count every rank's
        mask_all = batch.get("attention_mask")
        tokens += int(mask_all.sum()) if mask_all is not None else batch["input_ids"].numel()
        part = mdist.rank_slice(batch, tr.ctx) if dist_run else batch  # task_ids are sliced with the rows
        ids, mask, labels = tr._unpack(part)
        with tr._autocast():
            out = tr._fwd(ids, attention_mask=mask, labels=labels, **extra_inputs(tr, part))
        (out.loss / ga).backward()
        parts = [out.loss, out.lm_loss, out.aux_loss, out.z_loss]
        sums += torch.stack([p.detach().float() for p in parts]).cpu().double()
        decisions.append([d.detach() for d in out.routing])
    grad_norm = _clip(tr)
    tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)
    if dist_run:
        sums = mdist.mean_over_ranks(sums, tr.ctx)
    routing = merge_decisions(decisions)
    counted, drops = mdist.global_routing(routing, tr.ctx) if dist_run else (routing, drop_rate(routing))
    if cfg.load_balancing == "aux_free_bias":
        tr.model.update_router_biases(counted)
    dt = time.perf_counter() - t0
    loss, lm_loss, aux_loss, z_loss = (float(v) / ga for v in sums)
    if not math.isfinite(loss):
        raise ValueError(
            f"training diverged: the loss is {loss} at step {tr.state.step + 1}; lower "
            "train.learning_rate, raise train.warmup_steps or set train.grad_clip"
        )
    st = tr.state
    st.step += 1
    st.tokens_seen += tokens
    st.train_time_s += dt
    st.epoch = tr._iter.epoch
    st.last_loss = loss
    tr._last_lm_loss = lm_loss
    metrics = {
        "step": st.step,
        "loss": loss,
        "lm_loss": lm_loss,
        "aux_loss": aux_loss,
        "z_loss": z_loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens / dt if dt > 0 else 0.0,
        "tokens": st.tokens_seen,
        "epoch": st.epoch,
        "step_time_s": dt,
        "step_tokens": tokens,
        "expert_load": expert_load(counted),
        "drop_rate": drops,
    }
    return metrics, routing


@torch.no_grad()
def evaluate_lm_loss(tr: Any, ds: Any, max_batches: int | None, batch_size: int) -> EvalResult:
    """Mean next-token loss over ``ds`` (every rank gets the same result in a ``torchrun`` job)."""
    was_training = tr.model.training
    tr._fwd.eval()
    total, count, weight = 0.0, 0.0, 1.0
    try:
        for batch in eval_batches(ds, batch_size, max_batches):
            if tr.ctx.distributed:
                batch, weight = mdist.eval_part(batch, tr.ctx)
            ids, mask, labels = tr._unpack(batch)
            with tr._autocast():
                out = tr._fwd(ids, attention_mask=mask, labels=labels, **extra_inputs(tr, batch))
            targets = labels[:, 1:] != -100
            if mask is not None:
                targets &= mask[:, 1:].bool()
            n = int(targets.sum()) * weight
            total += float(out.lm_loss) * n
            count += n
    finally:
        tr._fwd.train(was_training)
    if tr.ctx.distributed:
        total, count = mdist.sum_over_ranks(torch.tensor([total, count]), tr.ctx).tolist()
    loss = total / count if count else float("nan")
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), tokens=int(count))
