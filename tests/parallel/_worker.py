"""A small distributed training loop used by the tests (run under torchrun, or alone for the reference).

Usage: python _worker.py OUT_JSON --dp-mode ddp|fsdp --ep N --steps N [--save DIR --save-at K] [--load DIR]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from moe_lab.models import MoEModel
from moe_lab.parallel import (
    ParallelConfig,
    all_reduce_mean,
    apply_data_parallel,
    apply_expert_parallel,
    clip_grad_norm,
    export_consolidated,
    init_distributed,
    install_global_router_losses,
    load_distributed,
    save_distributed,
    shutdown,
    sync_expert_gradients,
)

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--dp-mode", default="ddp")
p.add_argument("--ep", type=int, default=1)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--first-step", type=int, default=0)
p.add_argument("--save", default=None)
p.add_argument("--save-at", type=int, default=-1)
p.add_argument("--load", default=None)
p.add_argument("--export", default=None)
p.add_argument("--die-rank", type=int, default=-1)
args = p.parse_args()

torch.set_num_threads(1)
cfg = ParallelConfig(data_parallel=args.dp_mode, expert_parallel=args.ep, timeout_s=20)
ctx = init_distributed(cfg, num_experts=8)
torch.manual_seed(0)
model = MoEModel(
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_experts=8,
    experts_per_token=2,
    ffn_hidden_size=32,
    aux_loss_coef=0.05,
    z_loss_coef=0.01,
    impl="loop",
    tie_embeddings=False,
)
if ctx.distributed:
    model = apply_expert_parallel(model, ctx)
    install_global_router_losses(model, ctx)
    model = apply_data_parallel(model, ctx, cfg.data_parallel)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, foreach=False)
if args.load:
    load_distributed(args.load, model, opt)

GLOBAL_B, S = 8, 16
per_rank = GLOBAL_B // ctx.world_size
losses = []
for step in range(args.first_step, args.first_step + args.steps):
    g = torch.Generator().manual_seed(1000 + step % 3)  # a few batches, seen again: the loss falls
    batch = torch.randint(0, 64, (GLOBAL_B, S), generator=g)
    local = batch[ctx.rank * per_rank : (ctx.rank + 1) * per_rank]
    if step == args.first_step + 3 and ctx.rank == args.die_rank:
        os._exit(17)  # simulate a crashed rank
    out = model(local, labels=local)
    out.loss.backward()
    sync_expert_gradients(model, ctx)
    clip_grad_norm(model, 1.0, ctx)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(all_reduce_mean(out.loss.detach(), ctx))
    if args.save and step == args.save_at:
        save_distributed(args.save, model, opt)
if args.export:
    export_consolidated(args.export, model)
if ctx.is_main:
    with open(args.out, "w") as fh:
        json.dump({"losses": losses, "world": ctx.world_size}, fh)
shutdown(ctx, exit_code=0)
