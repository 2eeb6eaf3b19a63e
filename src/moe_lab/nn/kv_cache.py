"""Per-layer key/value cache for incremental decoding (used by :class:`moe_lab.nn.transformer.Attention`).

Shape legend: B batch, G key/value heads, P cached (past) length, S new positions, Dh head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache"]


class KVCache:
    """Per-layer key/value tensors ``[B, G, P, Dh]`` for incremental decoding.

    The model creates one when called with ``use_cache=True`` and returns it in ``MoEOutput.kv_cache``;
    pass it back with ``kv_cache=...`` together with only the new tokens. ``keys[i]`` / ``values[i]`` are
    the cached tensors of layer i. Without autograd, once a layer's cache is longer than
    ``concat_max_numel`` elements they are views into buffers that grow geometrically, so a decode step
    writes its new positions in place instead of copying the whole cache (``torch.cat``).

    ``capacity`` (positions): when the final length is known (``generate`` knows prompt + new tokens),
    the buffers are allocated at that size on the first update and never regrow or concatenate; a longer
    sequence still works (the buffers then grow as above).

    >>> cache = KVCache(num_layers=2, capacity=16)
    >>> k, v = cache.update(0, torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4))
    >>> cache.get_seq_length(), cache.keys[0].shape, cache._key_buf[0].shape
    (5, torch.Size([1, 2, 5, 4]), torch.Size([1, 2, 16, 4]))
    """

    concat_max_numel = 1 << 16
    """Caches up to this many elements per layer tensor grow by ``torch.cat`` (cheaper than the buffer
    bookkeeping while they are short); larger ones move to the growing buffers."""

    def __init__(self, num_layers: int, capacity: int | None = None) -> None:
        if capacity is not None and capacity < 0:
            raise ValueError(f"capacity must be >= 0 or None, got {capacity}")
        self.capacity = capacity
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        # growth buffers [B, G, capacity, Dh]; used only while keys[i] is still the view handed out last
        self._key_buf: list[Tensor | None] = [None] * num_layers
        self._value_buf: list[Tensor | None] = [None] * num_layers
        self._key_view: list[Tensor | None] = [None] * num_layers
        self._value_view: list[Tensor | None] = [None] * num_layers

    def __len__(self) -> int:
        return len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached positions (P)."""
        k = self.keys[layer_idx]
        return 0 if k is None else int(k.shape[-2])

    def _fits(self, layer_idx: int, old_k: Tensor, old_v: Tensor, new_k: Tensor, new_v: Tensor) -> bool:
        """The layer's buffers hold ``old_k``/``old_v`` (the views handed out last) and have room for the new."""
        kb, vb = self._key_buf[layer_idx], self._value_buf[layer_idx]
        return (
            kb is not None
            and vb is not None
            and old_k is self._key_view[layer_idx]
            and old_v is self._value_view[layer_idx]
            and old_k.shape[-2] + new_k.shape[-2] <= kb.shape[-2]
            and new_k.shape[:-2] == kb.shape[:-2]
            and new_v.shape[:-2] == vb.shape[:-2]
            and new_k.dtype == kb.dtype
            and new_v.dtype == vb.dtype
        )

    def update(self, layer_idx: int, k_BGSD: Tensor, v_BGSD: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys/values for one layer; return all keys/values ``[B, G, P + S, Dh]``."""
        old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
        grad = k_BGSD.requires_grad or v_BGSD.requires_grad
        small = self.capacity is None and (
            old_k is None or old_k.numel() + k_BGSD.numel() <= self.concat_max_numel
        )
        if grad or (small and self._key_buf[layer_idx] is None):
            if old_k is not None and old_v is not None:  # autograd or a short cache: plain concatenation
                k_BGSD = torch.cat((old_k, k_BGSD), dim=-2)
                v_BGSD = torch.cat((old_v, v_BGSD), dim=-2)
            self.keys[layer_idx], self.values[layer_idx] = k_BGSD, v_BGSD
            self._key_buf[layer_idx] = self._value_buf[layer_idx] = None
            self._key_view[layer_idx] = self._value_view[layer_idx] = None
            return k_BGSD, v_BGSD
        p = 0 if old_k is None else old_k.shape[-2]
        s = k_BGSD.shape[-2]
        if old_k is None or old_v is None or not self._fits(layer_idx, old_k, old_v, k_BGSD, v_BGSD):
            cap = p + s + max(64, (p + s) // 2)  # geometric growth: amortised O(1) copy per position
            if self.capacity is not None and p + s <= self.capacity:
                cap = self.capacity  # the known final length: allocated once
            new_kb = k_BGSD.new_empty((*k_BGSD.shape[:-2], cap, k_BGSD.shape[-1]))
            new_vb = v_BGSD.new_empty((*v_BGSD.shape[:-2], cap, v_BGSD.shape[-1]))
            if old_k is not None and old_v is not None:
                new_kb.narrow(-2, 0, p).copy_(old_k)
                new_vb.narrow(-2, 0, p).copy_(old_v)
            self._key_buf[layer_idx], self._value_buf[layer_idx] = new_kb, new_vb
        kb, vb = self._key_buf[layer_idx], self._value_buf[layer_idx]
        assert kb is not None and vb is not None
        kb.narrow(-2, p, s).copy_(k_BGSD)
        vb.narrow(-2, p, s).copy_(v_BGSD)
        k_all, v_all = kb.narrow(-2, 0, p + s), vb.narrow(-2, 0, p + s)
        self.keys[layer_idx], self.values[layer_idx] = k_all, v_all
        self._key_view[layer_idx], self._value_view[layer_idx] = k_all, v_all
        return k_all, v_all

    def select(self, batch_index: Tensor) -> KVCache:
        """A cache keeping only the rows ``batch_index`` (e.g. to drop finished sequences)."""
        out = KVCache(len(self), self.capacity)
        out.keys = [None if k is None else k.index_select(0, batch_index) for k in self.keys]
        out.values = [None if v is None else v.index_select(0, batch_index) for v in self.values]
        return out
