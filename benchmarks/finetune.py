"""LoRA fine-tuning throughput and peak memory: moe-lab vs transformers + peft on the same model and data.

A small Mixtral-format model is made with ``transformers`` (random weights), saved, and loaded by both
sides: moe-lab through :func:`moe_lab.interop.load_pretrained` + :func:`moe_lab.finetune.apply_lora`, the peer
through ``AutoModelForCausalLM.from_pretrained`` + ``peft.get_peft_model`` (``target_modules`` for attention,
``target_parameters`` for the stacked experts). Both adapt q/k/v/o and the expert gate/up/down weights with
rank r (dropout 0, as peft requires for expert parameters), train with AdamW on the same batches, and compute
the LM loss only (moe-lab's aux/z losses off; ``output_router_logits=False`` on the peer). peft puts one
adapter on Mixtral's fused ``gate_up_proj`` (A shared by gate and up), so moe-lab runs with
``fused_gate_up=True``: the same adapters, the same trainable parameter count (checked).

Before timing, the two are checked to give the same loss at step 0. Timing alternates (A B A B ...) in one
process, with glibc's default allocator settings; tokens/s is the median over rounds. Peak memory on CPU is
measured for each contender alone in a fresh child process: the rise of the process's peak RSS (VmHWM, reset
through ``/proc/self/clear_refs``) over one step after a warm-up step, with glibc's mmap threshold pinned so
freed tensors go back to the OS (``--pin-mmap`` pins it for the timing too, which makes every large allocation
page-fault afresh and slows both sides). On CUDA, ``torch.cuda.max_memory_allocated`` is used.

Run:
    python benchmarks/finetune.py [--quick] [--device cpu|cuda] [--threads N] [--rounds R] [--steps S]
        [--pin-mmap] [--no-append]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moe_lab.bench import appending_enabled, record, write_records
from moe_lab.train.optim import adamw

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC = _libc()


def pin_mmap_threshold() -> None:
    """Serve every block over 64 KiB by mmap, so freed tensors go back to the OS (glibc; no-op elsewhere).

    Needed to see a step's peak in the process RSS; it also makes every large allocation page-fault afresh,
    which slows allocation-heavy code, so the timing runs with glibc's default (dynamic) threshold unless
    ``--pin-mmap`` asks otherwise.
    """
    if LIBC is not None:
        LIBC.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mb(step: Callable[[], object], device: torch.device) -> float:
    """Peak memory added by one call of ``step`` (MB)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if LIBC is not None:
        LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    step()
    return (_status_kb("VmHWM") - base) / 1024


def save_model(args: argparse.Namespace, folder: Path) -> None:
    """A random Mixtral-format checkpoint of the benchmark's shape, written to ``folder``."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2,
        num_local_experts=args.experts,
        num_experts_per_tok=2,
        max_position_embeddings=max(512, args.seq),
    )
    transformers.MixtralForCausalLM(cfg).save_pretrained(folder)


def build(args: argparse.Namespace, folder: Path, device: torch.device, kind: str) -> torch.nn.Module:
    """One contender (``"moe-lab"`` or ``"peer"``) loaded from ``folder`` with its LoRA adapters."""
    if kind == "moe-lab":
        from moe_lab.finetune import LoRAConfig, apply_lora
        from moe_lab.interop import load_pretrained

        ours = load_pretrained(folder, aux_loss_coef=0.0, z_loss_coef=0.0).to(device)
        # fused_gate_up: one adapter on gate and up together, like peft's on the fused gate_up_proj
        cfg = LoRAConfig(
            rank=args.rank, alpha=2 * args.rank, target_modules=["attention", "experts"], fused_gate_up=True
        )
        apply_lora(ours, cfg)
        return ours
    import transformers
    from peft import LoraConfig, get_peft_model

    peer = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)  # type: ignore[arg-type]
    return get_peft_model(  # type: ignore[no-any-return]
        peer,
        LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
    )


def make_step(
    model: torch.nn.Module, batches: list[torch.Tensor], kind: str, precision: str = "fp32"
) -> tuple[Callable[[], float], int]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(
        [{"params": params}], lr=1e-4
    )  # what the fine-tuner builds (fused where it applies), both sides
    model.train()
    it = {"i": 0}

    def step() -> float:
        ids = batches[it["i"] % len(batches)]
        it["i"] += 1
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(ids, labels=ids) if kind == "moe-lab" else model(input_ids=ids, labels=ids)
        loss = out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, sum(p.numel() for p in params)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller model, fewer rounds (smoke run)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=2, help="steps per contender per round")
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: both sides under bfloat16 autocast",
    )
    ap.add_argument("--pin-mmap", action="store_true", help="time with glibc's mmap threshold pinned too")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--out", help="write compare.py records (JSON) here")
    ap.add_argument("--memory-child", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    shape = dict(vocab=4096, hidden=256, ffn=512, layers=4, heads=8, experts=8, batch=8, seq=256, rank=8)
    if args.quick:
        shape.update(vocab=512, hidden=64, ffn=128, layers=2, heads=4, experts=4, batch=4, seq=64, rank=4)
        args.rounds = min(args.rounds, 3)
    for k, v in shape.items():
        setattr(args, k, v)
    device = torch.device(args.device)
    torch.manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), device=device) for _ in range(4)]
    if args.memory_child:
        kind, folder = args.memory_child
        pin_mmap_threshold()
        fn, _ = make_step(build(args, Path(folder), device, kind), batches, kind, args.precision)
        fn()  # warm-up
        print(json.dumps({"peak_mb": peak_memory_mb(fn, device)}))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mixtral"
        save_model(args, folder)
        ours, peer = build(args, folder, device, "moe-lab"), build(args, folder, device, "peer")
        result = run(args, batches, device, ours, peer, folder)
    return result


def child_memory_mb(kind: str, folder: Path) -> float:
    """Peak memory of one step of ``kind``, measured alone in a fresh process (CPU)."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--no-append", "--memory-child", kind, str(folder)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_mb"])


def run(
    args: argparse.Namespace,
    batches: list[torch.Tensor],
    device: torch.device,
    ours: torch.nn.Module,
    peer: torch.nn.Module,
    folder: Path,
) -> int:
    with torch.no_grad():
        a = float(ours(batches[0], labels=batches[0]).loss)
        b = float(peer(input_ids=batches[0], labels=batches[0]).loss)
    if abs(a - b) > 1e-4 * abs(b):
        print(f"loss mismatch before training: moe-lab {a:.6f} vs peer {b:.6f}", file=sys.stderr)
        return 1
    steps = {}
    counts = {}
    steps["moe-lab"], counts["moe-lab"] = make_step(ours, batches, "moe-lab", args.precision)
    steps["transformers+peft"], counts["transformers+peft"] = make_step(peer, batches, "peer", args.precision)
    if counts["moe-lab"] != counts["transformers+peft"]:
        print(f"trainable parameters differ: {counts}", file=sys.stderr)
        return 1
    if args.pin_mmap:
        pin_mmap_threshold()
    for fn in steps.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / args.steps)
            cpu[name].append((time.process_time() - c0) / args.steps)
    if device.type == "cuda":
        memory = {name: peak_memory_mb(fn, device) for name, fn in steps.items()}
    else:  # each alone in a fresh process with the mmap threshold pinned (see the module docstring)
        memory = {name: child_memory_mb(k, folder) for name, k in zip(steps, ("moe-lab", "peer"))}
    tokens = args.batch * args.seq
    rows = []
    for name in steps:
        med = statistics.median(times[name])
        cpu_s = statistics.median(cpu[name])
        rows.append((name, tokens / med, tokens / min(times[name]), cpu_s, memory[name], counts[name]))
    ratio = rows[0][1] / rows[1][1]
    cpu_ratio = rows[1][3] / rows[0][3]
    mem_ratio = rows[0][4] / rows[1][4] if rows[1][4] > 0 else float("nan")
    precision_s = "bf16 autocast (fp32 weights), both sides" if args.precision == "bf16" else "fp32"
    shape_s = (
        f"Mixtral-format, D={args.hidden}, F={args.ffn}, L={args.layers}, E={args.experts}, top-2, "
        f"V={args.vocab}, batch {args.batch}x{args.seq}, LoRA r={args.rank} on q/k/v/o + experts, {precision_s}, "
        f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    lines = [
        "| contender | tokens/s (median) | tokens/s (best) | CPU s/step (median, all threads) "
        "| peak memory added per step (MB) | trainable params |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {t:,.0f} | {b:,.0f} | {c:.2f} | {m:,.1f} | {p:,} |" for n, t, b, c, m, p in rows]
    lines.append(
        f"\nmoe-lab / peer: {ratio:.2f}x tokens/s (wall), {cpu_ratio:.2f}x (CPU time), {mem_ratio:.2f}x peak memory"
    )
    table = "\n".join(lines)
    if args.out:
        write_records(
            args.out,
            [
                record("finetune/tokens_per_s_vs_peft", ratio, higher_is_better=True),
                record("finetune/tokens_per_cpu_s_vs_peft", cpu_ratio, higher_is_better=True),
                record("finetune/peak_memory_vs_peft", mem_ratio, higher_is_better=False),
            ],
        )
    print(shape_s)
    print(table)
    if not args.no_append and appending_enabled():
        cmd = "python benchmarks/finetune.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if not RESULTS.exists():
            RESULTS.write_text("# Benchmark results\n", encoding="utf-8")
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with RESULTS.open("a", encoding="utf-8") as fh:
            fh.write(
                f"\n## LoRA fine-tuning{' (bf16 autocast, both sides)' if args.precision == 'bf16' else ''} "
                f"vs transformers + peft ({date})\n\n`{cmd.strip()}` on {platform.machine()} "
                f"({os.cpu_count()} CPUs, shared machine)\n\n{shape_s}\n\n{table}\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
