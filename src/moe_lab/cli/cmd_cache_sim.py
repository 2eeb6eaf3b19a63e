"""``moe-lab cache-sim TRACE_FILE --capacity 2,4,8``: compare expert-cache eviction policies on a trace."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_lab.cli.args import int_list
from moe_lab.cli.main import CLIError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "cache-sim",
        help="replay a routing trace through expert-cache policies (LRU, LFU, LFU+admission, weighted LRU, "
        "pin, Belady)",
        description="Replay a routing trace (from `moe-lab trace`) and compare eviction policies.",
    )
    p.add_argument("trace", help="trace file written by `moe-lab trace` (.safetensors)")
    p.add_argument(
        "--capacity", type=int_list, default=None, help="experts per layer, e.g. 2,4,8 (default: 1..E)"
    )
    p.add_argument(
        "--policies",
        default=None,
        help="comma-separated policies to compare: lru, lfu, lfu_admit, weighted_lru, markov, pin, "
        "belady (default: all)",
    )
    p.add_argument("--scope", choices=["per_layer", "global", "both"], default="both")
    p.add_argument(
        "--profile", default=None, help="calibration trace for the `pin` policy (default: the trace)"
    )
    p.add_argument("--decay", type=float, default=0.9, help="decay of the weighted_lru score per request")
    p.add_argument(
        "--plot", default=None, help="hit-rate plot (PNG) to write (default: TRACE with .cache-sim.png)"
    )
    p.add_argument("--no-plot", action="store_true", help="do not write the plot")
    p.add_argument("--json", dest="json_out", default=None, help="write the results as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moe_lab.inference.cache_policies import POLICIES
    from moe_lab.inference.cache_sim import compare_policies, format_table, plot_results
    from moe_lab.inference.trace import load_trace

    trace = load_trace(args.trace)
    policies = [p.strip() for p in (args.policies or ",".join(POLICIES)).split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise CLIError(f"unknown policy {unknown[0]!r}; expected some of {', '.join(POLICIES)}")
    capacities = args.capacity or list(range(1, trace.num_experts + 1))
    too_big = [c for c in capacities if c > trace.num_experts]
    if too_big:
        raise CLIError(
            f"--capacity {too_big[0]} exceeds the {trace.num_experts} experts per layer of the trace"
        )
    profile = load_trace(args.profile) if args.profile else None
    scopes = ["per_layer", "global"] if args.scope == "both" else [args.scope]
    results = compare_policies(trace, capacities, policies, scopes, profile_trace=profile, decay=args.decay)
    print(
        f"trace: {trace.num_tokens} tokens, {trace.num_layers} MoE layers, {trace.num_experts} experts, "
        f"{trace.top_k} slots per token"
    )
    offline = ["belady"]
    if "pin" in policies and profile is None:
        offline.append("pin")
        print(
            "note: `pin` uses the trace's own expert frequencies (offline static placement), so it is not "
            "counted as online; give --profile CALIB_TRACE to make it an online policy"
        )
    print(format_table(results, offline=offline))
    if not args.no_plot:
        plot = args.plot or str(Path(args.trace).with_suffix("")) + ".cache-sim.png"
        print(f"plot: {plot_results(results, plot)}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([r.to_dict() for r in results], indent=2), encoding="utf-8")
        print(f"json: {args.json_out}")
    return 0
