"""``MoEModel``: a decoder-only language model whose FFN layers are dense or Mixture-of-Experts.

Embedding -> N x (RMSNorm -> GQA attention -> residual -> RMSNorm -> dense FFN or MoE -> residual) -> RMSNorm ->
output projection. The same code covers Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, Switch and dense models through
:class:`ModelConfig`.

Shape legend: B batch, S sequence, P cached length, D model dim, V vocabulary.

Example:
    >>> import torch
    >>> model = MoEModel(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_experts=4)
    >>> ids = torch.randint(0, 256, (2, 8))
    >>> out = model(ids, labels=ids)
    >>> out.logits.shape, len(out.routing)
    (torch.Size([2, 8, 256]), 2)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moe_lab.models.config import ModelConfig, model_config_from_args
from moe_lab.models.io import check_state_matches, load_model_dir, save_model_dir
from moe_lab.nn.eager import cached_copy, call_module, unhooked
from moe_lab.nn.huge_pages import advise_huge_pages
from moe_lab.nn.losses import (
    lm_head_cross_entropy,
    load_balancing_loss,
    next_token_targets,
    router_z_loss,
)
from moe_lab.nn.moe import MoELayer
from moe_lab.nn.router import RoutingDecision
from moe_lab.nn.transformer import (
    Attention,
    DecoderBlock,
    DenseFFN,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    build_attention_mask,
)

__all__ = ["MoEModel", "MoEOutput"]


@dataclass
class MoEOutput:
    """Result of :meth:`MoEModel.forward`.

    Attributes:
        logits: ``[B, S, V]``.
        loss: ``lm_loss + aux_loss + z_loss`` when labels were given, else None.
        lm_loss: mean next-token cross-entropy over non-ignored targets (None without labels).
        aux_loss: load-balancing loss summed over MoE layers, already times ``aux_loss_coef`` (0-dim tensor).
        z_loss: router z-loss summed over MoE layers, already times ``z_loss_coef`` (0-dim tensor).
        routing: one :class:`RoutingDecision` per MoE layer, in layer order.
        kv_cache: the updated :class:`KVCache` when ``use_cache=True`` or a cache was passed, else None.
    """

    logits: Tensor
    loss: Tensor | None = None
    lm_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    z_loss: Tensor | None = None
    routing: list[RoutingDecision] = field(default_factory=list)
    kv_cache: KVCache | None = None


class MoEModel(nn.Module):
    """Decoder LM with dense or MoE FFN layers, built from a :class:`ModelConfig` or keyword fields.

    ``MoEModel(cfg)``, ``MoEModel(vocab_size=256, num_experts=8, ...)`` or ``MoEModel(cfg, num_layers=4)``
    (fields override the config), or the leading fields by position: ``MoEModel(vocab_size, hidden_size,
    num_layers, num_heads, num_experts, experts_per_token, router_type, **more_fields)``. Family subclasses
    (``MixtralModel``, ...) supply family defaults.

    >>> MoEModel(256, 64, 2, 4, 8, 2, "top_k").config.num_experts
    8
    """

    family: ClassVar[str | None] = None
    family_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(
        self, config: ModelConfig | dict[str, Any] | int | None = None, *args: Any, **fields: Any
    ) -> None:
        super().__init__()
        cfg = model_config_from_args(config, args, fields, self.family_defaults)
        self.config = cfg
        self.gradient_checkpointing = False
        d = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.task_embed = nn.Embedding(cfg.num_tasks, d) if cfg.num_tasks > 0 else None
        blocks = []
        for i in range(cfg.num_layers):
            r = cfg.resolve_layer(i)
            attn = Attention(
                d,
                cfg.num_heads,
                cfg.kv_heads,
                cfg.effective_head_dim,
                qk_norm=cfg.qk_norm,
                qkv_bias=cfg.attention_bias,
                out_bias=cfg.attention_out_bias,
                dropout=cfg.dropout,
                rms_norm_eps=cfg.rms_norm_eps,
                layer_idx=i,
            )
            ffn: nn.Module
            if r.is_moe:
                ffn = MoELayer(
                    d,
                    r.ffn_hidden_size,
                    r.num_experts,
                    r.experts_per_token,
                    router_type=r.router_type,
                    activation=cfg.activation,
                    norm_topk_prob=cfg.norm_topk_prob,
                    capacity_factor=r.capacity_factor,
                    eval_capacity_factor=cfg.eval_capacity_factor,
                    jitter_eps=cfg.jitter_eps,
                    num_shared_experts=r.num_shared_experts,
                    shared_expert_hidden_size=cfg.shared_expert_hidden_size,
                    shared_expert_gate=cfg.shared_expert_gate,
                    bias_update_rate=cfg.bias_update_rate,
                    expert_dropout=cfg.expert_dropout,
                    init_std=cfg.init_std,
                    impl=cfg.impl,
                )
            else:
                ffn = DenseFFN(d, r.ffn_hidden_size, cfg.activation)
            blocks.append(
                DecoderBlock(
                    attn, ffn, d, is_moe=r.is_moe, rms_norm_eps=cfg.rms_norm_eps, dropout=cfg.dropout
                )
            )
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.effective_head_dim, cfg.rope_theta)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        advise_huge_pages(self)  # large CPU weights in 2 MiB pages (Linux; no-op elsewhere)

    def _apply(self, fn: Any, recurse: bool = True) -> MoEModel:
        # ``.to()``, ``.float()``, ... make new tensors: give the large CPU ones huge pages again
        super()._apply(fn, recurse)
        advise_huge_pages(self)
        return self

    # ---- construction ------------------------------------------------------------------------------
    quantization: dict[str, Any] | None = None
    """Set by :mod:`moe_lab.inference` when the experts are quantised (``bits``, ``group_size``,
    ``quantize_router``); None for a full-precision model."""

    DECODE_HEAD_MAX_BYTES = 256 << 20
    """Largest output projection that :meth:`_decode_head` keeps a transposed copy of (the copy costs as much
    memory as the projection); set the class or instance attribute to 0 to turn the copy off."""

    DECODE_HEAD_MAX_ROWS = 16
    """Most rows (batch x kept positions) that :meth:`_decode_head`'s copy serves."""

    def _decode_head(self, h_BSD: Tensor) -> Tensor | None:
        """``lm_head.weight`` transposed to ``[D, V]`` and contiguous, for up to ``DECODE_HEAD_MAX_ROWS``
        rows on CPU without autograd (greedy or sampled decoding at batch 1-16), else None.

        A matrix-vector product over the ``[V, D]`` weight reduces along its rows; over the ``[D, V]`` copy it
        accumulates whole rows with vector FMAs, which on CPU is faster for a few rows (measured, 4096 x 256
        weight, 2 threads, caches cold as in decoding: 1 row 147 -> 112 us, 8 rows 243 -> 197 us, 16 rows
        432 -> 317 us; 2026-11-29 on another host, 1 row: 0.72 -> 0.25 ms). The copy is made on first use and
        again whenever the weight changes (its storage or version counter).
        """
        head = self.lm_head
        w_VD = head.weight
        if (
            h_BSD.shape[0] * h_BSD.shape[1] > self.DECODE_HEAD_MAX_ROWS
            or w_VD.device.type != "cpu"
            or torch.is_grad_enabled()
            or type(head) is not nn.Linear
            or head.bias is not None
            or not unhooked(head)  # a hooked, compiled or traced head is called as a module
            or w_VD.dtype != h_BSD.dtype
            or w_VD.numel() * w_VD.element_size() > self.DECODE_HEAD_MAX_BYTES
            or torch.compiler.is_compiling()
        ):
            return None
        return cached_copy(self, "_decode_head_cache", [w_VD], lambda: w_VD.detach().t().contiguous())

    def _init_weights(self) -> None:
        std = self.config.init_std
        moe_ids = {id(m) for layer in self.moe_layers() for m in layer.modules()}  # MoELayer inits itself
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and id(module) not in moe_ids:
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.task_embed is not None:
            nn.init.zeros_(self.task_embed.weight)  # starts as a no-op, learns per-task router offsets

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MoEModel:
        """Build a named preset (``tiny``, ``small``, ...) with optional field overrides.

        >>> MoEModel.from_preset("tiny", num_layers=1).config.num_layers
        1
        """
        from moe_lab.models.presets import get_preset

        return cls(get_preset(name), **overrides)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> MoEModel:
        """Import a Hugging Face checkpoint (directory with ``config.json`` + safetensors) via ``moe_lab.interop``."""
        import importlib

        interop = importlib.import_module("moe_lab.interop")
        return interop.load_pretrained(path, family=cls.family, **kwargs)  # type: ignore[no-any-return]

    def save_pretrained(self, directory: str) -> None:
        """Write ``config.yaml`` + ``model.safetensors`` atomically (temp dir + rename)."""
        save_model_dir(self, directory)

    @classmethod
    def load(cls, directory: str, *, device: str | torch.device | None = None) -> MoEModel:
        """Load a directory written by :meth:`save_pretrained`."""
        cfg, state = load_model_dir(directory)
        model = cls(config=cfg)
        check_state_matches(model.state_dict(), state, str(directory))
        model.load_state_dict(state)
        return model.to(device) if device is not None else model

    # ---- introspection -----------------------------------------------------------------------------
    def blocks(self) -> list[DecoderBlock]:
        """The decoder blocks, in order."""
        return [blk for blk in self.layers if isinstance(blk, DecoderBlock)]

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers, in layer order."""
        return [blk.mlp for blk in self.blocks() if isinstance(blk.mlp, MoELayer)]

    def num_params(self) -> int:
        """Unique parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def _routed_expert_params(self, layer: MoELayer) -> int:
        return sum(p.numel() for p in layer.experts.parameters())

    def num_active_params(self, *, exclude_embeddings: bool = False) -> int:
        """Parameters used per token: everything except the routed experts a token does not select.

        Each MoE layer counts ``k / E`` of its routed-expert parameters (``k`` = experts_per_token; for the
        expert-choice router, the average experts per token). Embeddings and output projection count (as
        Mixtral and OLMoE report "active parameters"); ``exclude_embeddings=True`` leaves out the token and
        task embeddings (and the output projection when it is tied).
        """
        total = self.num_params()
        for i, blk in enumerate(self.blocks()):
            if isinstance(blk.mlp, MoELayer):
                r = self.config.resolve_layer(i)
                routed = self._routed_expert_params(blk.mlp)
                total -= routed - routed * r.experts_per_token // r.num_experts
        if exclude_embeddings:
            total -= self.embed_tokens.weight.numel()
            if self.task_embed is not None:
                total -= self.task_embed.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Forward FLOPs per token at context length ``seq_len`` (default max_seq_len).

        ``2 * N_matmul + 4 * L * S * H * Dh``: ``N_matmul`` = active parameters that take part in matrix
        multiplies (everything active except the embedding lookups and norm weights; the output projection
        counts even when tied), and the second term is attention scores plus weighted values over the full
        context (the PaLM/Chinchilla convention; a causal kernel does about half of it).
        """
        cfg = self.config
        s = cfg.max_seq_len if seq_len is None else seq_len
        n = self.num_active_params(exclude_embeddings=True)
        if cfg.tie_embeddings:
            n += self.lm_head.weight.numel()
        n -= sum(p.numel() for m in self.modules() if isinstance(m, RMSNorm) for p in m.parameters())
        attn = 4 * cfg.num_layers * s * cfg.num_heads * cfg.effective_head_dim
        return 2 * n + attn

    # ---- balancing ---------------------------------------------------------------------------------
    def update_router_biases(self, routing: list[RoutingDecision]) -> None:
        """Auxiliary-loss-free balancing: call each router's ``update_bias(tokens_per_expert)``."""
        layers = self.moe_layers()
        if len(routing) != len(layers):
            raise ValueError(f"routing has {len(routing)} decisions for {len(layers)} MoE layers")
        for layer, decision in zip(layers, routing):
            update = getattr(layer.router, "update_bias", None)
            if callable(update):
                update(decision.tokens_per_expert)

    # ---- forward -----------------------------------------------------------------------------------
    def _positions(self, mask_BK: Tensor | None, b: int, s: int, past: int, device: torch.device) -> Tensor:
        if mask_BK is None:
            return torch.arange(past, past + s, device=device)[None].expand(b, s)
        if s == 1:  # one new token: the last entry of the cumulative sum below, without the cumsum
            return (mask_BK.long().sum(-1, keepdim=True) - 1).clamp(min=0)
        pos_BK = (mask_BK.long().cumsum(-1) - 1).clamp(min=0)
        return pos_BK[:, past:]

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        position_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
        use_cache: bool = False,
        task_ids: Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> MoEOutput:
        """Run the model.

        Args:
            input_ids: ``[B, S]`` token ids (only the new tokens when ``kv_cache`` holds the past).
            attention_mask: ``[B, P + S]``, 1 = token, 0 = padding. Padding is excluded from attention,
                routing statistics and the loss; positions count only real tokens (left padding works).
            labels: ``[B, S]``, usually ``input_ids``; shifted inside; -100 is ignored.
            position_ids: ``[B, S]`` explicit rotary positions (default: from the mask, or P..P+S-1).
            kv_cache: a cache from a previous call with ``use_cache=True``.
            use_cache: return a (new or updated) cache in ``MoEOutput.kv_cache``.
            task_ids: ``[B]`` task index per row when ``num_tasks > 0`` (task-adaptive routing).
            logits_to_keep: 0 (default) = logits for every position; n > 0 = only for the last n positions
                (``logits`` is then ``[B, n, V]``; generation needs only the last). Not with ``labels``.

        In eval mode without labels, ``aux_loss`` and ``z_loss`` are zeros (the router losses are not
        computed: nothing consumes them there); ``routing`` is returned as always.
        """
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        device = input_ids.device
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(
                f"logits_to_keep must be an int >= 0 (0 = all positions), got {logits_to_keep!r}"
            )
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep needs labels=None (the loss uses the logits of every position)")
        if kv_cache is None and use_cache:
            kv_cache = KVCache(cfg.num_layers)
        past = kv_cache.get_seq_length() if kv_cache is not None else 0
        if past + s > cfg.max_seq_len:
            raise ValueError(f"sequence length {past + s} exceeds max_seq_len ({cfg.max_seq_len})")
        if attention_mask is not None and tuple(attention_mask.shape) != (b, past + s):
            raise ValueError(
                f"attention_mask must be [batch, past + seq] = {(b, past + s)}, got {tuple(attention_mask.shape)}"
            )
        token_mask_BS = None if attention_mask is None else attention_mask[:, past:].bool()
        router_bias_BSD = None
        if self.task_embed is not None:
            if task_ids is None:
                raise ValueError(f"task_ids is required: the model has num_tasks={cfg.num_tasks}")
            router_bias_BSD = self.task_embed(task_ids.to(device)).view(b, 1, -1)
        elif task_ids is not None:
            raise ValueError("task_ids given but the model has num_tasks=0")

        h_BSD = call_module(self.embed_tokens, input_ids)
        if (
            position_ids is None
            and attention_mask is None
            and device.type == "cpu"
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and unhooked(self.rotary)
        ):  # positions past .. past + s - 1 of every row: a slice of the rotary module's table (same bits)
            cos_SD, sin_SD = self.rotary.span(past, s, h_BSD.dtype)
            cos, sin = cos_SD.expand(b, s, -1), sin_SD.expand(b, s, -1)
        else:
            if position_ids is None:
                position_ids = self._positions(attention_mask, b, s, past, device)
            cos, sin = call_module(self.rotary, position_ids, h_BSD.dtype)
        mask = self._attention_mask(attention_mask, s, past, device)
        routing: list[RoutingDecision] = []
        for blk in self.layers:
            args = (h_BSD, cos, sin, mask, kv_cache, token_mask_BS, router_bias_BSD)
            if self.gradient_checkpointing and self.training and kv_cache is None:
                h_BSD, decision = checkpoint(blk, *args, use_reentrant=False)
            else:
                h_BSD, decision = call_module(blk, *args)
            if decision is not None:
                routing.append(decision)
        if logits_to_keep and logits_to_keep < s:
            h_BSD = h_BSD[:, -logits_to_keep:]
        target_BS = None if labels is None else next_token_targets(labels.to(device), token_mask_BS)
        h_BSD = call_module(self.norm, h_BSD)
        head_DV = self._decode_head(h_BSD) if target_BS is None else None
        if head_DV is not None:
            logits, lm_total = h_BSD @ head_DV, None
        else:
            logits, lm_total = lm_head_cross_entropy(self.lm_head, h_BSD, target_BS)

        if self.training or labels is not None:
            aux, z = self._router_losses(routing, logits)
        else:  # eval without labels: nothing consumes the router losses, skip their cost
            aux = z = logits.new_zeros((), dtype=torch.float32)
        out = MoEOutput(logits=logits, aux_loss=aux, z_loss=z, routing=routing, kv_cache=kv_cache)
        if target_BS is not None and lm_total is not None:
            # mean over non-ignored targets; 0 (not NaN) when every target is ignored, without a host sync
            out.lm_loss = lm_total / (target_BS != -100).sum().clamp(min=1)
            out.loss = out.lm_loss + aux + z
        return out

    @staticmethod
    def _attention_mask(mask_BK: Tensor | None, s: int, past: int, device: torch.device) -> Tensor | None:
        """``build_attention_mask``, with a cheaper equivalent for one new token on top of a cache.

        One query at position ``past`` may see every key: its mask row is the key padding mask with its own
        key forced on, and None (attend to all) when nothing is padded.
        """
        if s == 1 and past > 0:
            if mask_BK is None or bool(mask_BK[:, :-1].all()):
                return None
            keep_BK = mask_BK.to(device=device, dtype=torch.bool, copy=True)
            keep_BK[:, -1] = True
            return keep_BK[:, None, None, :]
        return build_attention_mask(mask_BK, s, past, device)

    def _router_losses(self, routing: list[RoutingDecision], like: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.config
        zero = like.new_zeros((), dtype=torch.float32)
        aux, z = zero, zero
        if cfg.aux_loss_coef > 0 and routing:
            aux = cfg.aux_loss_coef * sum((load_balancing_loss(d) for d in routing), zero)
        if cfg.z_loss_coef > 0 and routing:
            z = cfg.z_loss_coef * sum((router_z_loss(d) for d in routing), zero)
        return aux, z
