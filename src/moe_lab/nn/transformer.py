"""Decoder building blocks: RMSNorm, rotary embeddings, grouped-query attention, dense FFN, block, KV cache.

The numerics follow the Hugging Face Llama-family code that Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE share, so
imported checkpoints give the same logits: RMSNorm computes in float32 and multiplies the weight after casting
back; rotary uses float32 ``inv_freq`` and the ``rotate_half`` convention; attention scales by
``head_dim ** -0.5``.

Shape legend: B batch, S query length, P cached (past) length, K key length (P + S), D model dim,
H query heads, G key/value heads, Dh head dim, F FFN hidden dim.

Example:
    >>> import torch
    >>> attn = Attention(64, num_heads=4, num_kv_heads=2)
    >>> rope = RotaryEmbedding(16)
    >>> x_BSD = torch.randn(2, 5, 64)
    >>> cos, sin = rope(torch.arange(5)[None].expand(2, 5), x_BSD.dtype)
    >>> attn(x_BSD, cos, sin).shape
    torch.Size([2, 5, 64])
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lab.nn.eager import cached_copy, call_module, unhooked  # re-exported too
from moe_lab.nn.kv_cache import KVCache  # re-exported: ``moe_lab.nn.transformer.KVCache`` stays valid
from moe_lab.nn.norm_kernels import rms_norm_train, rotary_train

__all__ = [
    "Attention",
    "DecoderBlock",
    "DenseFFN",
    "KVCache",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "build_attention_mask",
    "cached_copy",
    "call_module",
    "repeat_kv",
    "rotate_half",
    "unhooked",
]


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``weight * (x / sqrt(mean(x^2) + eps))``, computed in float32.

    >>> RMSNorm(8)(torch.ones(2, 8)).shape
    torch.Size([2, 8])
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and torch.is_grad_enabled():  # same numbers, direct backward
            return rms_norm_train(x, self.weight, self.eps)
        dtype = x.dtype
        # inference: the formula as written. torch.rms_norm gives the same bits on CPU but is slower in
        # decoding (measured in place, small preset, 2 threads: 2-4% of a batch-1 step, 7% at batch 8)
        x32 = x if dtype == torch.float32 else x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (x32 if dtype == torch.float32 else x32.to(dtype))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim (the Llama/NeoX rotary convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x_BHSD: Tensor, cos_BSD: Tensor, sin_BSD: Tensor) -> Tensor:
    """Rotate queries or keys ``[B, heads, S, Dh]`` by per-position angles ``[B, S, Dh]``."""
    cos = cos_BSD.unsqueeze(1)
    sin = sin_BSD.unsqueeze(1)
    return (x_BHSD * cos) + (rotate_half(x_BHSD) * sin)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables: ``forward(position_ids [B, S], dtype) -> (cos, sin) [B, S, Dh]``.

    ``inv_freq = 1 / theta ** (arange(0, Dh, 2) / Dh)`` in float32; angles are computed in float32 and cast
    to ``dtype`` at the end.
    """

    inv_freq: Tensor

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_parameters(self) -> None:
        """Recompute ``inv_freq`` (after building on the meta device, for example)."""
        arange = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=self.inv_freq.device).float()
        self.inv_freq = 1.0 / (self.theta ** (arange / self.head_dim))

    def forward(self, position_ids_BS: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        inv = self.inv_freq.to(device=position_ids_BS.device, dtype=torch.float32)
        freqs_BSd = position_ids_BS[..., None].float() * inv
        emb_BSD = torch.cat((freqs_BSd, freqs_BSd), dim=-1)
        return emb_BSD.cos().to(dtype), emb_BSD.sin().to(dtype)

    def span(self, start: int, length: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``cos, sin`` ``[length, Dh]`` of positions ``start .. start + length - 1``: views of a table this
        module keeps (built by :meth:`forward` itself, so the same bits: elementwise cos/sin do not depend on
        where an element sits in its tensor), grown by doubling. For decoding without autograd, where the
        formula's handful of small ops per step cost more than the arithmetic.

        >>> rot = RotaryEmbedding(8)
        >>> c, s = rot.span(3, 2, torch.float32)
        >>> ref_c, ref_s = rot(torch.tensor([[3, 4]]), torch.float32)
        >>> bool(torch.equal(c, ref_c[0]) and torch.equal(s, ref_s[0]))
        True
        """
        end = start + length
        inv = self.inv_freq
        table = self.__dict__.get("_span_table")
        if (
            table is None
            or table[0] < end
            or table[1] != dtype
            or table[2] is not inv
            or table[3] != inv._version
        ):
            size = max(end, 64, 2 * table[0] if table is not None else 0)
            with torch.no_grad():
                cos, sin = self.forward(torch.arange(size, device=inv.device)[None], dtype)
            table = self.__dict__["_span_table"] = (size, dtype, inv, inv._version, cos[0], sin[0])
        return table[4][start:end], table[5][start:end]


def repeat_kv(x_BGKD: Tensor, n_rep: int) -> Tensor:
    """Repeat each key/value head ``n_rep`` times: ``[B, G, K, Dh] -> [B, G * n_rep, K, Dh]``."""
    if n_rep == 1:
        return x_BGKD
    b, g, k, d = x_BGKD.shape
    return x_BGKD[:, :, None].expand(b, g, n_rep, k, d).reshape(b, g * n_rep, k, d)


def build_attention_mask(
    attention_mask_BK: Tensor | None, query_len: int, past_len: int, device: torch.device
) -> Tensor | None:
    """Boolean ``[B or 1, 1, S, K]`` mask (True = attend) combining causality and key padding.

    Returns None when plain causal attention without an offset suffices (``is_causal=True`` then).
    A padding query attends to itself so that its row is never empty (no NaNs); real tokens never see
    padding keys.
    """
    if attention_mask_BK is None and past_len == 0:
        return None
    key_len = past_len + query_len
    q_pos = torch.arange(past_len, key_len, device=device)[:, None]
    k_pos = torch.arange(key_len, device=device)[None, :]
    causal_SK = k_pos <= q_pos
    if attention_mask_BK is None:
        return causal_SK[None, None]
    keep_BK = attention_mask_BK.to(device=device, dtype=torch.bool)
    diag_SK = k_pos == q_pos
    return (causal_SK[None] & (keep_BK[:, None, :] | diag_SK[None]))[:, None]


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and optional QK-norm.

    Args:
        hidden_size: model dim D.
        num_heads: query heads H.
        num_kv_heads: key/value heads G (H must be a multiple of G); None = H.
        head_dim: Dh; None = D // H.
        qk_norm: "none"; "full" = RMSNorm over all projected q (H*Dh) and k (G*Dh) before the head split
            (OLMoE); "per_head" = RMSNorm over Dh per head (Qwen3-MoE).
        qkv_bias: bias on the q/k/v projections (Qwen2-MoE). out_bias: bias on the output projection.
        dropout: attention-probability dropout in training.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        qk_norm: str = "none",
        qkv_bias: bool = False,
        out_bias: bool = False,
        dropout: float = 0.0,
        rms_norm_eps: float = 1e-6,
        layer_idx: int = 0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
            )
        if head_dim is None and hidden_size % num_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}), or give head_dim"
            )
        self.head_dim = head_dim or hidden_size // num_heads
        self.layer_idx = layer_idx
        self.dropout = dropout
        self.qk_norm = qk_norm
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, q_out, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, kv_out, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, kv_out, bias=qkv_bias)
        self.o_proj = nn.Linear(q_out, hidden_size, bias=out_bias)
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        if qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(q_out, rms_norm_eps), RMSNorm(kv_out, rms_norm_eps)
        elif qk_norm == "per_head":
            self.q_norm, self.k_norm = (
                RMSNorm(self.head_dim, rms_norm_eps),
                RMSNorm(self.head_dim, rms_norm_eps),
            )
        elif qk_norm != "none":
            raise ValueError(f"qk_norm must be 'none', 'full' or 'per_head', got {qk_norm!r}")

    def forward(
        self,
        x_BSD: Tensor,
        cos_BSD: Tensor,
        sin_BSD: Tensor,
        mask_B1SK: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        b, s, _ = x_BSD.shape
        if s == 1 and kv_cache is not None and not self.training and not torch.compiler.is_compiling():
            return self._decode_step(x_BSD, cos_BSD, sin_BSD, mask_B1SK, kv_cache)
        q, k, v = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        q_BSHD, k_BSGD = self._split_heads_qk(q, k, b, s)
        # with autograd: the same rotary numbers, a backward without cat/slice buffers (cos/sin constant)
        grad = torch.is_grad_enabled() and not (cos_BSD.requires_grad or sin_BSD.requires_grad)
        rotary = rotary_train if grad else apply_rotary
        q_BHSD = rotary(q_BSHD.transpose(1, 2), cos_BSD, sin_BSD)
        k_BGSD = rotary(k_BSGD.transpose(1, 2), cos_BSD, sin_BSD)
        v_BGSD = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        is_causal = mask_B1SK is None and (kv_cache is None or kv_cache.get_seq_length(self.layer_idx) == 0)
        if kv_cache is not None:
            k_BGSD, v_BGSD = kv_cache.update(self.layer_idx, k_BGSD, v_BGSD)
        n_rep = self.num_heads // self.num_kv_heads
        dev = x_BSD.device.type
        fp32_cpu = dev == "cpu" and grad and torch.is_autocast_enabled(dev)
        with torch.autocast(dev, enabled=False) if fp32_cpu else contextlib.nullcontext():
            if fp32_cpu:  # CPU autocast training: float32 SDPA (its bfloat16 backward is 1.4x slower)
                q_BHSD, k_BGSD, v_BGSD = q_BHSD.float(), k_BGSD.float(), v_BGSD.float()
            # enable_gqa: SDPA reads each key/value group for its n_rep query heads (no repeat_kv copies)
            out_BHSD = F.scaled_dot_product_attention(
                q_BHSD,
                k_BGSD,
                v_BGSD,
                attn_mask=mask_B1SK,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal and s > 1,
                scale=self.head_dim**-0.5,
                enable_gqa=n_rep > 1,
            )
        return self.o_proj(out_BHSD.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))

    def _split_heads_qk(self, q_BSX: Tensor, k_BSY: Tensor, b: int, s: int) -> tuple[Tensor, Tensor]:
        """Projected queries/keys ``[B, S, H*Dh]`` / ``[B, S, G*Dh]`` -> per head, with the QK-norm applied."""
        if self.qk_norm == "full":
            assert self.q_norm is not None and self.k_norm is not None
            q_BSX, k_BSY = self.q_norm(q_BSX), self.k_norm(k_BSY)
        q_BSHD = q_BSX.view(b, s, self.num_heads, self.head_dim)
        k_BSGD = k_BSY.view(b, s, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "per_head":
            assert self.q_norm is not None and self.k_norm is not None
            q_BSHD, k_BSGD = self.q_norm(q_BSHD), self.k_norm(k_BSGD)
        return q_BSHD, k_BSGD

    def _fused_qkv(self) -> tuple[Tensor, Tensor | None]:
        """The q/k/v weights concatenated and transposed to ``[D, q_out + 2 * kv_out]`` (and the biases
        concatenated), for gradient-free decoding: one matmul, not three, and in the layout whose
        matrix-vector product is fastest on CPU (``x @ w`` accumulates rows of ``w`` with vector FMAs; over
        ``[out, in]`` each output is a reduction: 1.4x slower for one row, measured).

        A cached copy (one more set of q/k/v weights in memory, never in the state dict), rebuilt when any
        of them changes: another tensor (load, ``.to``) or an in-place update (optimizer step, ``copy_``).
        """
        projs = (self.q_proj, self.k_proj, self.v_proj)
        params = [t for m in projs for t in (m.weight, m.bias) if t is not None]

        def build() -> tuple[Tensor, Tensor | None]:
            w = torch.cat([m.weight for m in projs]).detach().t().contiguous()
            bias = None if self.q_proj.bias is None else torch.cat([m.bias for m in projs]).detach()
            return w, bias

        return cached_copy(self, "_qkv_cache", params, build)

    def _decode_step(
        self, x_B1D: Tensor, cos_B1D: Tensor, sin_B1D: Tensor, mask_B11K: Tensor | None, kv_cache: KVCache
    ) -> Tensor:
        """One new token per row on top of ``kv_cache`` (eval): the general path's numbers, fewer ops.

        Without autograd the q/k/v projections are one matmul (:meth:`_fused_qkv`).
        With one position, rotary is applied in the projection layout ``[B, 1, heads, Dh]`` (the angles
        broadcast over heads), to queries and keys at once and without transposed copies. SDPA reads each
        key/value group for its query heads itself (``enable_gqa``, bit-identical to ``repeat_kv`` on CPU),
        so the cache is never copied per head; the cache writes in place when it has a ``capacity``.
        """
        b = x_B1D.shape[0]
        h, g, dh = self.num_heads, self.num_kv_heads, self.head_dim
        if torch.is_grad_enabled():  # keep the graph to the separate weights
            qkv = torch.cat((self.q_proj(x_B1D), self.k_proj(x_B1D), self.v_proj(x_B1D)), -1)
        else:
            w_DN, bias_N = self._fused_qkv()
            qkv = (
                x_B1D @ w_DN
                if bias_N is None
                else torch.addmm(bias_N, x_B1D.view(b, -1), w_DN).view(b, 1, -1)
            )
        qk, v = qkv[..., : (h + g) * dh], qkv[..., (h + g) * dh :]
        if self.q_norm is not None:
            q_B1HD, k_B1GD = self._split_heads_qk(qk[..., : h * dh], qk[..., h * dh :], b, 1)
            qk_B1ND = torch.cat((q_B1HD, k_B1GD), 2)
        else:
            qk_B1ND = qk.view(b, 1, h + g, dh)
        # queries and keys rotated together: one set of elementwise ops for both (same numbers per element)
        qk_B1ND = qk_B1ND * cos_B1D[:, :, None] + rotate_half(qk_B1ND) * sin_B1D[:, :, None]
        k_BGKD, v_BGKD = kv_cache.update(
            self.layer_idx, qk_B1ND[:, :, h:].transpose(1, 2), v.view(b, 1, g, dh).transpose(1, 2)
        )
        out_BH1D = F.scaled_dot_product_attention(
            qk_B1ND[:, :, :h].transpose(1, 2),
            k_BGKD,
            v_BGKD,
            attn_mask=mask_B11K,
            scale=dh**-0.5,
            enable_gqa=h != g,
        )
        return call_module(self.o_proj, out_BH1D.transpose(1, 2).reshape(b, 1, h * dh))


class DenseFFN(nn.Module):
    """Dense feed-forward: SwiGLU ``down(silu(gate(x)) * up(x))`` or GELU ``down(gelu(up(x)))``."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "swiglu") -> None:
        super().__init__()
        if activation not in ("swiglu", "gelu"):
            raise ValueError(f"activation must be 'swiglu' or 'gelu', got {activation!r}")
        self.activation = activation
        self.gate_proj = (
            nn.Linear(hidden_size, ffn_hidden_size, bias=False) if activation == "swiglu" else None
        )
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x_BSD: Tensor) -> Tensor:
        if self.gate_proj is not None:
            return self.down_proj(F.silu(self.gate_proj(x_BSD)) * self.up_proj(x_BSD))
        return self.down_proj(F.gelu(self.up_proj(x_BSD)))


class DecoderBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); y = h + ffn(norm(h))``.

    ``ffn`` is a :class:`DenseFFN` or an MoE layer whose forward returns ``(y, RoutingDecision)``
    (``is_moe=True``); the block returns ``(y_BSD, decision or None)``.
    """

    def __init__(
        self,
        attention: Attention,
        ffn: nn.Module,
        hidden_size: int,
        *,
        is_moe: bool,
        rms_norm_eps: float = 1e-6,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, rms_norm_eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(hidden_size, rms_norm_eps)
        self.mlp = ffn
        self.is_moe = is_moe
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x_BSD: Tensor,
        cos_BSD: Tensor,
        sin_BSD: Tensor,
        mask_B1SK: Tensor | None = None,
        kv_cache: KVCache | None = None,
        token_mask_BS: Tensor | None = None,
        router_bias_BSD: Tensor | None = None,
    ) -> tuple[Tensor, object | None]:
        normed = call_module(self.input_layernorm, x_BSD)
        attn = call_module(self.self_attn, normed, cos_BSD, sin_BSD, mask_B1SK, kv_cache)
        drop = self.training and self.resid_dropout.p > 0  # skip the no-op dropout calls in eval
        h_BSD = x_BSD + (self.resid_dropout(attn) if drop else attn)
        n_BSD = call_module(self.post_attention_layernorm, h_BSD)
        decision = None
        if self.is_moe:
            router_in = None if router_bias_BSD is None else n_BSD + router_bias_BSD
            y_BSD, decision = call_module(
                self.mlp, n_BSD, token_mask_BS=token_mask_BS, router_input_BSD=router_in
            )
        else:
            y_BSD = call_module(self.mlp, n_BSD)
        return h_BSD + (self.resid_dropout(y_BSD) if drop else y_BSD), decision
