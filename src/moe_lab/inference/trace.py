"""Routing traces: which experts each token used in each MoE layer, in processing order.

A trace is what an expert cache sees: token after token, layer after layer, the selected experts. It is
recorded from a model (:func:`record_trace`) and replayed by the cache simulator
(:mod:`moe_lab.inference.cache_sim`). Stored as safetensors (no pickle): tensors ``expert_indices``
``[N, L, K]`` int32 (``-1`` = unused slot) and ``weights`` ``[N, L, K]`` float32, with JSON metadata.

Example:
    >>> import torch
    >>> t = RoutingTrace(torch.tensor([[[0, 1]], [[1, 2]]]), torch.ones(2, 1, 2), num_experts=4)
    >>> t.num_tokens, t.num_layers, t.top_k
    (2, 1, 2)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["RoutingTrace", "load_trace", "record_trace", "save_trace"]


@dataclass
class RoutingTrace:
    """Expert choices of N tokens over L MoE layers, K slots each (``-1`` marks an unused slot)."""

    expert_indices: Tensor  # [N, L, K] int
    weights: Tensor  # [N, L, K] float
    num_experts: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.expert_indices.dim() != 3:
            raise ValueError(
                f"expert_indices must be [tokens, layers, slots], got shape {tuple(self.expert_indices.shape)}"
            )
        if self.weights.shape != self.expert_indices.shape:
            raise ValueError(
                f"weights shape {tuple(self.weights.shape)} != expert_indices shape "
                f"{tuple(self.expert_indices.shape)}"
            )
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.expert_indices.numel() and int(self.expert_indices.max()) >= self.num_experts:
            raise ValueError(
                f"trace uses expert {int(self.expert_indices.max())} but num_experts is {self.num_experts}"
            )
        self.expert_indices = self.expert_indices.to(torch.int32)
        self.weights = self.weights.to(torch.float32)

    @property
    def num_tokens(self) -> int:
        return int(self.expert_indices.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.expert_indices.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_indices.shape[2])

    def slice(self, start: int, stop: int | None = None) -> RoutingTrace:
        """Tokens ``start:stop`` (e.g. a calibration prefix)."""
        return RoutingTrace(
            self.expert_indices[start:stop], self.weights[start:stop], self.num_experts, dict(self.metadata)
        )

    def expert_frequencies(self) -> Tensor:
        """``[L, E]`` how often each expert of each layer was used."""
        freq = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64)
        idx = self.expert_indices.long()
        for layer in range(self.num_layers):
            ids = idx[:, layer].reshape(-1)
            ids = ids[ids >= 0]
            freq[layer] += torch.bincount(ids, minlength=self.num_experts)
        return freq


def save_trace(trace: RoutingTrace, path: str | os.PathLike[str]) -> Path:
    """Write a trace atomically as safetensors."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    meta = {"num_experts": str(trace.num_experts), "metadata": json.dumps(trace.metadata)}
    save_file(
        {"expert_indices": trace.expert_indices.contiguous(), "weights": trace.weights.contiguous()},
        str(tmp),
        metadata=meta,
    )
    os.replace(tmp, path)
    return path


def load_trace(path: str | os.PathLike[str]) -> RoutingTrace:
    """Read a trace written by :func:`save_trace`; errors name the file and what is wrong."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            keys = set(fh.keys())
            if not {"expert_indices", "weights"} <= keys:
                raise ValueError(f"{path}: not a routing trace (needs tensors expert_indices and weights)")
            indices = fh.get_tensor("expert_indices")
            weights = fh.get_tensor("weights")
    except ValueError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: cannot read routing trace ({err})") from None
    if "num_experts" not in meta:
        raise ValueError(f"{path}: trace metadata lacks num_experts")
    extra = json.loads(meta.get("metadata", "{}") or "{}")
    return RoutingTrace(indices, weights, int(meta["num_experts"]), extra)


@torch.no_grad()
def record_trace(model: Any, batches: Iterable[Tensor], *, max_tokens: int | None = None) -> RoutingTrace:
    """Run ``model`` over batches of token ids ``[B, S]`` and record each token's experts per MoE layer.

    Tokens are ordered sequence by sequence, position by position (the order one sequence is decoded in).
    Works with any model whose forward returns ``MoEOutput`` with ``routing`` (one decision per MoE layer).
    """
    was_training = model.training
    model.eval()
    idx_parts: list[Tensor] = []
    w_parts: list[Tensor] = []
    num_experts = 0
    total = 0
    try:
        for batch in batches:
            if batch.dim() == 1:
                batch = batch.unsqueeze(0)
            device = next(model.parameters()).device
            out = model(batch.to(device))
            routing = out.routing
            if not routing:
                raise ValueError("the model has no MoE layers: nothing to trace")
            per_layer_idx = []
            per_layer_w = []
            for decision in routing:
                num_experts = decision.num_experts
                idx = torch.where(
                    decision.slot_mask, decision.expert_indices, torch.full_like(decision.expert_indices, -1)
                )
                w = torch.where(
                    decision.slot_mask, decision.combine_weights, torch.zeros_like(decision.combine_weights)
                )
                per_layer_idx.append(idx.cpu())
                per_layer_w.append(w.float().cpu())
            k = max(t.shape[1] for t in per_layer_idx)
            per_layer_idx = [torch.nn.functional.pad(t, (0, k - t.shape[1]), value=-1) for t in per_layer_idx]
            per_layer_w = [torch.nn.functional.pad(t, (0, k - t.shape[1])) for t in per_layer_w]
            idx_parts.append(torch.stack(per_layer_idx, dim=1))
            w_parts.append(torch.stack(per_layer_w, dim=1))
            total += idx_parts[-1].shape[0]
            if max_tokens is not None and total >= max_tokens:
                break
    finally:
        model.train(was_training)
    if not idx_parts:
        raise ValueError("no batches given: nothing to trace")
    k = max(t.shape[2] for t in idx_parts)
    idx_all = torch.cat([torch.nn.functional.pad(t, (0, k - t.shape[2]), value=-1) for t in idx_parts])
    w_all = torch.cat([torch.nn.functional.pad(t, (0, k - t.shape[2])) for t in w_parts])
    if max_tokens is not None:
        idx_all, w_all = idx_all[:max_tokens], w_all[:max_tokens]
    return RoutingTrace(idx_all, w_all, num_experts, {"source": type(model).__name__})
