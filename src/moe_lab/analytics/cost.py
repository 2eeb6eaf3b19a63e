"""Cost model of an MoE decoder: FLOPs, parameters (total vs active), memory, throughput, dense comparison.

What is counted (forward, one multiply-add = 2 FLOPs, the convention of ``torch.utils.flop_counter``):

* every matrix multiply: q/k/v/o projections, the router gate, the experts a token actually uses
  (``experts_per_token`` slots per token in the dropless path, or ``expert_slots`` you pass, e.g. the kept
  slots of a real :class:`~moe_lab.nn.router.RoutingDecision`), shared experts (+ their gate), dense FFNs
  and the output projection;
* attention scores ``Q K^T`` and weighted values ``P V`` over the full key length (``4 * S * S_k * H * Dh``
  per sequence and layer; a causal kernel skips about half, ``FlopCounterMode`` does not discount it either).

Not counted: embedding lookups, norms, softmax, activations, rotary, residual adds (elementwise, < 1%).
Training = 3 x forward (backward = 2 x forward for matmuls).

Example:
    >>> from moe_lab.analytics.cost import MoECostAnalyzer
    >>> from moe_lab.models import ModelConfig
    >>> cost = MoECostAnalyzer(ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_experts=4))
    >>> cost.params().total > cost.params().active
    True
    >>> cost.forward_flops(batch=1, seq_len=16).total > 0
    True
"""

from __future__ import annotations

import math
from typing import Any

from moe_lab.analytics.cost_types import (
    CostSummary,
    DenseComparison,
    FlopBreakdown,
    MemoryEstimate,
    ParamCounts,
    ThroughputEstimate,
)
from moe_lab.analytics.hardware import (
    HARDWARE_PROFILES,
    HardwareProfile,
    get_hardware_profile,
    measure_cpu_profile,
)

__all__ = [
    "HARDWARE_PROFILES",
    "CostSummary",
    "DenseComparison",
    "FlopBreakdown",
    "HardwareProfile",
    "MemoryEstimate",
    "MoECostAnalyzer",
    "ParamCounts",
    "ThroughputEstimate",
    "dtype_bytes",
    "get_hardware_profile",
    "measure_cpu_profile",
]

_DTYPE_BYTES = {
    "fp32": 4,
    "float32": 4,
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "fp8": 1,
    "int8": 1,
}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``fp32``, ``bf16``, ``fp16``, ``fp8``/``int8``."""
    key = str(dtype).replace("torch.", "")
    if key not in _DTYPE_BYTES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPE_BYTES)}, got {dtype!r}")
    return _DTYPE_BYTES[key]


class MoECostAnalyzer:
    """Analytic costs of a :class:`moe_lab.models.ModelConfig` (no model is built).

    Args:
        config: the model config (a ``ModelConfig``, or anything with the same fields).
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        self._layers = [config.resolve_layer(i) for i in range(config.num_layers)]
        self._ffn_mult = 3 if config.activation == "swiglu" else 2

    # ------------------------------------------------------------------------------------ parameters
    def params(self) -> ParamCounts:
        """Total and active parameter counts (matches ``MoEModel.num_params()`` / ``num_active_params()``)."""
        c, m = self.config, self._ffn_mult
        d, hd, h, g = c.hidden_size, c.effective_head_dim, c.num_heads, c.kv_heads
        embedding = c.vocab_size * d + c.num_tasks * d + (0 if c.tie_embeddings else c.vocab_size * d)
        attn = d * hd * (h + 2 * g) + h * hd * d
        attn += hd * (h + 2 * g) if c.attention_bias else 0
        attn += d if c.attention_out_bias else 0
        attn += {"none": 0, "full": hd * (h + g), "per_head": 2 * hd}[c.qk_norm]
        routed = shared = dense = router = inactive = 0
        for r in self._layers:
            if r.is_moe:
                per_expert = m * d * r.ffn_hidden_size
                routed += r.num_experts * per_expert
                inactive += (
                    r.num_experts * per_expert
                    - r.num_experts * per_expert * r.experts_per_token // r.num_experts
                )
                router += r.num_experts * d
                if r.num_shared_experts:
                    shared += (
                        m * d * r.num_shared_experts * (c.shared_expert_hidden_size or r.ffn_hidden_size)
                    )
                    shared += d if c.shared_expert_gate else 0
            else:
                dense += m * d * r.ffn_hidden_size
        other = 2 * d * c.num_layers + d  # RMSNorm weights
        attention = attn * c.num_layers
        total = embedding + attention + routed + shared + dense + router + other
        return ParamCounts(
            total=total,
            active=total - inactive,
            embedding=embedding,
            attention=attention,
            routed_experts=routed,
            shared_experts=shared,
            dense_ffn=dense,
            router=router,
            other=other,
        )

    # ------------------------------------------------------------------------------------ FLOPs
    def forward_flops(
        self, batch: int, seq_len: int, *, past_len: int = 0, expert_slots: int | list[int] | None = None
    ) -> FlopBreakdown:
        """Forward FLOPs of ``batch`` sequences of ``seq_len`` new tokens (after ``past_len`` cached ones).

        ``expert_slots``: expert-token pairs computed per MoE layer (an int for all layers or one per MoE
        layer); default ``tokens * experts_per_token`` (dropless top-k). For a real batch pass the kept slots
        (``int(decision.slot_mask.sum())``), or ``E * capacity`` for the fixed-capacity layout.
        """
        c, m = self.config, self._ffn_mult
        d, hd, h, g = c.hidden_size, c.effective_head_dim, c.num_heads, c.kv_heads
        t, s_k = batch * seq_len, past_len + seq_len
        moe = [r for r in self._layers if r.is_moe]
        if isinstance(expert_slots, list) and len(expert_slots) != len(moe):
            raise ValueError(
                f"expert_slots: need one entry per MoE layer ({len(moe)}), got {len(expert_slots)}"
            )
        proj = core = router = experts = shared = dense = 0
        j = 0
        for r in self._layers:
            proj += 2 * t * d * hd * (h + 2 * g) + 2 * t * h * hd * d
            core += 4 * batch * h * seq_len * s_k * hd
            if r.is_moe:
                if expert_slots is None:
                    slots = t * r.experts_per_token
                else:
                    slots = expert_slots[j] if isinstance(expert_slots, list) else expert_slots
                j += 1
                router += 2 * t * d * r.num_experts
                experts += 2 * slots * m * d * r.ffn_hidden_size
                if r.num_shared_experts:
                    width = r.num_shared_experts * (c.shared_expert_hidden_size or r.ffn_hidden_size)
                    shared += 2 * t * m * d * width + (2 * t * d if c.shared_expert_gate else 0)
            else:
                dense += 2 * t * m * d * r.ffn_hidden_size
        return FlopBreakdown(
            attention_proj=proj,
            attention_core=core,
            router=router,
            experts=experts,
            shared_experts=shared,
            dense_ffn=dense,
            lm_head=2 * t * d * c.vocab_size,
            tokens=t,
        )

    def flops_per_token(self, seq_len: int, *, training: bool = False) -> float:
        """Forward (or training = 3 x forward) FLOPs per token at context ``seq_len``."""
        per = self.forward_flops(1, seq_len).per_token
        return 3 * per if training else per

    def training_flops(self, batch: int, seq_len: int) -> int:
        """FLOPs of one training step on ``batch x seq_len`` tokens (3 x forward)."""
        return 3 * self.forward_flops(batch, seq_len).total

    # ------------------------------------------------------------------------------------ memory
    def memory(
        self, batch: int, seq_len: int, *, dtype: str = "bf16", training: bool = True, kv_cache: bool = False
    ) -> MemoryEstimate:
        """Memory estimate in bytes.

        Weights and gradients in ``dtype``; AdamW keeps two fp32 moments plus an fp32 master copy when
        ``dtype`` is not fp32. Activations (training) are the tensors saved for backward with a fused
        attention kernel (no ``S x S`` matrix): per token and layer ``2D`` norm inputs, ``q, k, v`` and
        attention output, the router logits and per chosen slot the expert input and hidden activations
        (SwiGLU: 3F) and output; plus fp32 logits (eager PyTorch, with unfused norms and rotary, saves about
        1.5x this: measured on the tiny preset). Inference keeps only the largest layer's working set.
        KV cache: ``2 x layers x batch x seq_len x kv_heads x head_dim`` in ``dtype``.
        """
        c = self.config
        b = dtype_bytes(dtype)
        p = self.params().total
        weights = float(p * b)
        gradients = float(p * b) if training else 0.0
        optimizer = float(p * (8 + (0 if b == 4 else 4))) if training else 0.0
        d, hd, h, g = c.hidden_size, c.effective_head_dim, c.num_heads, c.kv_heads
        t = batch * seq_len
        per_layer = []
        for r in self._layers:
            a = 2 * d + hd * (2 * h + 2 * g) + d
            if r.is_moe:
                a += r.num_experts + r.experts_per_token * (d + self._ffn_mult * r.ffn_hidden_size + d)
                if r.num_shared_experts:
                    a += (
                        self._ffn_mult
                        * r.num_shared_experts
                        * (c.shared_expert_hidden_size or r.ffn_hidden_size)
                    )
            else:
                a += self._ffn_mult * r.ffn_hidden_size + d
            per_layer.append(a * t * b)
        logits = t * c.vocab_size * 4
        activations = float(sum(per_layer) + logits) if training else float(max(per_layer) + logits)
        kv = float(2 * c.num_layers * batch * seq_len * g * hd * b) if (kv_cache or not training) else 0.0
        return MemoryEstimate(
            weights=weights, gradients=gradients, optimizer=optimizer, activations=activations, kv_cache=kv
        )

    def _weight_bytes_touched(self, tokens: int, b: int) -> float:
        """Weight bytes read by one forward of ``tokens`` tokens (routed experts: expected distinct ones)."""
        pc = self.params()
        dense_part = (
            pc.total - pc.routed_experts - pc.embedding + self.config.hidden_size * self.config.vocab_size
        )
        routed = 0.0
        for r in self._layers:
            if r.is_moe:
                p_unused = (1 - r.experts_per_token / r.num_experts) ** tokens
                touched = r.num_experts * (1 - p_unused)
                routed += touched * self._ffn_mult * self.config.hidden_size * r.ffn_hidden_size
        return float((dense_part + routed) * b)

    def arithmetic_intensity(
        self, batch: int, seq_len: int, *, dtype: str = "bf16", decode: bool = False
    ) -> float:
        """FLOPs per byte moved for one forward (prefill of ``seq_len``, or one decode step at that context)."""
        return self._roofline(batch, seq_len, dtype=dtype, decode=decode)[2]

    def _roofline(
        self, batch: int, seq_len: int, *, dtype: str, decode: bool
    ) -> tuple[float, float, float, int]:
        b, c = dtype_bytes(dtype), self.config
        if decode:
            flops = float(self.forward_flops(batch, 1, past_len=seq_len - 1).total)
            tokens = batch
            kv = 2 * c.num_layers * batch * seq_len * c.kv_heads * c.effective_head_dim * b
        else:
            flops = float(self.forward_flops(batch, seq_len).total)
            tokens = batch * seq_len
            kv = 0
        act = (
            2 * tokens * c.hidden_size * b * 8 * c.num_layers
        )  # ~8 activation reads/writes of [T, D] a layer
        moved = self._weight_bytes_touched(tokens, b) + kv + act
        return flops, moved, flops / moved, tokens

    def throughput(
        self,
        hardware: str | HardwareProfile = "h100",
        batch: int = 8,
        seq_len: int = 2048,
        *,
        mode: str = "train",
        dtype: str = "bf16",
        mfu: float = 0.4,
    ) -> ThroughputEstimate:
        """Estimated tokens/s for ``mode`` ``train`` (3 x forward), ``prefill`` or ``decode``.

        ``mfu`` is the fraction of peak FLOP/s reached (0.3-0.5 is typical for training; 1.0 = the roof).
        """
        if mode not in ("train", "prefill", "decode"):
            raise ValueError(f"mode: expected 'train', 'prefill' or 'decode', got {mode!r}")
        if not 0 < mfu <= 1:
            raise ValueError(f"mfu: expected a fraction in (0, 1], got {mfu}")
        hw = get_hardware_profile(hardware)
        flops, moved, ai, tokens = self._roofline(batch, seq_len, dtype=dtype, decode=mode == "decode")
        if mode == "train":
            flops, moved = 3 * flops, 3 * moved
        t_compute = flops / (hw.peak_flops(dtype) * mfu)
        t_memory = moved / hw.memory_bandwidth
        seconds = max(t_compute, t_memory)
        mem = self.memory(batch, seq_len, dtype=dtype, training=mode == "train", kv_cache=mode != "train")
        return ThroughputEstimate(
            hardware=hw.name,
            mode=mode,
            tokens_per_s=tokens / seconds if seconds > 0 else math.inf,
            flops=flops,
            bytes=moved,
            arithmetic_intensity=ai,
            bound="compute" if t_compute >= t_memory else "memory",
            fits_in_memory=not hw.memory_bytes or mem.total <= hw.memory_bytes,
        )

    # ------------------------------------------------------------------------------------ dense
    def compare_dense(self, match: str = "active", seq_len: int = 2048) -> DenseComparison:
        """A dense model with the same ``active`` or ``total`` parameters (same width, depth, attention)."""
        if match not in ("active", "total"):
            raise ValueError(f"match: expected 'active' or 'total', got {match!r}")
        moe_layers = [r for r in self._layers if r.is_moe]
        widths = []
        for r in self._layers:
            if r.is_moe:
                experts = r.experts_per_token if match == "active" else r.num_experts
                width = experts * r.ffn_hidden_size
                width += r.num_shared_experts * (self.config.shared_expert_hidden_size or r.ffn_hidden_size)
                widths.append(width)
            else:
                widths.append(r.ffn_hidden_size)
        dense_width = (
            max(1, round(sum(widths) / len(widths))) if moe_layers else self._layers[0].ffn_hidden_size
        )
        dense_cfg = self.config.model_copy(
            update={
                "num_experts": 0,
                "dense_ffn_hidden_size": dense_width,
                "layers": None,
                "moe_layers": None,
            }
        )
        dense = MoECostAnalyzer(dense_cfg)
        return DenseComparison(
            match=match,
            dense_ffn_hidden_size=dense_width,
            moe_params=self.params(),
            dense_params=dense.params(),
            moe_flops_per_token=self.flops_per_token(seq_len),
            dense_flops_per_token=dense.flops_per_token(seq_len),
        )

    def summary(
        self, batch: int = 8, seq_len: int = 2048, *, dtype: str = "bf16", hardware: list[str] | None = None
    ) -> CostSummary:
        """All of the above for one batch shape (hardware default: the datasheet GPUs; add ``"cpu"`` to measure)."""
        names = hardware if hardware is not None else list(HARDWARE_PROFILES)
        return CostSummary(
            params=self.params(),
            forward=self.forward_flops(batch, seq_len),
            training_flops_per_token=self.flops_per_token(seq_len, training=True),
            memory=self.memory(batch, seq_len, dtype=dtype),
            throughput=[self.throughput(n, batch, seq_len, dtype=dtype) for n in names],
            dense_same_active=self.compare_dense("active", seq_len),
            dense_same_total=self.compare_dense("total", seq_len),
        )
