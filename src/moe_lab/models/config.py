"""``ModelConfig``: the validated description of a moe-lab decoder language model (the ``model:`` section).

Every field is documented right under it. Invalid combinations raise :class:`moe_lab.config.ConfigError`
naming the key (``experts_per_token``, ``num_kv_heads``, ...).

Example:
    >>> cfg = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_experts=4)
    >>> cfg.moe_layer_indices()
    [0, 1]
    >>> ModelConfig(num_experts=4, experts_per_token=8)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ConfigError: experts_per_token: ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from moe_lab.config import Config

if TYPE_CHECKING:
    from moe_lab.models.model import MoEModel

__all__ = [
    "POSITIONAL_FIELDS",
    "ROUTER_TYPES",
    "LayerSpec",
    "ModelConfig",
    "ResolvedLayer",
    "model_config_from_args",
]

ROUTER_TYPES = ("top_k", "switch", "expert_choice", "sigmoid_bias")
RouterType = Literal["top_k", "switch", "expert_choice", "sigmoid_bias"]


class LayerSpec(Config):
    """Per-layer override used by ``ModelConfig.layers`` / :class:`moe_lab.models.CustomMoE`.

    Unset (None) fields inherit the model-wide value.
    """

    kind: Literal["dense", "moe"] = "moe"
    """"dense" = a dense FFN in this layer, "moe" = an MoE layer."""
    router_type: RouterType | None = None
    """Router of this MoE layer."""
    num_experts: int | None = Field(default=None, ge=1)
    """Routed experts of this MoE layer."""
    experts_per_token: int | None = Field(default=None, ge=1)
    """Top-k of this MoE layer."""
    ffn_hidden_size: int | None = Field(default=None, ge=1)
    """Expert FFN width (MoE layer) or dense FFN width (dense layer)."""
    capacity_factor: float | None = Field(default=None, gt=0)
    """Capacity factor of this MoE layer."""
    num_shared_experts: int | None = Field(default=None, ge=0)
    """Shared (always-on) experts of this MoE layer."""


@dataclass(frozen=True)
class ResolvedLayer:
    """The effective FFN settings of one layer after applying defaults and per-layer overrides."""

    is_moe: bool
    ffn_hidden_size: int
    num_experts: int = 0
    experts_per_token: int = 0
    router_type: str = "top_k"
    capacity_factor: float | None = None
    num_shared_experts: int = 0


class ModelConfig(Config):
    """Architecture of a decoder-only (MoE) language model. See ``docs/concepts/models.md``."""

    vocab_size: int = Field(default=256, ge=1)
    """Number of token ids (256 for the byte tokenizer)."""
    hidden_size: int = Field(default=64, ge=1)
    """Model width D."""
    num_layers: int = Field(default=2, ge=1)
    """Decoder blocks."""
    num_heads: int = Field(default=4, ge=1)
    """Query heads H."""
    num_kv_heads: int | None = Field(default=None, ge=1)
    """Key/value heads G for grouped-query attention; None = num_heads (multi-head attention)."""
    head_dim: int | None = Field(default=None, ge=2)
    """Per-head width; None = hidden_size // num_heads (Qwen3-MoE and OLMoE may use another value)."""
    ffn_hidden_size: int = Field(default=128, ge=1)
    """Hidden width F of each routed expert."""
    dense_ffn_hidden_size: int | None = Field(default=None, ge=1)
    """Hidden width of dense-FFN layers; None = 4 * hidden_size. Use ffn_hidden_size * experts_per_token
    for a dense model with the same active compute as an MoE one."""
    num_experts: int = Field(default=4, ge=0)
    """Routed experts E per MoE layer; 0 = a dense model."""
    experts_per_token: int = Field(default=2, ge=1)
    """Experts chosen per token (top-k). The switch router uses 1."""
    router_type: RouterType = "top_k"
    """"top_k" (softmax, Mixtral/OLMoE/Qwen), "switch" (top-1 with capacity), "expert_choice",
    "sigmoid_bias" (sigmoid scores + auxiliary-loss-free bias balancing, DeepSeek-V3 style)."""
    norm_topk_prob: bool = True
    """Renormalise the top-k probabilities to sum to 1 (Mixtral: yes; OLMoE, Qwen1.5-MoE: no)."""
    moe_layers: list[int] | None = None
    """Explicit 0-based indices of the MoE layers; overrides moe_layer_frequency / moe_layer_offset."""
    moe_layer_frequency: int = Field(default=1, ge=0)
    """1 = every layer is MoE; N = layer i is MoE when i % N == moe_layer_offset; 0 = all dense."""
    moe_layer_offset: int = Field(default=0, ge=0)
    """See moe_layer_frequency (Hugging Face ``decoder_sparse_step=N`` is offset N - 1)."""
    layers: list[LayerSpec] | None = None
    """Per-layer overrides (one entry per layer, see LayerSpec); when set, decides which layers are MoE."""
    num_shared_experts: int = Field(default=0, ge=0)
    """Always-on shared experts added to every MoE layer (Qwen2-MoE, DeepSeek)."""
    shared_expert_hidden_size: int | None = Field(default=None, ge=1)
    """Hidden width of the shared expert(s); None = ffn_hidden_size."""
    shared_expert_gate: bool = False
    """Scale the shared expert output by sigmoid(x @ w) (Qwen2-MoE)."""
    activation: Literal["swiglu", "gelu"] = "swiglu"
    """FFN activation of experts and dense layers."""
    capacity_factor: float | None = Field(default=None, gt=0)
    """Expert capacity = capacity_factor * tokens * k / E in training; None = dropless."""
    eval_capacity_factor: float | None = Field(default=None, gt=0)
    """Capacity factor in eval mode; None = same rule as capacity_factor."""
    jitter_eps: float = Field(default=0.0, ge=0)
    """Multiplicative uniform noise on router inputs in training (Switch)."""
    aux_loss_coef: float = Field(default=0.01, ge=0)
    """Weight of the load-balancing loss (summed over MoE layers) in ``loss``."""
    z_loss_coef: float = Field(default=0.001, ge=0)
    """Weight of the router z-loss (summed over MoE layers) in ``loss``."""
    bias_update_rate: float = Field(default=1e-3, ge=0)
    """Step size of the auxiliary-loss-free bias update (sigmoid_bias router)."""
    expert_dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout inside experts in training."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Attention-probability and residual dropout in training."""
    max_seq_len: int = Field(default=2048, ge=1)
    """Longest sequence (prompt + generated) the model accepts."""
    rope_theta: float = Field(default=10000.0, gt=0)
    """Rotary base theta (Mixtral, Qwen: 1e6; OLMoE: 1e4)."""
    rms_norm_eps: float = Field(default=1e-6, gt=0)
    """RMSNorm epsilon (Mixtral, OLMoE: 1e-5; Qwen: 1e-6)."""
    qk_norm: Literal["none", "full", "per_head"] = "none"
    """"full" = RMSNorm over all projected q/k (OLMoE); "per_head" = over head_dim (Qwen3-MoE)."""
    attention_bias: bool = False
    """Bias on the q/k/v projections (Qwen2-MoE)."""
    attention_out_bias: bool = False
    """Bias on the attention output projection (rare; Qwen3/OLMoE with attention_bias=True)."""
    tie_embeddings: bool = False
    """Share the token embedding and output projection weights."""
    init_std: float = Field(default=0.02, gt=0)
    """Std of the normal initialisation of linear and embedding weights."""
    num_tasks: int = Field(default=0, ge=0)
    """> 0 adds a task embedding added to every router's input (task-adaptive routing, ``task_ids=``)."""
    impl: str = "auto"
    """Expert dispatch implementation passed to MoELayer ("auto", or one the nn layer lists)."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        from moe_lab.nn.dispatch import DISPATCH_IMPLS

        if self.impl not in DISPATCH_IMPLS:
            raise ValueError(f"impl: must be one of {list(DISPATCH_IMPLS)}, got {self.impl!r}")
        d, h = self.hidden_size, self.num_heads
        if self.head_dim is None and d % h:
            raise ValueError(
                f"num_heads: hidden_size ({d}) must be divisible by num_heads ({h}) or set head_dim"
            )
        if self.head_dim is not None and self.head_dim % 2:
            raise ValueError(f"head_dim: must be even for rotary embeddings (got {self.head_dim})")
        if self.head_dim is None and (d // h) % 2:
            raise ValueError(f"num_heads: head dim hidden_size/num_heads = {d // h} must be even (rotary)")
        kv = self.num_kv_heads or h
        if h % kv:
            raise ValueError(f"num_kv_heads: num_heads ({h}) must be divisible by num_kv_heads ({kv})")
        if self.moe_layer_frequency and self.moe_layer_offset >= self.moe_layer_frequency:
            raise ValueError(
                f"moe_layer_offset: must be < moe_layer_frequency ({self.moe_layer_frequency}), "
                f"got {self.moe_layer_offset}"
            )
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"moe_layers: indices must be in [0, {self.num_layers}), got {bad}")
        if self.layers is not None and len(self.layers) != self.num_layers:
            raise ValueError(f"layers: needs one entry per layer ({self.num_layers}), got {len(self.layers)}")
        for i in range(self.num_layers):
            r = self.resolve_layer(i)
            where = f"layers[{i}]." if self.layers is not None else ""
            if not r.is_moe:
                continue
            if r.num_experts < 1:
                raise ValueError(f"{where}num_experts: an MoE layer needs at least 1 expert (layer {i})")
            if r.experts_per_token > r.num_experts:
                raise ValueError(
                    f"{where}experts_per_token: top-k ({r.experts_per_token}) > num_experts ({r.num_experts})"
                )
            if r.router_type == "switch" and r.experts_per_token != 1:
                raise ValueError(
                    f"{where}experts_per_token: the switch router is top-1, got {r.experts_per_token}"
                )
            if self.shared_expert_gate and r.num_shared_experts == 0:
                raise ValueError(f"shared_expert_gate: needs num_shared_experts >= 1 (layer {i} has none)")
            if r.router_type == "sigmoid_bias" and r.capacity_factor is not None:
                raise ValueError(
                    f"{where}capacity_factor: the sigmoid_bias router is dropless; leave it unset"
                )
            if r.router_type in ("expert_choice", "sigmoid_bias"):
                for key in ("eval_capacity_factor", "jitter_eps"):
                    if getattr(self, key):
                        raise ValueError(
                            f"{key}: applies to the top_k and switch routers, not {r.router_type!r}"
                        )
        return self

    # ---- derived values ----------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        """Effective key/value heads."""
        return self.num_kv_heads or self.num_heads

    @property
    def effective_head_dim(self) -> int:
        """Effective per-head width."""
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def effective_dense_ffn_hidden_size(self) -> int:
        """Width of dense FFN layers (dense_ffn_hidden_size or 4 * hidden_size)."""
        return self.dense_ffn_hidden_size or 4 * self.hidden_size

    def _default_is_moe(self, i: int) -> bool:
        if self.num_experts == 0:
            return False
        if self.moe_layers is not None:
            return i in self.moe_layers
        if self.moe_layer_frequency == 0:
            return False
        return i % self.moe_layer_frequency == self.moe_layer_offset

    def resolve_layer(self, i: int) -> ResolvedLayer:
        """Effective FFN settings of layer ``i`` (dense or MoE, with per-layer overrides applied)."""
        spec = self.layers[i] if self.layers is not None else None
        is_moe = spec.kind == "moe" if spec is not None else self._default_is_moe(i)
        if not is_moe:
            width = spec.ffn_hidden_size if spec is not None and spec.ffn_hidden_size else None
            return ResolvedLayer(is_moe=False, ffn_hidden_size=width or self.effective_dense_ffn_hidden_size)

        def pick(name: str) -> Any:
            value = getattr(spec, name, None) if spec is not None else None
            return getattr(self, name) if value is None else value

        return ResolvedLayer(
            is_moe=True,
            ffn_hidden_size=pick("ffn_hidden_size"),
            num_experts=pick("num_experts"),
            experts_per_token=pick("experts_per_token"),
            router_type=pick("router_type"),
            capacity_factor=pick("capacity_factor"),
            num_shared_experts=pick("num_shared_experts"),
        )

    def moe_layer_indices(self) -> list[int]:
        """0-based indices of the MoE layers."""
        return [i for i in range(self.num_layers) if self.resolve_layer(i).is_moe]

    def build(self) -> MoEModel:
        """Build the model (``MoEModel(self)``)."""
        from moe_lab.models.model import MoEModel

        return MoEModel(self)


POSITIONAL_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_experts",
    "experts_per_token",
    "router_type",
)
"""The fields ``MoEModel`` takes by position, in order."""


def model_config_from_args(
    config: Any, args: tuple[Any, ...], fields: dict[str, Any], defaults: dict[str, Any]
) -> ModelConfig:
    """The :class:`ModelConfig` of ``MoEModel(config, *args, **fields)``: a config or dict (fields override
    it), or the leading fields by position (:data:`POSITIONAL_FIELDS`); ``defaults`` are a family's.

    >>> model_config_from_args(256, (64, 2, 4, 8, 2, "top_k"), {}, {}).num_experts
    8
    """
    fields = dict(fields)
    if isinstance(config, int) and not isinstance(config, bool):
        args, config = (config, *args), None  # the fields by position, from vocab_size
    elif args:
        raise TypeError("MoEModel(config, ...): further fields must be keywords")
    if len(args) > len(POSITIONAL_FIELDS):
        raise TypeError(
            f"MoEModel takes at most {len(POSITIONAL_FIELDS)} positional fields "
            f"({', '.join(POSITIONAL_FIELDS)}), got {len(args)}"
        )
    for name, value in zip(POSITIONAL_FIELDS, args):
        if name in fields:
            raise TypeError(f"MoEModel got {name!r} both by position and by keyword")
        fields[name] = value
    if config is None:
        return ModelConfig(**{**defaults, **fields})
    if isinstance(config, dict):
        return ModelConfig(**{**defaults, **config, **fields})
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig or a dict, got {type(config).__name__}")
    return ModelConfig(**{**config.to_dict(), **fields}) if fields else config
