"""Communication share of a distributed training step (all-to-all and gradient reduction).

Runs the `small` preset under ``torchrun`` at 2 and 4 processes for a few configurations, profiles the
measured steps with ``torch.profiler`` and reports, per step on rank 0: wall time, time inside all-to-all
(expert parallel token exchange, forward and backward) and time inside gradient reduction (all-reduce /
reduce-scatter / all-gather of DDP, FSDP2 and the expert-gradient sync), as shares of the step. Scaling on one
2-core machine is not meaningful; the communication share is.

    python benchmarks/distributed.py            # all configurations, appends to benchmarks/RESULTS.md
    python benchmarks/distributed.py --quick    # 2 processes only, fewer steps
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moe_lab.bench import appending_enabled

# gloo records one event per collective as it runs ("gloo:all_to_all", "gloo:all_reduce", ...); NCCL ones
# are named "nccl:..." — their inclusive CPU time is the time spent communicating (and waiting for peers).
A2A_KEYS = ("all_to_all", "alltoall")
REDUCE_KEYS = ("all_reduce", "allreduce", "reduce_scatter", "all_gather", "allgather")
BACKENDS = ("gloo:", "nccl:")


def worker(args: argparse.Namespace) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from moe_lab.models import MoEModel, get_preset
    from moe_lab.parallel import (
        ParallelConfig,
        apply_data_parallel,
        apply_expert_parallel,
        clip_grad_norm,
        init_distributed,
        install_global_router_losses,
        shutdown,
        sync_expert_gradients,
    )

    torch.set_num_threads(1)
    cfg = get_preset("small")
    ctx = init_distributed(
        ParallelConfig(data_parallel=args.dp_mode, expert_parallel=args.ep), num_experts=cfg.num_experts
    )
    torch.manual_seed(0)
    model = MoEModel(cfg, impl="loop")
    model = apply_expert_parallel(model, ctx)
    install_global_router_losses(model, ctx)
    model = apply_data_parallel(model, ctx, args.dp_mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    per_rank = args.batch // ctx.world_size
    gen = torch.Generator().manual_seed(ctx.rank)

    def step() -> None:
        ids = torch.randint(0, cfg.vocab_size, (per_rank, args.seq_len), generator=gen)
        out = model(ids, labels=ids)
        out.loss.backward()
        sync_expert_gradients(model, ctx)
        clip_grad_norm(model, 1.0, ctx)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.distributed.barrier()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.distributed.barrier()
        wall = (time.perf_counter() - t0) / args.steps
    a2a = red = 0.0
    for ev in prof.key_averages():
        name = ev.key.lower()
        if not name.startswith(BACKENDS):
            continue
        us = ev.cpu_time_total / args.steps / 1e6
        if any(k in name for k in A2A_KEYS):
            a2a += us
        elif any(k in name for k in REDUCE_KEYS):
            red += us
    if ctx.is_main:
        Path(args.out).write_text(json.dumps({"step_s": wall, "a2a_s": a2a, "reduce_s": red}))
    shutdown(ctx, exit_code=0)


def run_config(nproc: int, mode: str, ep: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            __file__,
            "--worker",
            "--out",
            str(out),
            "--dp-mode",
            mode,
            "--ep",
            str(ep),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--batch",
            str(args.batch),
            "--seq-len",
            str(args.seq_len),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"worker failed ({nproc} procs, {mode}, ep={ep}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    p.add_argument("--dp-mode", default="ddp")
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.steps, args.warmup = 2, 1
    configs = [(2, "ddp", 1), (2, "ddp", 2), (2, "fsdp", 2)]
    if not args.quick:
        configs += [(4, "ddp", 2), (4, "fsdp", 2), (4, "fsdp", 4)]
    rows = []
    records = []
    for nproc, mode, ep in configs:
        r = run_config(nproc, mode, ep, args)
        rows.append(
            f"| {nproc} | {mode} | {ep} | {r['step_s'] * 1000:.0f} | {r['a2a_s'] * 1000:.0f} "
            f"({100 * r['a2a_s'] / r['step_s']:.1f}%) | {r['reduce_s'] * 1000:.0f} ({100 * r['reduce_s'] / r['step_s']:.1f}%) |"
        )
        records.append(
            {
                "name": f"distributed/{nproc}p-{mode}-ep{ep}/comm_share",
                "ratio": (r["a2a_s"] + r["reduce_s"]) / r["step_s"],
                "higher_is_better": False,
            }
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            "| procs | data parallel | ep | step ms | all-to-all ms (share) | grad reduction ms (share) |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    cmd = "python benchmarks/distributed.py" + (" --quick" if args.quick else "")
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=2))
    if not args.no_record and appending_enabled():
        results = Path(__file__).with_name("RESULTS.md")
        if not results.exists():
            results.write_text("# Benchmark results\n")
        with results.open("a", encoding="utf-8") as fh:
            fh.write(
                f"\n## Distributed step: communication share ({dt.date.today()})\n\n"
                f"Command: `{cmd}`. `small` preset, global batch {args.batch} x {args.seq_len} tokens, "
                f"{args.steps} profiled steps after {args.warmup} warm-up, gloo on CPU, OMP_NUM_THREADS=1, "
                "one 2-core machine (shared with other work: absolute times are noisy, shares are the point). "
                "Times are CPU time inside the collectives on rank 0 per step (torch.profiler).\n\n"
                f"{table}\n"
            )


if __name__ == "__main__":
    main()
