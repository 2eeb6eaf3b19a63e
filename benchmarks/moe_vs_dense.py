"""MoE vs a dense model with the same TOTAL parameters: batch-1 greedy decode tokens/s (KV cache, CPU fp32).

An MoE with E experts of FFN width F (top-k) holds E x the FFN parameters of one expert but computes only k
of them per token; the dense twin has one FFN of width E x F (the same total parameter count, up to the
router). Pairs:
  * ``small``: the ``small`` preset (8 experts top-2, F=512, D=256, 4 layers) vs dense F=4096;
  * ``medium``: D=512, 8 experts top-2, F=1024, 4 layers vs dense F=8192 (where weight reads dominate more).
Weights are random (speed does not depend on them). Runs alternate MoE (default impl), MoE (``impl="loop"``)
and dense; the ratio is the faster MoE's decode tokens/s over the dense model's. The original project goal
is 3x.

Run:
    python benchmarks/moe_vs_dense.py [--quick] [--out results.json] [--no-append]
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
from pathlib import Path

import torch

from moe_lab.bench import append_results, markdown_table, record, write_records
from moe_lab.bench.generate import run_once
from moe_lab.models import MoEModel, get_preset

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
GOAL = 3.0
PAIRS = {
    "small": {},
    "medium": {"hidden_size": 512, "ffn_hidden_size": 1024, "num_heads": 8, "num_kv_heads": 4},
}


def build_pair(name: str) -> tuple[MoEModel, MoEModel]:
    torch.manual_seed(0)
    moe_cfg = get_preset("small", **PAIRS[name])
    moe = MoEModel(moe_cfg).eval()
    width = int(moe_cfg.num_experts) * int(moe_cfg.ffn_hidden_size)
    dense = MoEModel(get_preset("small", **PAIRS[name], num_experts=0, dense_ffn_hidden_size=width)).eval()
    return moe, dense


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small pair only, few tokens (CI smoke, < 60 s)")
    ap.add_argument("--out", help="write compare.py records (JSON) here")
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompt_len, new, reps = (16, 8, 2) if args.quick else (32, 32, 5)
    rows, records = [], []
    for name in ["small"] if args.quick else list(PAIRS):
        moe, dense = build_pair(name)
        loop = copy.deepcopy(moe)
        for layer in loop.moe_layers():
            layer.impl = "loop"
        models = {"moe": moe, "moe (impl=loop)": loop, "dense": dense}
        ids = torch.randint(
            0, int(moe.config.vocab_size), (1, prompt_len), generator=torch.Generator().manual_seed(0)
        )
        for m in models.values():
            run_once(m, ids, new)  # warm-up
        dec: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(reps):
            for k, m in models.items():
                dec[k].append(run_once(m, ids, new)[1])
        tps = {k: (new - 1) / statistics.median(v) for k, v in dec.items()}
        best = max(("moe", "moe (impl=loop)"), key=lambda k: tps[k])
        ratio = tps[best] / tps["dense"]
        rows.append([name, f"{moe.num_params() / 1e6:.2f}M", f"{dense.num_params() / 1e6:.2f}M",
                     f"{moe.num_active_params() / 1e6:.2f}M", tps["moe"], tps["moe (impl=loop)"], tps["dense"],
                     f"{ratio:.2f}"])  # fmt: skip
        records.append(record(f"moe_vs_dense/{name}/decode_b1", ratio, higher_is_better=True))
        print(rows[-1], flush=True)
    table = markdown_table(
        ["pair", "MoE params", "dense params", "MoE active", "MoE tok/s", "MoE loop tok/s", "dense tok/s",
         "best MoE / dense"], rows)  # fmt: skip
    ratios = [float(r[-1]) for r in rows]
    verdict = (
        f"Goal: MoE >= {GOAL}x the dense twin's batch-1 decode tokens/s. Measured {min(ratios):.2f}x to "
        f"{max(ratios):.2f}x: {'met' if min(ratios) >= GOAL else 'NOT met'}."
    )
    print(table)
    print(verdict)
    if args.out:
        write_records(args.out, records)
    if not args.no_append:
        cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
        append_results(RESULTS, "moe_vs_dense: batch-1 decode, same total parameters" + (" (quick)" if args.quick else ""),
                       cmd, table, verdict)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
