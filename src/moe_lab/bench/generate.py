"""Generation benchmark behind ``moe-lab bench generate``: prefill and decode speed of inference variants.

Variants of one model (each built from a deep copy, so they share the same weights):

- ``eager``     the model as built (eval mode, ``torch.inference_mode``);
- ``compiled``  :func:`moe_lab.inference.export.compile_model` (inductor; the first call compiles and is
                part of the warm-up, not of the timings);
- ``int8``      weight-only int8 experts (:meth:`OptimizedMoEModel.quantize`);
- ``cached``    half the experts of each MoE layer resident (``enable_dynamic_loading(cache_size=E//2,
                eviction_policy="lru", storage="disk")``), the rest read from memory-mapped safetensors.

Each case (batch size x prompt length) runs every variant in rotation (A B C A B C ...): a prefill of the
prompt with the KV cache, then ``new_tokens`` greedy decode steps through the cache (the path
:func:`moe_lab.inference.generate.generate` takes). Prefill and decode are timed separately.

Example:
    >>> from moe_lab.models import MoEModel
    >>> rows = bench_generate(MoEModel.from_preset("tiny"), batch_sizes=[1], prompt_lengths=[8],
    ...                       new_tokens=2, variants=["eager"], reps=1, warmup=0)
    >>> rows[0]["variant"], rows[0]["decode_tokens_per_s"] > 0
    ('eager', True)
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moe_lab.bench.harness import markdown_table

__all__ = ["VARIANTS", "Variant", "bench_generate", "build_variant", "format_rows", "run_once"]

VARIANTS = ("eager", "compiled", "int8", "cached")


@dataclass
class Variant:
    """A runnable variant: ``module`` is called like the model; ``close`` releases its resources."""

    name: str
    module: nn.Module
    expert_bytes: Callable[[], int]
    """Bytes of expert weights held in memory now (cache contents for ``cached``)."""
    close: Callable[[], None]


def _expert_bytes(model: nn.Module) -> int:
    total = 0
    for layer in model.moe_layers():  # type: ignore[operator]
        total += sum(p.numel() * p.element_size() for p in layer.experts.parameters())
    return total


def build_variant(model: Any, name: str) -> Variant:
    """Build variant ``name`` from a deep copy of ``model`` (left untouched)."""
    from moe_lab.inference.optimized import OptimizedMoEModel

    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; expected some of {', '.join(VARIANTS)}")
    m = copy.deepcopy(model).eval()
    if name == "eager":
        return Variant(name, m, lambda: _expert_bytes(m), lambda: None)
    if name == "compiled":
        from moe_lab.inference.export import compile_model

        return Variant(name, compile_model(m), lambda: _expert_bytes(m), lambda: None)
    opt = OptimizedMoEModel(m)
    if name == "int8":
        opt.quantize(bits=8)
        return Variant(name, opt.model, opt.expert_weight_bytes, lambda: None)
    e = int(m.config.num_experts)
    opt.enable_dynamic_loading(cache_size=max(1, e // 2), eviction_policy="lru", storage="disk")
    return Variant(name, opt.model, opt.expert_weight_bytes, opt.close)


@torch.inference_mode()
def run_once(model: nn.Module, ids_BS: Tensor, new_tokens: int) -> tuple[float, float, Tensor]:
    """Prefill ``ids_BS`` then ``new_tokens`` greedy decode steps; returns (prefill_s, decode_s, tokens)."""
    mask = torch.ones_like(ids_BS)
    t0 = time.perf_counter()
    out = model(ids_BS, attention_mask=mask, use_cache=True)
    nxt = out.logits[:, -1, :].argmax(-1)
    t1 = time.perf_counter()
    cache = out.kv_cache
    toks = [nxt]
    for _ in range(new_tokens - 1):
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        out = model(nxt[:, None], attention_mask=mask, kv_cache=cache, use_cache=True)
        cache = out.kv_cache
        nxt = out.logits[:, -1, :].argmax(-1)
        toks.append(nxt)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, torch.stack(toks, dim=1)


def bench_generate(
    model: Any,
    *,
    batch_sizes: Sequence[int] = (1, 8),
    prompt_lengths: Sequence[int] = (128,),
    new_tokens: int = 16,
    variants: Sequence[str] = ("eager", "int8", "cached"),
    reps: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time prefill and decode of each variant for every (batch size, prompt length); one row per pair.

    Rows: ``variant, batch, prompt_len, new_tokens, prefill_ms, prefill_tokens_per_s, decode_ms_per_token,
    decode_tokens_per_s, expert_mb, speedup_vs_eager`` (decode, when ``eager`` ran). Medians over ``reps``.
    """
    cfg = model.config
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (one prefill token + decode steps), got {new_tokens}")
    longest = max(prompt_lengths) + new_tokens
    if longest > int(cfg.max_seq_len):
        raise ValueError(
            f"prompt length {max(prompt_lengths)} + new tokens {new_tokens} exceeds the model's "
            f"max_seq_len ({cfg.max_seq_len})"
        )
    if any(b < 1 for b in batch_sizes) or any(s < 1 for s in prompt_lengths):
        raise ValueError("batch sizes and prompt lengths must be positive")
    model.eval()
    built = [build_variant(model, v) for v in variants]
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    try:
        for b in batch_sizes:
            for s in prompt_lengths:
                ids = torch.randint(0, int(cfg.vocab_size), (b, s), generator=gen)
                for var in built:
                    for _ in range(warmup):
                        run_once(var.module, ids, new_tokens)
                pre: dict[str, list[float]] = {v.name: [] for v in built}
                dec: dict[str, list[float]] = {v.name: [] for v in built}
                for _ in range(reps):
                    for var in built:
                        p, d, _ = run_once(var.module, ids, new_tokens)
                        pre[var.name].append(p)
                        dec[var.name].append(d)
                case: list[dict[str, Any]] = []
                for var in built:
                    p_s = statistics.median(pre[var.name])
                    d_s = statistics.median(dec[var.name])
                    steps = new_tokens - 1
                    eb = var.expert_bytes()
                    case.append(
                        {
                            "variant": var.name,
                            "batch": b,
                            "prompt_len": s,
                            "new_tokens": new_tokens,
                            "prefill_ms": p_s * 1e3,
                            "prefill_tokens_per_s": b * s / p_s,
                            "decode_ms_per_token": d_s * 1e3 / steps,
                            "decode_tokens_per_s": b * steps / d_s,
                            "expert_mb": eb / 2**20,
                        }
                    )
                eager = next((r for r in case if r["variant"] == "eager"), None)
                for r in case:
                    r["speedup_vs_eager"] = (
                        r["decode_tokens_per_s"] / eager["decode_tokens_per_s"] if eager else None
                    )
                rows += case
    finally:
        for var in built:
            var.close()
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`bench_generate` as a markdown table."""
    head = [
        "variant",
        "batch",
        "prompt",
        "new",
        "prefill ms",
        "prefill tok/s",
        "decode ms/tok",
        "decode tok/s",
        "expert MB",
        "decode x eager",
    ]
    body = [
        [
            r["variant"],
            r["batch"],
            r["prompt_len"],
            r["new_tokens"],
            r["prefill_ms"],
            r["prefill_tokens_per_s"],
            r["decode_ms_per_token"],
            r["decode_tokens_per_s"],
            r["expert_mb"],
            "n/a" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}",
        ]
        for r in rows
    ]
    return markdown_table(head, body)
