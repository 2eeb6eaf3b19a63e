"""Benchmark one MoE layer (forward + backward) on CPU against peers and the dense floor.

Contenders, all with the same weights:
  * moe_lab ``MoELayer`` (impl="auto", plus any ``--impls``),
  * Hugging Face transformers' sparse MoE block (``MixtralSparseMoeBlock`` for the Mixtral shape,
    ``OlmoeSparseMoeBlock`` for the fine-grained OLMoE shape) with ``config._experts_implementation`` set to
    ``"eager"`` and, when available, ``"grouped_mm"``,
  * DeepSpeed's ``deepspeed.moe.layer.MoE`` (dropless: ``drop_tokens=False``, ``use_rts=False``), run in a
    one-process gloo group,
  * the floor: one dense SwiGLU FFN over ``tokens * top_k`` rows (the same active FLOPs, no routing).

Outputs and gradients (input, router, expert weights) are checked against each peer first. Timing is done
in rotation (A B C A B C ...); median and min are reported, with ratios to the floor and to the best peer.
At 256 tokens and fewer the table also gives the memory traffic of the expert weights: the experts the
batch touches, the MB moved per forward + backward (each touched expert's three matrices read twice, in the
forward and for the input gradient, and their gradients written once: 3 x their bytes; the floor moves its
one FFN's) and that over the median time in GB/s.

Run:
    python benchmarks/moe_layer.py [--quick] [--dtype fp32|bf16] [--out results.json] [--no-append]
    python benchmarks/moe_layer.py --threads 1 --clock cpu    # on a machine shared with other jobs
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lab.bench import appending_enabled, record
from moe_lab.nn import MoELayer

SHAPES = {
    # name: experts, top_k, model dim, expert ffn dim, renormalise top-k
    "mixtral": {"E": 8, "k": 2, "D": 512, "F": 1024, "norm": True},
    "olmoe": {"E": 64, "k": 8, "D": 512, "F": 256, "norm": False},
}
TOKENS = (4096, 256, 32)
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass
class Contender:
    name: str
    step: Callable[[], None] | None  # one forward + backward
    note: str = ""
    is_peer: bool = False
    times_ms: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- builders
def build_ours(shape: dict, dtype: torch.dtype, impl: str = "auto") -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(shape["D"], shape["F"], shape["E"], shape["k"], norm_topk_prob=shape["norm"], impl=impl)
    return layer.to(dtype)


def build_hf(shape_name: str, ours: MoELayer) -> nn.Module:
    """The Hugging Face block with our weights copied in (HF stores [E, 2F, D] gate_up and [E, D, F] down)."""
    s = SHAPES[shape_name]
    common = {
        "hidden_size": s["D"],
        "intermediate_size": s["F"],
        "num_experts_per_tok": s["k"],
        "hidden_act": "silu",
        "num_hidden_layers": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 32,
    }
    if shape_name == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = MixtralConfig(num_local_experts=s["E"], router_jitter_noise=0.0, **common)
        block = MixtralSparseMoeBlock(config)
    else:
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

        config = OlmoeConfig(num_experts=s["E"], norm_topk_prob=s["norm"], **common)
        block = OlmoeSparseMoeBlock(config)
    config._experts_implementation = "eager"
    ex = ours.experts
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.gate.weight)
        gate_up = torch.cat([ex.w1_EDF, ex.w3_EDF], dim=2).transpose(1, 2)  # [E, 2F, D]
        block.experts.gate_up_proj.copy_(gate_up)
        block.experts.down_proj.copy_(ex.w2_EFD.transpose(1, 2))  # [E, D, F]
    return block.to(ours.experts.w1_EDF.dtype)


class _SwiGLU(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def build_deepspeed(shape: dict, ours: MoELayer) -> nn.Module:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    from deepspeed.moe.layer import MoE

    kw = {"top2_2nd_expert_sampling": False} if shape["k"] == 2 else {}
    moe = MoE(
        shape["D"],
        _SwiGLU(shape["D"], shape["F"]),
        num_experts=shape["E"],
        ep_size=1,
        k=shape["k"],
        drop_tokens=False,
        use_rts=False,
        **kw,
    )
    ex = ours.experts
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(ours.router.gate.weight)
        for e, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            expert.w1.weight.copy_(ex.w1_EDF[e].t())
            expert.w3.weight.copy_(ex.w3_EDF[e].t())
            expert.w2.weight.copy_(ex.w2_EFD[e].t())
    return moe.to(ours.experts.w1_EDF.dtype)


# ---------------------------------------------------------------------------------------- gradients check
def _grads_ours(layer: MoELayer) -> dict[str, Tensor]:
    ex = layer.experts
    return {
        "gate": layer.router.gate.weight.grad,
        "w1": ex.w1_EDF.grad,
        "w3": ex.w3_EDF.grad,
        "w2": ex.w2_EFD.grad,
    }


def _grads_hf(block: nn.Module) -> dict[str, Tensor]:
    gu = block.experts.gate_up_proj.grad.transpose(1, 2)
    f = gu.shape[2] // 2
    return {"gate": block.gate.weight.grad, "w1": gu[:, :, :f], "w3": gu[:, :, f:],
            "w2": block.experts.down_proj.grad.transpose(1, 2)}  # fmt: skip


def _grads_ds(moe: nn.Module) -> dict[str, Tensor]:
    experts = moe.deepspeed_moe.experts.deepspeed_experts

    def stack(name: str) -> Tensor:
        return torch.stack([getattr(e, name).weight.grad.t() for e in experts])

    return {
        "gate": moe.deepspeed_moe.gate.wg.weight.grad,
        "w1": stack("w1"),
        "w3": stack("w3"),
        "w2": stack("w2"),
    }


def _first(out: object) -> Tensor:
    return out[0] if isinstance(out, tuple) else out  # type: ignore[index,return-value]


def check_against(ours: MoELayer, peer: nn.Module, grads_of: Callable, x: Tensor, tol: float) -> str:
    """Max relative error of output and every gradient; 'ok' if all below tol."""
    g = torch.randn_like(x)
    results = []
    for mod in (ours, peer):
        mod.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        out = _first(mod(xi))
        out.backward(g)
        grads = _grads_ours(mod) if mod is ours else grads_of(mod)
        results.append({"out": out.detach(), "x": xi.grad, **grads})
    worst = 0.0
    for key, ref in results[0].items():
        other = results[1][key]
        err = float((other.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))
        worst = max(worst, err)
    return f"ok (max rel err {worst:.1e})" if worst < tol else f"MISMATCH (max rel err {worst:.1e})"


# ------------------------------------------------------------------------------------------------- timing
def make_step(module: nn.Module, x: Tensor, g: Tensor) -> Callable[[], None]:
    def step() -> None:
        for p in module.parameters():
            p.grad = None
        xi = x.detach().requires_grad_(True)
        _first(module(xi)).backward(g)

    return step


def make_floor(shape: dict, tokens: int, dtype: torch.dtype) -> Callable[[], None]:
    torch.manual_seed(1)
    ffn = _SwiGLU(shape["D"], shape["F"]).to(dtype)
    rows = tokens * shape["k"]
    x = torch.randn(rows, shape["D"], dtype=dtype)
    g = torch.randn(rows, shape["D"], dtype=dtype)
    return make_step(ffn, x, g)


def run_rotation(contenders: list[Contender], reps: int, warmup: int, clock: str = "wall") -> None:
    """Time each contender in turn (A B C A B C ...). ``clock="cpu"`` uses this process's CPU time, which
    is steadier than wall time on a machine shared with other jobs (use it with ``--threads 1``)."""
    now = time.perf_counter if clock == "wall" else time.process_time
    live = [c for c in contenders if c.step is not None]
    for _ in range(warmup):
        for c in live:
            c.step()  # type: ignore[misc]
    for _ in range(reps):
        for c in live:
            t0 = now()
            c.step()  # type: ignore[misc]
            c.times_ms.append((now() - t0) * 1e3)


def bench_case(shape_name: str, tokens: int, dtype: torch.dtype, args: argparse.Namespace) -> list[dict]:
    shape = SHAPES[shape_name]
    ours = build_ours(shape, dtype)
    torch.manual_seed(2)
    x = torch.randn(1, tokens, shape["D"], dtype=dtype)
    g = torch.randn(1, tokens, shape["D"], dtype=dtype)
    tol = 2e-4 if dtype == torch.float32 else 5e-2
    contenders = [Contender("moe_lab MoELayer (auto)", make_step(ours, x, g))]
    for impl in args.impls:
        contenders.append(
            Contender(f"moe_lab MoELayer ({impl})", make_step(build_ours(shape, dtype, impl), x, g))
        )
    contenders.append(
        Contender(f"floor: dense FFN over {tokens}x{shape['k']} rows", make_floor(shape, tokens, dtype))
    )
    check_x = x[:, : min(tokens, 256)]
    # Hugging Face
    try:
        hf = build_hf(shape_name, ours)
        impls = ["eager"]
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        if "grouped_mm" in ALL_EXPERTS_FUNCTIONS:
            impls.append("grouped_mm")
        for impl in impls:
            hf_i = build_hf(shape_name, ours)
            hf_i.experts.config._experts_implementation = impl
            note = check_against(ours, hf_i, _grads_hf, check_x, tol)
            contenders.append(
                Contender(f"HF {type(hf).__name__} ({impl})", make_step(hf_i, x, g), note, True)
            )
    except Exception as exc:  # report, don't crash
        contenders.append(
            Contender("HF sparse MoE block", None, f"failed: {type(exc).__name__}: {exc}", True)
        )
    # DeepSpeed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = build_deepspeed(shape, ours)
        ref = ours
        # DeepSpeed always renormalises the top-k weights: compare it with a matching layer
        if not shape["norm"]:
            ref = build_ours({**shape, "norm": True}, dtype)
            ref.load_state_dict(ours.state_dict())
        note = check_against(ref, ds, _grads_ds, check_x, tol)
        if ref is not ours:
            note += " vs norm_topk_prob=True (DeepSpeed always renormalises)"
        contenders.append(Contender("DeepSpeed MoE (dropless)", make_step(ds, x, g), note, True))
    except Exception as exc:
        contenders.append(Contender("DeepSpeed MoE", None, f"failed: {type(exc).__name__}: {exc}", True))

    reps = args.reps if args.reps else (3 if tokens >= 4096 else 15 if tokens >= 256 else 40)
    if args.quick:
        reps = max(2, reps // 3)
    run_rotation(contenders, reps, warmup=1 if tokens >= 4096 else 3, clock=args.clock)

    floor = statistics.median(next(c for c in contenders if c.name.startswith("floor")).times_ms)
    peers = [statistics.median(c.times_ms) for c in contenders if c.is_peer and c.times_ms]
    best_peer = min(peers) if peers else float("nan")
    # bytes moved per forward + backward: each touched expert's three matrices are read twice (forward, input
    # gradient) and their gradients written once; the floor is one dense FFN of the same shape
    with torch.no_grad():
        touched = int(ours.router(x.reshape(-1, shape["D"])).expert_indices.unique().numel())
    expert_bytes = 3 * shape["D"] * shape["F"] * torch.empty((), dtype=dtype).element_size()
    rows = []
    for c in contenders:
        med = statistics.median(c.times_ms) if c.times_ms else float("nan")
        moved = 3 * expert_bytes * (1 if c.name.startswith("floor") else touched)
        rows.append({
            "shape": shape_name, "tokens": tokens, "dtype": str(dtype).replace("torch.", ""),
            "contender": c.name, "median_ms": med,
            "min_ms": min(c.times_ms) if c.times_ms else float("nan"),
            "vs_floor": med / floor, "vs_best_peer": med / best_peer,
            "experts_touched": 1 if c.name.startswith("floor") else touched,
            "weight_MB_moved": moved / 1e6,
            "weight_GBps": (moved / (med / 1e3) / 1e9) if tokens <= 256 else None,
            "reps": len(c.times_ms), "note": c.note,
        })  # fmt: skip
    return rows


def to_markdown(rows: list[dict]) -> str:
    head = (
        "| shape | tokens | contender | median ms | min ms | x floor | x best peer | experts touched | "
        "weight MB moved | weights GB/s | check |"
    )
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        gbps = f"{r['weight_GBps']:.1f}" if r["weight_GBps"] else ""
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['contender']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
            f"{r['vs_floor']:.2f} | {r['vs_best_peer']:.2f} | {r['experts_touched']} | "
            f"{r['weight_MB_moved']:.1f} | {gbps} | {r['note']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--out", type=Path, help="write compare.py records (and the rows) as JSON here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: perf_counter; cpu: process CPU time (steadier on a loaded machine, with --threads 1)",
    )
    parser.add_argument("--reps", type=int, default=0, help="timed repetitions per contender (0 = by size)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument(
        "--impls", nargs="*", default=[], help="extra moe_lab impls to time (loop, capacity...)"
    )
    parser.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    rows: list[dict] = []
    for shape_name in args.shapes:
        for tokens in args.tokens:
            case = bench_case(shape_name, tokens, dtype, args)
            rows += case
            print(to_markdown(case), flush=True)
    table = to_markdown(rows)
    print("\n" + table)
    if args.out:  # compare.py reads "records"; the full rows ride along
        ours = [r for r in rows if r["contender"] == "moe_lab MoELayer (auto)"]
        records = [
            record(f"moe_layer/{r['shape']}_{r['tokens']}_{key}", r[key], higher_is_better=False)
            for r in ours
            for key in ("vs_floor", "vs_best_peer")
        ]
        args.out.write_text(json.dumps({"records": records, "rows": rows}, indent=2))
    if not args.no_append and appending_enabled():
        cmd = "python benchmarks/moe_layer.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        section = (
            f"\n## MoE layer forward+backward ({args.dtype}, {args.threads} threads, {args.clock} clock)\n\n"
            f"`{cmd}` — {stamp}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, load average at the end {load:.1f} (shared machine: other jobs ran).\n\n"
            f"{table}\n"
        )
        if not RESULTS.exists():
            RESULTS.write_text("# Benchmark results\n")
        with RESULTS.open("a") as fh:
            fh.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
