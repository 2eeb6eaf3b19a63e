"""``moe-lab bench generate``: prefill/decode latency and tokens/s of eager, compiled, int8 and cached variants.

Example:
    $ moe-lab bench generate --preset small --batch-sizes 1,8 --prompt-lengths 128 --new-tokens 16
    $ moe-lab bench generate runs/demo --variants eager,int8,cached --json bench.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_lab.cli.args import int_list
from moe_lab.cli.main import CLIError

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bench",
        help="inference benchmarks (generate: eager / compiled / int8 / cached experts)",
        description="Benchmarks of the inference optimisations.",
    )
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    g = bsub.add_parser(
        "generate",
        help="prefill and decode speed of inference variants",
        description=(
            "Time the prefill and greedy KV-cache decode of eager, compiled (torch.compile), int8 "
            "(weight-only experts) and cached (half the experts resident, LRU, rest on disk) variants of "
            "one model, in rotation. Weights may be random (--preset): speed does not depend on them."
        ),
    )
    g.add_argument("model", nargs="?", metavar="RUN_DIR|MODEL_DIR", help="a run, model or HF directory")
    g.add_argument(
        "--preset", metavar="NAME", help="benchmark a random-init preset instead (tiny, small, ...)"
    )
    g.add_argument("--batch-sizes", type=int_list, default=[1, 8, 32], metavar="B,B")
    g.add_argument("--prompt-lengths", type=int_list, default=[128, 512], metavar="S,S")
    g.add_argument("--new-tokens", type=int, default=16, metavar="N", help="tokens to generate (>= 2)")
    g.add_argument(
        "--variants", default="eager,compiled,int8,cached", help="comma-separated: eager,compiled,int8,cached"
    )
    g.add_argument("--reps", type=int, default=3, help="timed repetitions per variant (median reported)")
    g.add_argument("--warmup", type=int, default=1, help="untimed runs per variant and case")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    g.add_argument("--json", dest="json_out", metavar="OUT", help="write the rows as JSON here")
    g.set_defaults(func=run)
    p.set_defaults(func=lambda args: _no_benchmark(p))


def _no_benchmark(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if (args.model is None) == (args.preset is None):
        raise CLIError("give exactly one of RUN_DIR|MODEL_DIR or --preset NAME")
    if args.preset is not None:
        import torch

        from moe_lab.models import MoEModel, list_presets

        if args.preset not in list_presets():
            raise CLIError(f"unknown --preset {args.preset!r}; expected one of {', '.join(list_presets())}")
        torch.manual_seed(0)
        return MoEModel.from_preset(args.preset), f"preset {args.preset} (random init)"
    from moe_lab.inference.optimized import load_model

    return load_model(args.model), str(args.model)


def run(args: argparse.Namespace) -> int:
    import torch

    from moe_lab.bench.generate import VARIANTS, bench_generate, format_rows
    from moe_lab.bench.harness import machine_note

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise CLIError(
            f"--variants: unknown {bad[0] if bad else '(empty)'!r}; expected some of {', '.join(VARIANTS)}"
        )
    if args.new_tokens < 2:
        raise CLIError(f"--new-tokens must be >= 2, got {args.new_tokens}")
    if args.reps < 1 or args.warmup < 0:
        raise CLIError("--reps must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model, source = _load(args)
    cfg = model.config
    needs_moe = [v for v in variants if v in ("int8", "cached")]
    if needs_moe and (cfg.num_experts or 0) < 2:
        raise CLIError(
            f"variant {needs_moe[0]!r} needs an MoE model with at least 2 experts (this one is dense)"
        )
    print(
        f"model: {source}: {model.num_params() / 1e6:.2f}M params ({model.num_active_params() / 1e6:.2f}M "
        f"active), {cfg.num_experts} experts top-{cfg.experts_per_token}"
    )
    print(f"machine: {machine_note()}")
    rows = bench_generate(
        model,
        batch_sizes=args.batch_sizes,
        prompt_lengths=args.prompt_lengths,
        new_tokens=args.new_tokens,
        variants=variants,
        reps=args.reps,
        warmup=args.warmup,
    )
    print(format_rows(rows))
    if "cached" in variants:
        print(
            f"cached: {max(1, cfg.num_experts // 2)} of {cfg.num_experts} experts per layer resident (LRU, disk)"
        )
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(
            json.dumps({"source": source, "rows": rows}, indent=2), encoding="utf-8"
        )
        print(f"json: {args.json_out}")
    return 0
