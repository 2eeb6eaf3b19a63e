"""Expert cache: simulated hit rates of eviction policies vs Belady, and real decode speed with offloading.

Models:
  * ``small``: ``runs/demo`` when it exists (the trained demo run), else the ``small`` preset trained here
    for ``--train-steps`` steps on the bundled default corpus (byte tokenizer) with ``MoETrainer``
    (0 steps = random init, said so in the notes);
  * ``olmoe-like``: the fine-grained ``olmoe-like`` preset (64 experts, top-8), scaled down to 2 layers,
    trained the same way.

(a) Routing traces are recorded on held-out text (validation documents). Each policy replays the decode-order
    request stream per MoE layer with capacity = 2 x top_k experts per layer; ``pin`` pins the most used
    experts of a separate calibration trace (training documents) so every policy is online. Belady's MIN
    (offline optimum, demand paging with bypass) is the upper bound; target: best online policy >= 90% of
    Belady's hit rate. ``next-token oracle`` is a second offline reference: a policy told the next token's
    experts exactly (it keeps those among the resident and just-loaded experts, then the most used so far),
    i.e. what a perfect one-token-ahead predictor such as ``markov`` could reach. Every policy here is
    demand-only (an expert is loaded when a token asks for it), so
    loads per token = (1 - hit rate) x top_k for all of them, Belady included. Table (a') replays the
    calibration trace (the tuning set): the policy one would choose there, without the test data, and its
    held-out ratio. The calibration sequences are spread over the whole training split.
(b) Greedy decode (batch 1, KV cache) with every expert resident vs ``enable_dynamic_loading(cache_size=E//2,
    storage="disk")`` (experts memory-mapped from safetensors files; LRU), without and with speculative
    prefetch, and with the ``markov`` policy, run in rotation; target: offloaded >= 0.6x the all-resident tokens/s. The all-resident model
    runs with its default expert implementation and with ``impl="loop"`` (the per-expert path offloading
    uses); ratios are against the faster of the two.

Run:
    python benchmarks/expert_cache.py [--quick] [--train-steps N] [--out results.json] [--no-append]
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from moe_lab.bench import append_results, markdown_table, record, write_records
from moe_lab.bench.generate import run_once
from moe_lab.inference.cache_sim import simulate
from moe_lab.inference.optimized import OptimizedMoEModel
from moe_lab.inference.trace import record_trace
from moe_lab.models import MoEModel

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ONLINE = ("lru", "lfu", "lfu_admit", "weighted_lru", "markov", "pin")


def corpus_splits(seq_len: int, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out sequences of the default corpus, byte tokenizer (split per document)."""
    from moe_lab.data import ByteTokenizer, default_corpus, pack_documents, split_documents

    docs = list(default_corpus(max_bytes=max_bytes))
    train_docs, val_docs = split_documents(docs, 0.1)
    tok = ByteTokenizer()
    train = torch.from_numpy(pack_documents(train_docs, tok, seq_len).sequences).long()
    val = torch.from_numpy(pack_documents(val_docs, tok, seq_len).sequences).long()
    return train, val


def get_model(name: str, steps: int, train: torch.Tensor, notes: list[str]) -> Any:
    if name == "small" and (ROOT / "runs" / "demo").is_dir():
        from moe_lab.inference.optimized import load_model

        notes.append("- `small`: the trained `runs/demo` model")
        return load_model(ROOT / "runs" / "demo").eval()
    torch.manual_seed(0)
    overrides = {"num_layers": 2} if name == "olmoe-like" else {}
    model = MoEModel.from_preset(name, **overrides)
    if steps > 0:
        from moe_lab.train import MoETrainer

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="moe-bench-train-") as run_dir:
            res = MoETrainer(model, console=False, run_dir=run_dir, overwrite=True).train(
                train, max_steps=steps, batch_size=8, learning_rate=1e-3, device="cpu",
                save_final_checkpoint=False, warmup_steps=10,
            )  # fmt: skip
        notes.append(
            f"- `{name}`{' (2 layers)' if overrides else ''}: trained here for {steps} steps "
            f"(batch 8 x {train.shape[1]} bytes of the default corpus, {time.perf_counter() - t0:.0f} s), "
            f"final lm loss {res.final_lm_loss or float('nan'):.3f}"
        )
    else:
        notes.append(f"- `{name}`: random init (no training): routing is less skewed than a trained model's")
    return model.eval()


def next_token_oracle(trace: Any, capacity: int) -> float:
    """Hit rate of a per-layer cache that knows the next token's experts (and nothing further ahead).

    After each token it keeps, among the resident and the just-loaded experts, first those the next token
    uses, then the most used so far (demand paging: nothing is loaded ahead).
    """
    idx = trace.expert_indices.tolist()
    hits = requests = 0
    for layer in range(trace.num_layers):
        tokens = [[e for e in tok[layer] if e >= 0] for tok in idx]
        freq: dict[int, int] = {}
        resident: set[int] = set()
        for t, cur in enumerate(tokens):
            hits += len(resident.intersection(cur))
            requests += len(cur)
            for e in cur:
                freq[e] = freq.get(e, 0) + 1
            nxt = set(tokens[t + 1]) if t + 1 < len(tokens) else set()
            ranked = sorted(resident.union(cur), key=lambda e: (e in nxt, freq.get(e, 0)), reverse=True)
            resident = set(ranked[:capacity])
    return hits / requests if requests else 0.0


def sim_rows(
    model: Any, name: str, calib: torch.Tensor, held: torch.Tensor, tokens: int
) -> tuple[list[Any], list[Any]]:
    """Held-out hit rates per policy (the measurement) and the calibration replay (the tuning set)."""
    trace = record_trace(model, list(held.split(4)), max_tokens=tokens)
    profile = record_trace(model, list(calib.split(4)), max_tokens=tokens)
    cap = 2 * trace.top_k
    res = {p: simulate(trace, p, cap, profile_trace=profile) for p in (*ONLINE, "belady")}
    opt = res["belady"].hit_rate
    best = max(ONLINE, key=lambda p: res[p].hit_rate)
    row = [name, trace.num_experts, trace.top_k, cap, trace.num_tokens]
    row += [res[p].hit_rate for p in (*ONLINE, "belady")]
    row += [best, res[best].hit_rate / opt if opt > 0 else float("nan")]
    row += [next_token_oracle(trace, cap) / opt if opt > 0 else float("nan")]
    tuning = [p for p in ONLINE if p != "pin"]  # pin's profile is the calibration trace itself
    cal = {p: simulate(profile, p, cap).hit_rate for p in (*tuning, "belady")}
    chosen = max(tuning, key=lambda p: cal[p])
    cal_row = [name, profile.num_tokens, *[cal[p] for p in (*tuning, "belady")], chosen]
    cal_row.append(res[chosen].hit_rate / opt if opt > 0 else float("nan"))
    return row, cal_row


def decode_rows(
    model: Any, name: str, prompt: torch.Tensor, new: int, reps: int
) -> tuple[list[Any], dict[str, float]]:
    e = int(model.config.num_experts)
    loop = copy.deepcopy(model).eval()
    for layer in loop.moe_layers():
        layer.impl = "loop"  # the per-expert path the offloaded experts use
    variants: dict[str, Any] = {"all resident": copy.deepcopy(model).eval(), "all resident (impl=loop)": loop}
    closers = []
    caches = {}
    offloaded = (("E/2 on disk", "lru", False), ("E/2 on disk + prefetch", "lru", True),
                 ("E/2 on disk, markov", "markov", False))  # fmt: skip
    for label, policy, prefetch in offloaded:
        opt = OptimizedMoEModel(copy.deepcopy(model).eval())
        caches[label] = opt.enable_dynamic_loading(
            cache_size=e // 2, eviction_policy=policy, storage="disk", prefetch=prefetch
        )
        variants[label] = opt.model
        closers.append(opt.close)
    try:
        toks = {k: run_once(m, prompt, new)[2] for k, m in variants.items()}  # warm-up + equality check
        for c in caches.values():
            c.reset_stats()
        dec: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(reps):
            for k, m in variants.items():
                dec[k].append(run_once(m, prompt, new)[1])
        tps = {k: prompt.shape[0] * (new - 1) / statistics.median(v) for k, v in dec.items()}
        base = max(tps["all resident"], tps["all resident (impl=loop)"])  # the faster resident baseline
        rows = []
        for k in variants:
            st = caches[k].get_stats() if k in caches else None
            rows.append([
                name, k, tps[k], tps[k] / base,
                f"{st.hits / max(1, st.hits + st.misses):.3f}" if st else "-",
                f"{st.prefetch_used}/{st.prefetched}" if st and st.prefetched else "-",
                "yes" if torch.equal(toks[k], toks["all resident"]) else "NO",
            ])  # fmt: skip
        return rows, {k: tps[k] / base for k in caches}
    finally:
        for c in closers:
            c()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, random init (CI smoke, < 60 s)")
    ap.add_argument(
        "--train-steps", type=int, default=None, help="training steps per model (default 150; quick 0)"
    )
    ap.add_argument("--out", help="write compare.py records (JSON) here")
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.train_steps if args.train_steps is not None else (0 if args.quick else 150)
    tokens, new, reps = (512, 8, 2) if args.quick else (4096, 32, 5)
    train, held = corpus_splits(128, 300_000 if args.quick else 3_000_000)
    notes: list[str] = []
    sim, cal_sim, dec, records = [], [], [], []
    # calibration: training sequences spread over the whole training split (code and prose alike)
    calib = train[torch.linspace(0, len(train) - 1, tokens // train.shape[1]).long()]
    with torch.inference_mode(False):
        models = {n: get_model(n, steps, train, notes) for n in ("small", "olmoe-like")}
    for name, model in models.items():
        vocab = int(model.config.vocab_size)
        with torch.no_grad():
            row, cal_row = sim_rows(
                model, name, calib.clamp_max(vocab - 1), held.clamp_max(vocab - 1), tokens
            )
        sim.append(row)
        cal_sim.append(cal_row)
        records.append(record(f"expert_cache/{name}/best_online_vs_belady", row[-2], higher_is_better=True))
        prompt = held[:1, :32].clamp_max(vocab - 1)
        drows, ratios = decode_rows(model, name, prompt, new, reps)
        dec += drows
        for k, r in ratios.items():
            tag = "prefetch" if "prefetch" in k else "markov" if "markov" in k else "lru"
            records.append(
                record(f"expert_cache/{name}/decode_half_resident_{tag}_vs_all", r, higher_is_better=True)
            )
        print(row, cal_row, drows, flush=True)
    t1 = markdown_table(
        ["model", "E", "top-k", "capacity/layer", "trace tokens", *ONLINE, "belady", "best online",
         "best / belady", "next-token oracle / belady"], sim)  # fmt: skip
    tuning = [p for p in ONLINE if p != "pin"]
    t1b = markdown_table(
        ["model", "calib tokens", *tuning, "belady", "best on calib", "its held-out / belady"], cal_sim)  # fmt: skip
    t2 = markdown_table(
        ["model", "experts resident", "decode tok/s (batch 1)", "x faster all-resident", "cache hit rate",
         "prefetch used/issued", "same tokens"], dec)  # fmt: skip
    best = min(r[-2] for r in sim)
    worst = min(float(r[3]) for r in dec if not r[1].startswith("all resident"))
    verdict = (
        f"Targets: best online >= 0.90 x Belady: measured min {best:.3f} "
        f"({'met' if best >= 0.9 else 'NOT met'}); offloaded decode >= 0.6x all resident: measured min "
        f"{worst:.2f}x ({'met' if worst >= 0.6 else 'NOT met'})."
    )
    body = (
        "(a) simulated hit rates, per-layer caches, held-out trace (demand paging: loads per token = "
        "(1 - hit rate) x top-k for every policy and for Belady's MIN)\n\n"
        + t1
        + "\n\n(a') the same policies replayed on the calibration trace (training documents; the tuning set)"
        "\n\n" + t1b + "\n\n(b) real decode, fp32 CPU\n\n" + t2
    )
    print(body)
    print(verdict)
    if args.out:
        write_records(args.out, records)
    if not args.no_append:
        cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
        append_results(RESULTS, "expert_cache: policies vs Belady, offloaded decode" + (" (quick)" if args.quick else ""),
                       cmd, body, "\n".join([verdict, *notes]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
