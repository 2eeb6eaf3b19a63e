"""Size and cost summary of a model config (what ``moe-lab info`` prints), computed without allocating weights.

The model is built on the meta device, so even a full-size Mixtral config is summarised instantly.

Example:
    >>> from moe_lab.models import get_preset
    >>> s = model_summary(get_preset("tiny"), seq_len=128)
    >>> s["num_params"] > s["num_active_params"] > 0
    True
"""

from __future__ import annotations

from typing import Any

import torch

from moe_lab.models.config import ModelConfig

__all__ = ["format_summary", "model_summary"]


def model_summary(config: ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
    """Parameters (total / active / non-embedding), forward FLOPs per token and the layer layout."""
    from moe_lab.models.model import MoEModel

    with torch.device("meta"):
        model = MoEModel(config)
    s = config.max_seq_len if seq_len is None else seq_len
    layers = []
    for i in range(config.num_layers):
        r = config.resolve_layer(i)
        entry: dict[str, Any] = {
            "index": i,
            "kind": "moe" if r.is_moe else "dense",
            "ffn_hidden_size": r.ffn_hidden_size,
        }
        if r.is_moe:
            entry.update(
                num_experts=r.num_experts,
                experts_per_token=r.experts_per_token,
                router_type=r.router_type,
                capacity_factor=r.capacity_factor,
                num_shared_experts=r.num_shared_experts,
            )
        layers.append(entry)
    return {
        "num_params": model.num_params(),
        "num_active_params": model.num_active_params(),
        "num_active_params_no_embeddings": model.num_active_params(exclude_embeddings=True),
        "embedding_params": model.embed_tokens.weight.numel(),
        "flops_per_token": model.flops_per_token(s),
        "seq_len": s,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "num_kv_heads": config.kv_heads,
        "head_dim": config.effective_head_dim,
        "qk_norm": config.qk_norm,
        "tie_embeddings": config.tie_embeddings,
        "max_seq_len": config.max_seq_len,
        "moe_layers": config.moe_layer_indices(),
        "layers": layers,
    }


def _n(x: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= div:
            return f"{x:,} ({x / div:.2f}{unit})"
    return f"{x:,}"


def format_summary(summary: dict[str, Any], title: str = "model") -> str:
    """Human-readable text of :func:`model_summary`."""
    s = summary
    total, active = s["num_params"], s["num_active_params"]
    moe = s["moe_layers"]
    dense = [d["index"] for d in s["layers"] if d["kind"] == "dense"]
    lines = [
        f"{title}",
        f"  parameters        {_n(total)}",
        f"  active per token  {_n(active)}  ({100.0 * active / max(total, 1):.1f}% of total; embeddings included)",
        f"  active, no embed  {_n(s['num_active_params_no_embeddings'])}",
        f"  forward FLOPs/tok {_n(s['flops_per_token'])}  at seq_len {s['seq_len']} (2*active matmul + attention)",
        f"  model             vocab {s['vocab_size']}, hidden {s['hidden_size']}, {s['num_layers']} layers, "
        f"max_seq_len {s['max_seq_len']}, {'tied' if s['tie_embeddings'] else 'untied'} embeddings",
        f"  attention         {s['num_heads']} heads, {s['num_kv_heads']} kv heads, head_dim {s['head_dim']}, "
        f"qk_norm {s['qk_norm']}",
        f"  layers            MoE {moe or '-'}; dense {dense or '-'}",
    ]
    seen: set[tuple[Any, ...]] = set()
    for d in s["layers"]:
        if d["kind"] != "moe":
            continue
        key = (
            d["num_experts"],
            d["experts_per_token"],
            d["router_type"],
            d["ffn_hidden_size"],
            d["capacity_factor"],
            d["num_shared_experts"],
        )
        if key in seen:
            continue
        seen.add(key)
        cap = "dropless" if d["capacity_factor"] is None else f"capacity {d['capacity_factor']}"
        shared = f", {d['num_shared_experts']} shared" if d["num_shared_experts"] else ""
        lines.append(
            f"  experts           {d['num_experts']} x F={d['ffn_hidden_size']}, top-{d['experts_per_token']}, "
            f"router {d['router_type']}, {cap}{shared}"
        )
    dense_widths = sorted({d["ffn_hidden_size"] for d in s["layers"] if d["kind"] == "dense"})
    if dense_widths:
        lines.append(f"  dense FFN         F={', '.join(map(str, dense_widths))}")
    return "\n".join(lines)
