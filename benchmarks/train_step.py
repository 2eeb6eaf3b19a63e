"""Training throughput and peak memory: moe-lab's `small` preset vs the same architecture as Hugging Face
``MixtralForCausalLM`` (same shapes, batch, AdamW, load-balancing loss), side by side.

Throughput: both models live in one process and are timed in alternating rounds of full training steps
(forward + backward + AdamW step), so machine noise hits both alike. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` per model; on CPU each model trains in its own child process and we
report the peak RSS growth during training (peak RSS, ``VmHWM``, minus the RSS before the first step).

Run:
    python benchmarks/train_step.py                         # small preset, batch 8 x 256, CPU/CUDA auto
    python benchmarks/train_step.py --batch-size 16 --seq-len 128 --rounds 5 --append benchmarks/RESULTS.md
    python benchmarks/train_step.py --precision bf16           # both sides under bfloat16 autocast

``--precision bf16`` runs both models' forward under ``torch.autocast(bfloat16)`` with float32 weights and
optimizer (``train.precision=bf16`` in moe-lab's trainer; ``bf16=True`` in Hugging Face's ``Trainer``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moe_lab.models import ModelConfig, MoEModel, get_preset
from moe_lab.train.optim import adamw


def hf_config(cfg: ModelConfig):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.effective_head_dim,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.experts_per_token,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        router_aux_loss_coef=cfg.aux_loss_coef,
        output_router_logits=True,
        use_cache=False,
        rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
    )


def build(impl: str, cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    if impl == "moe-lab":
        model = MoEModel(cfg)
    else:
        from transformers import MixtralForCausalLM

        model = MixtralForCausalLM._from_config(hf_config(cfg), attn_implementation="sdpa")
    return model.to(device).train()


def make_step(model: torch.nn.Module, lr: float = 1e-3, precision: str = "fp32"):
    # the AdamW MoETrainer builds (moe_lab.train.optim.adamw: torch's fused kernel where it applies), the
    # same for both sides; Hugging Face's Trainer defaults to the fused one too ("adamw_torch_fused")
    opt = adamw([{"params": list(model.parameters())}], lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

    def step(ids: torch.Tensor) -> float:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step


def model_config(args: argparse.Namespace) -> ModelConfig:
    # z-loss off: Mixtral has none; the load-balancing loss is on in both.
    return get_preset(args.preset, z_loss_coef=0.0, max_seq_len=max(args.seq_len, 16))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(
    args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock tokens/s per round, and tokens per CPU-second of this process (CPU only: robust to other
    processes sharing the machine)."""
    cfg = model_config(args)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    impls = ["moe-lab", "hf-mixtral"]
    steps = {name: make_step(build(name, cfg, device), precision=args.precision) for name in impls}
    for name in impls:
        for _ in range(args.warmup):
            steps[name](ids)
    rates: dict[str, list[float]] = {name: [] for name in impls}
    cpu_rates: dict[str, list[float]] = {name: [] for name in impls}
    for r in range(args.rounds):
        order = impls if r % 2 == 0 else impls[::-1]
        for name in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                steps[name](ids)
            sync(device)
            rates[name].append(args.steps * ids.numel() / (time.perf_counter() - t0))
            cpu_rates[name].append(args.steps * ids.numel() / (time.process_time() - c0))
    return rates, cpu_rates


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's peak RSS: ``VmHWM`` (reset by exec). ``ru_maxrss`` is not used where VmHWM exists: on
    Linux it keeps the high-water mark of the forking parent across exec, so a child started from a big
    benchmark process would report the parent's RSS instead of its own."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(args: argparse.Namespace, impl: str, device: torch.device) -> dict[str, float]:
    """Peak memory of training one model (runs in a child process on CPU)."""
    import transformers  # noqa: F401  (same imports in both children)

    cfg = model_config(args)
    ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len)).to(device)
    model = build(impl, cfg, device)
    step = make_step(model, precision=args.precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    for _ in range(max(2, args.warmup)):
        step(ids)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss_bytes()
    return {"peak_mib": (peak - base) / 2**20, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def memory(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    out = {}
    for impl in ("moe-lab", "hf-mixtral"):
        if device.type == "cuda":
            out[impl] = memory_child(args, impl, device)
            continue
        cmd = [sys.executable, __file__, "--memory-child", impl, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--append", metavar="RESULTS_MD", help="append a results section to this markdown file")
    p.add_argument("--out", metavar="JSON", help="write ratio records for benchmarks/compare.py")
    p.add_argument("--quick", action="store_true", help="CI size: batch 4 x 128, 2 rounds of 2 steps")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: both sides under bfloat16 autocast",
    )
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.batch_size, args.seq_len, args.steps, args.rounds, args.warmup = 4, 128, 2, 2, 1
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args, args.memory_child, device)))
        return

    rates, cpu_rates = throughput(args, device)
    mem = memory(args, device)
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_rates.items()}
    ratio = med["moe-lab"] / med["hf-mixtral"]
    cpu_ratio = cpu_med["moe-lab"] / cpu_med["hf-mixtral"]
    mem_ratio = mem["moe-lab"]["peak_mib"] / max(mem["hf-mixtral"]["peak_mib"], 1e-9)
    where = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    lines = [
        f"| implementation | wall tokens/s (median of {args.rounds}) | rounds | tokens per CPU-second (median) "
        "| peak train memory MiB | params M |",
        "|---|---|---|---|---|---|",
    ]
    for k in ("moe-lab", "hf-mixtral"):
        rs = ", ".join(f"{x:,.0f}" for x in rates[k])
        lines.append(
            f"| {k} | {med[k]:,.0f} | {rs} | {cpu_med[k]:,.0f} | {mem[k]['peak_mib']:,.1f} "
            f"| {mem[k]['params_m']:.2f} |"
        )
    lines.append("")
    lines.append(
        f"moe-lab / hf-mixtral: wall-clock throughput **{ratio:.2f}x**, throughput per CPU-second "
        f"**{cpu_ratio:.2f}x**, peak training memory **{mem_ratio:.2f}x**"
    )
    table = "\n".join(lines)
    print(table)
    if args.out:
        key = "train_step" if args.precision == "fp32" else "train_step_bf16"
        records = [
            {"name": f"{key}/tokens_per_s_vs_hf_mixtral", "ratio": ratio, "higher_is_better": True},
            {
                "name": f"{key}/tokens_per_cpu_s_vs_hf_mixtral",
                "ratio": cpu_ratio,
                "higher_is_better": True,
            },
            {"name": f"{key}/peak_memory_vs_hf_mixtral", "ratio": mem_ratio, "higher_is_better": False},
        ]
        payload = {"records": records, "tokens_per_s": med, "tokens_per_cpu_s": cpu_med, "memory": mem}
        Path(args.out).write_text(json.dumps(payload, indent=2))
    if args.append:
        path = Path(args.append)
        if not path.exists():
            path.write_text("# Benchmark results\n", encoding="utf-8")
        cmd = "python benchmarks/train_step.py " + " ".join(sys.argv[1:])
        load = os.getloadavg()[0]
        import transformers

        precision_note = (
            "bfloat16 autocast with float32 weights (both sides)" if args.precision == "bf16" else "float32"
        )

        section = (
            f"\n## Training step{' (bf16 autocast)' if args.precision == 'bf16' else ''}: moe-lab vs HF "
            f"MixtralForCausalLM ({_dt.date.today().isoformat()})\n\n"
            f"Command: `{cmd}`  \n"
            f"Device: {where}; preset `{args.preset}`, batch {args.batch_size} x {args.seq_len} tokens, {precision_note}, AdamW (fused, both sides), "
            f"load-balancing loss on, z-loss off; torch {torch.__version__}, transformers {transformers.__version__}; "
            f"1-min load average at the end: {load:.1f}.\n\n{table}\n\n"
            f"Target: >= 1.2x HF's training tokens/s with no more peak memory: "
            f"{'met' if ratio >= 1.2 and mem_ratio <= 1.0 else 'NOT met'}.\n"
        )
        with path.open("a", encoding="utf-8") as fh:
            fh.write(section)


if __name__ == "__main__":
    main()
