"""Drop-in replacements for :class:`moe_lab.nn.experts.Experts` used at inference time.

Each module keeps the ``Experts`` interface that dispatch calls (``forward(x_ND, counts, impl)``, rows sorted
by expert, ``num_experts``) but gets the weights elsewhere:

- :class:`CachedExperts`     from an :class:`~moe_lab.inference.expert_cache.ExpertCache` (offloading);
- :class:`QuantizedExperts`  from int8/int4 weights, dequantising only the experts a call touches;
- :class:`SubsetExperts`     only a chosen subset of experts is held (selective loading).

Only experts with at least one row are touched, one plain matmul per expert: the same arithmetic as
``Experts(impl="loop")``, so outputs equal the fully loaded layer (bitwise against ``impl="loop"``).

Shape legend: N rows sorted by expert, D model dim, F expert FFN dim, E experts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lab.inference.expert_cache import ExpertCache
from moe_lab.inference.quant import QuantizedWeight, quantize_weight
from moe_lab.nn.decode_path import PAIRS_MAX_SLOTS, pairs_moe
from moe_lab.nn.router import RoutingDecision

__all__ = ["CachedExperts", "QuantizedExperts", "SubsetExperts", "expert_ffn", "grouped_ffn"]


def _activation(h1: Tensor, h3: Tensor | None) -> Tensor:
    return F.silu(h1) * h3 if h3 is not None else F.gelu(h1)


def expert_ffn(x_ND: Tensor, w1_DF: Tensor, w3_DF: Tensor | None, w2_FD: Tensor) -> Tensor:
    """One expert: SwiGLU when ``w3_DF`` is given, else exact GELU."""
    dt = x_ND.dtype
    h3 = x_ND @ w3_DF.to(dt) if w3_DF is not None else None
    return _activation(x_ND @ w1_DF.to(dt), h3) @ w2_FD.to(dt)


def _decode_sized(decision: RoutingDecision) -> bool:
    """Whether ``decode_forward`` answers this batch (at most ``PAIRS_MAX_SLOTS`` token-expert slots)."""
    return decision.expert_indices.numel() <= PAIRS_MAX_SLOTS


def _check_counts(counts: list[int], num_experts: int, rows: int) -> None:
    if len(counts) != num_experts or sum(counts) != rows:
        raise ValueError(f"counts must have {num_experts} entries summing to {rows}, got {counts}")


def grouped_ffn(
    x_ND: Tensor, counts: list[int], weights: list[tuple[Tensor, Tensor | None, Tensor] | None]
) -> Tensor:
    """The expert FFN over rows sorted by expert, with one weight triple per non-empty expert.

    The operations and their order are those of ``Experts(impl="loop")`` (up projections per block, one
    activation over all rows, down projection per block), so the result is bitwise equal to it.
    """
    blocks = x_ND.split(counts)
    used = [(xe, w) for xe, w in zip(blocks, weights) if xe.shape[0] > 0 and w is not None]
    if not used:
        return x_ND.new_zeros(0, x_ND.shape[1])

    def cat(parts: list[Tensor]) -> Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    dt = x_ND.dtype
    h1 = cat([xe @ w[0].to(dt) for xe, w in used])
    gated = used[0][1][1] is not None
    if gated:
        h = F.silu(h1) * cat([xe @ w[1].to(dt) for xe, w in used])  # type: ignore[union-attr]
    else:
        h = F.gelu(h1)
    sizes = [xe.shape[0] for xe, _ in used]
    return cat([he @ w[2].to(dt) for he, (_, w) in zip(h.split(sizes), used)])


class CachedExperts(nn.Module):
    """Experts of one MoE layer served by a bounded :class:`ExpertCache`.

    ``next_router`` (the router of the next MoE layer) enables speculative prefetching: the experts it would
    choose for this layer's router input are loaded in the background while this layer computes.
    """

    def __init__(
        self,
        cache: ExpertCache,
        layer_id: int,
        num_experts: int,
        activation: str,
        next_layer_id: int | None = None,
        next_router: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.cache = cache
        self.layer_id = layer_id
        self.num_experts = num_experts
        self.activation = activation
        self.next_layer_id = next_layer_id
        self._next_router = [next_router]  # a list: not registered as a submodule (not owned here)
        self._last_router_input: Tensor | None = None
        self._last_weights_E: Tensor | None = None

    def observe_router(self, module: nn.Module, inputs: tuple[Any, ...], decision: Any) -> None:
        """Forward hook on this layer's router: remember its input and the per-expert routing weight."""
        self._last_router_input = inputs[0].detach()
        cw = decision.combine_weights.detach()
        w = torch.where(decision.slot_mask, cw, torch.zeros_like(cw))
        self._last_weights_E = torch.zeros(self.num_experts, dtype=torch.float32).index_add_(
            0, decision.expert_indices.reshape(-1).cpu(), w.reshape(-1).float().cpu()
        )

    def _prefetch_next(self) -> None:
        router = self._next_router[0]
        if router is None or self.next_layer_id is None or self._last_router_input is None:
            return
        with torch.no_grad():
            logits = router.logits(self._last_router_input)  # type: ignore[operator]
            k = min(int(router.top_k), logits.shape[-1])  # type: ignore[arg-type]
            guess = torch.topk(logits, k, dim=-1).indices.unique().tolist()
        self.cache.prefetch(self.next_layer_id, guess)

    def decode_forward(self, x_TD: Tensor, decision: RoutingDecision) -> Tensor | None:
        """Decode-sized batches (``T * K <= PAIRS_MAX_SLOTS``): the routed output straight from the decision.

        The ``"pairs"`` loop of :func:`moe_lab.nn.decode_path.pairs_moe` over the cached experts, without the
        dispatch's sort and bookkeeping: the same bits as the fully loaded layer's decode path. Returns None
        for larger batches (the layer then dispatches and calls :meth:`forward`). The MoE layer calls it in
        eval mode only.
        """
        if not _decode_sized(decision):
            return None
        self._prefetch_next()

        def weights_for(used: dict[int, int]) -> dict[int, tuple[Tensor, Tensor | None, Tensor]]:
            self.cache.begin(self.layer_id, used)
            w = self._last_weights_E
            mats: dict[int, tuple[Tensor, Tensor | None, Tensor]] = {}
            for e, n in used.items():
                ws = self.cache.get(self.layer_id, e, float(w[e]) if w is not None else float(n))
                mats[e] = (ws["w1"], ws.get("w3"), ws["w2"])
            return mats

        return pairs_moe(x_TD, decision, weights_for, _activation)

    def forward(self, x_ND: Tensor, counts: list[int], impl: str = "auto") -> Tensor:
        _check_counts(counts, self.num_experts, x_ND.shape[0])
        self._prefetch_next()
        self.cache.begin(self.layer_id, [e for e, n in enumerate(counts) if n])
        weights: list[tuple[Tensor, Tensor | None, Tensor] | None] = []
        for e, n in enumerate(counts):
            if n == 0:
                weights.append(None)
                continue
            weight = float(self._last_weights_E[e]) if self._last_weights_E is not None else float(n)
            ws = self.cache.get(self.layer_id, e, weight=weight)
            weights.append((ws["w1"], ws.get("w3"), ws["w2"]))
        return grouped_ffn(x_ND, counts, weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer_id}, num_experts={self.num_experts}, policy={self.cache.policy_name!r}"


class QuantizedExperts(nn.Module):
    """Weight-only quantised experts (int8 per channel or int4 in groups); dequantised per touched expert."""

    def __init__(self, experts: nn.Module, bits: int = 8, group_size: int | None = None) -> None:
        super().__init__()
        self.num_experts = int(experts.num_experts)  # type: ignore[arg-type]
        self.activation = str(experts.activation)
        self.bits = bits
        self.q_w1 = quantize_weight(experts.w1_EDF, bits, group_size)  # type: ignore[arg-type]
        w3 = getattr(experts, "w3_EDF", None)
        self.q_w3 = quantize_weight(w3, bits, group_size) if w3 is not None else None
        self.q_w2 = quantize_weight(experts.w2_EFD, bits, group_size)  # type: ignore[arg-type]
        self.compute_dtype = experts.w1_EDF.dtype  # type: ignore[union-attr]
        for name, q in (("w1", self.q_w1), ("w3", self.q_w3), ("w2", self.q_w2)):
            if q is not None:
                self.register_buffer(f"{name}_q", q.data)
                self.register_buffer(f"{name}_scale", q.scale)

    def _weights(self) -> list[QuantizedWeight | None]:
        # buffers follow .to(device); rebuild the views from them
        out: list[QuantizedWeight | None] = []
        for name, q in (("w1", self.q_w1), ("w3", self.q_w3), ("w2", self.q_w2)):
            if q is None:
                out.append(None)
            else:
                out.append(
                    QuantizedWeight(
                        getattr(self, f"{name}_q"),
                        getattr(self, f"{name}_scale"),
                        q.bits,
                        q.group_size,
                        q.shape,
                    )
                )
        return out

    def forward(self, x_ND: Tensor, counts: list[int], impl: str = "auto") -> Tensor:
        _check_counts(counts, self.num_experts, x_ND.shape[0])
        q1, q3, q2 = self._weights()
        assert q1 is not None and q2 is not None
        dt = x_ND.dtype
        weights: list[tuple[Tensor, Tensor | None, Tensor] | None] = [
            (
                q1.dequantize_expert(e, dt),
                q3.dequantize_expert(e, dt) if q3 is not None else None,
                q2.dequantize_expert(e, dt),
            )
            if n > 0
            else None
            for e, n in enumerate(counts)
        ]
        return grouped_ffn(x_ND, counts, weights)

    def decode_forward(self, x_TD: Tensor, decision: RoutingDecision) -> Tensor | None:
        """Decode-sized batches: the ``"pairs"`` loop, dequantising only the experts the tokens use.

        See :meth:`CachedExperts.decode_forward`; None for larger batches.
        """
        if not _decode_sized(decision):
            return None
        q1, q3, q2 = self._weights()
        assert q1 is not None and q2 is not None
        dt = x_TD.dtype

        def weights_for(used: dict[int, int]) -> dict[int, tuple[Tensor, Tensor | None, Tensor]]:
            return {
                e: (
                    q1.dequantize_expert(e, dt),
                    q3.dequantize_expert(e, dt) if q3 is not None else None,
                    q2.dequantize_expert(e, dt),
                )
                for e in used
            }

        return pairs_moe(x_TD, decision, weights_for, _activation)

    def weight_bytes(self) -> int:
        """Bytes of the quantised weights and their scales (the buffers, wherever they were loaded)."""
        return sum(q.nbytes for q in self._weights() if q is not None)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, bits={self.bits}, activation={self.activation!r}"


class SubsetExperts(nn.Module):
    """Holds only ``keep`` experts of a layer; the router must never pick the others (counts 0)."""

    def __init__(self, experts: Any, keep: list[int]) -> None:
        super().__init__()
        self.num_experts = int(experts.num_experts)
        self.activation = str(experts.activation)
        self.keep = sorted(int(e) for e in keep)
        idx = torch.tensor(self.keep, dtype=torch.long)
        self.w1_KDF = nn.Parameter(experts.w1_EDF.detach()[idx].clone(), requires_grad=False)
        w3 = getattr(experts, "w3_EDF", None)
        self.w3_KDF = nn.Parameter(w3.detach()[idx].clone(), requires_grad=False) if w3 is not None else None
        self.w2_KFD = nn.Parameter(experts.w2_EFD.detach()[idx].clone(), requires_grad=False)
        self._slot = {e: i for i, e in enumerate(self.keep)}

    def _expert(self, e: int) -> tuple[Tensor, Tensor | None, Tensor]:
        if e not in self._slot:
            raise RuntimeError(f"expert {e} was routed to but is not loaded (loaded: {self.keep})")
        i = self._slot[e]
        return self.w1_KDF[i], self.w3_KDF[i] if self.w3_KDF is not None else None, self.w2_KFD[i]

    def forward(self, x_ND: Tensor, counts: list[int], impl: str = "auto") -> Tensor:
        _check_counts(counts, self.num_experts, x_ND.shape[0])
        weights = [self._expert(e) if n > 0 else None for e, n in enumerate(counts)]
        return grouped_ffn(x_ND, counts, weights)

    def decode_forward(self, x_TD: Tensor, decision: RoutingDecision) -> Tensor | None:
        """Decode-sized batches: the ``"pairs"`` loop over the loaded experts (None for larger batches)."""
        if not _decode_sized(decision):
            return None
        return pairs_moe(x_TD, decision, lambda used: {e: self._expert(e) for e in used}, _activation)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, loaded={len(self.keep)}"
