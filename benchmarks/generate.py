"""Decode speed of moe-lab's ``generate`` vs Hugging Face ``transformers``' ``generate`` on the same weights.

Models (fp32, CPU):
  * ``small``: the ``small`` preset, random init (speed does not depend on the values), exported with
    ``moe_lab.interop.save_pretrained_hf`` and loaded by ``transformers.MixtralForCausalLM``;
  * ``tiny-mixtral``: a tiny ``transformers.MixtralForCausalLM`` built in-process, saved with
    ``save_pretrained`` and imported with ``moe_lab.interop.load_pretrained``.

For each model and batch size (1 and 8) both sides generate greedily with the KV cache from the same prompt,
the same number of new tokens, no EOS stop. Runs alternate (ours, HF, ours, HF, ...). A forward hook on each
top-level model stamps the end of every forward call: prefill = start of ``generate`` to the end of the
first forward; decode = end of the first forward to the end of the last (N - 1 decode steps including the
token selection between them), the same definition for both sides; decode tokens/s = batch x (N - 1) /
median decode time. The generated tokens are compared (same weights, same greedy decoding).

Run:
    python benchmarks/generate.py [--quick] [--out results.json] [--no-append]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from moe_lab.bench import append_results, markdown_table, record, write_records
from moe_lab.inference.generate import generate
from moe_lab.models import MoEModel

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
TARGET = 1.5


def build_small(tmp: Path) -> tuple[Any, Any, str]:
    from transformers import MixtralForCausalLM

    from moe_lab.interop import save_pretrained_hf

    torch.manual_seed(0)
    ours = MoEModel.from_preset("small").eval()
    save_pretrained_hf(ours, tmp / "small-hf")
    hf = MixtralForCausalLM.from_pretrained(str(tmp / "small-hf"), dtype=torch.float32).eval()
    return ours, hf, "small preset, random init, exported to HF (save_pretrained_hf)"


def build_tiny_mixtral(tmp: Path) -> tuple[Any, Any, str]:
    from transformers import MixtralConfig, MixtralForCausalLM

    from moe_lab.interop import load_pretrained

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    hf = MixtralForCausalLM(cfg).eval()
    hf.save_pretrained(str(tmp / "tiny-mixtral"))
    ours = load_pretrained(tmp / "tiny-mixtral").eval()
    return ours, hf, "tiny MixtralForCausalLM (random init), imported with moe_lab.interop.load_pretrained"


def _hf_generate(hf: Any, ids: torch.Tensor, n: int) -> torch.Tensor:
    return hf.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=0,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        use_cache=True,
    )[:, ids.shape[1] :]


def _ours_generate(model: Any, ids: torch.Tensor, n: int) -> torch.Tensor:
    return generate(model, ids, max_new_tokens=n).sequences[:, ids.shape[1] :]


class _Stamps:
    """Forward hook on the top-level model: the wall-clock time each forward call ends."""

    def __init__(self, model: Any) -> None:
        self.times: list[float] = []
        self.handle = model.register_forward_hook(lambda *_: self.times.append(time.perf_counter()))

    def run(self, fn: Any, *args: Any) -> tuple[float, float, Any]:
        """(prefill_s, decode_s, result): prefill = start to end of forward 1; decode = forward 1 to last."""
        self.times.clear()
        t0 = time.perf_counter()
        out = fn(*args)
        return self.times[0] - t0, self.times[-1] - self.times[0], out


def bench_pair(ours: Any, hf: Any, batch: int, prompt: int, new: int, reps: int) -> dict[str, Any]:
    vocab = int(ours.config.vocab_size)
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    hf.generation_config.eos_token_id = None
    so, sh = _Stamps(ours), _Stamps(hf)
    dec: dict[str, list[float]] = {"ours": [], "hf": []}
    pre: dict[str, list[float]] = {"ours": [], "hf": []}
    try:
        with torch.inference_mode():
            a, b = _ours_generate(ours, ids, new), _hf_generate(hf, ids, new)  # also the warm-up
            same = a.shape == b.shape and torch.equal(a, b)
            agree = float((a == b).float().mean()) if a.shape == b.shape else 0.0
            for _ in range(reps):  # rotation: ours, HF, ours, HF, ...
                for key, st, fn, model in (("ours", so, _ours_generate, ours), ("hf", sh, _hf_generate, hf)):
                    p, d, _out = st.run(fn, model, ids, new)
                    assert len(st.times) == new, f"{key}: expected {new} forward calls, got {len(st.times)}"
                    pre[key].append(p)
                    dec[key].append(d)
    finally:
        so.handle.remove()
        sh.handle.remove()
    steps = batch * (new - 1)
    ours_dec = steps / statistics.median(dec["ours"])
    hf_dec = steps / statistics.median(dec["hf"])
    return {
        "batch": batch,
        "prompt": prompt,
        "new": new,
        "ours_decode_tok_s": ours_dec,
        "hf_decode_tok_s": hf_dec,
        "ratio": ours_dec / hf_dec,
        "prefill_ratio": statistics.median(pre["hf"]) / statistics.median(pre["ours"]),
        "identical": same,
        "token_agreement": agree,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes for CI smoke (< 60 s)")
    ap.add_argument("--out", help="write compare.py records (JSON) here")
    ap.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument(
        "--threads", type=int, default=2,
        help="torch threads (default 2: both cores of the reference machine; 1 on a machine shared with other jobs)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompt, new, reps = (16, 8, 2) if args.quick else (32, 32, 15)
    models = ["tiny-mixtral"] if args.quick else ["small", "tiny-mixtral"]
    rows, records, notes = [], [], []
    with tempfile.TemporaryDirectory(prefix="moe-bench-gen-") as tmp:
        for name in models:
            builder = build_small if name == "small" else build_tiny_mixtral
            ours, hf, how = builder(Path(tmp))
            impl = getattr(hf.config, "_experts_implementation", None)
            notes.append(f"- `{name}`: {how}; HF experts implementation: {impl!r}")
            for batch in (1, 8):
                r = bench_pair(ours, hf, batch, prompt, new, reps)
                rows.append([name, r["batch"], r["prompt"], r["new"], r["ours_decode_tok_s"],
                             r["hf_decode_tok_s"], f"{r['ratio']:.2f}", f"{r['prefill_ratio']:.2f}",
                             "yes" if r["identical"] else f"no ({r['token_agreement']:.0%} agree)"])  # fmt: skip
                records.append(
                    record(f"generate/{name}/b{batch}/decode_ours_vs_hf", r["ratio"], higher_is_better=True)
                )
                print(rows[-1], flush=True)
    head = ["model", "batch", "prompt", "new tokens", "ours decode tok/s", "HF decode tok/s",
            "decode ours/HF", "prefill ours/HF (speed)", "same tokens"]  # fmt: skip
    table = markdown_table(head, rows)
    ratios = [float(r[6]) for r in rows]
    verdict = (
        f"Target: ours >= {TARGET}x HF decode tokens/s. Measured {min(ratios):.2f}x to {max(ratios):.2f}x: "
        + ("met in every case." if min(ratios) >= TARGET else "NOT met in every case (see table).")
    )
    print(table)
    print(verdict)
    if args.out:
        write_records(args.out, records)
    if not args.no_append:
        cmd = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
        append_results(RESULTS, "generate: moe-lab vs transformers greedy decode" + (" (quick)" if args.quick else ""),
                       cmd, table, "\n".join([verdict, *notes]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
