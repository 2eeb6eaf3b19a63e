"""Autoregressive generation for :class:`moe_lab.models.MoEModel`: greedy, temperature, top-k, top-p.

Batched prompts are left-padded (the model takes positions from the attention mask, so a padded row gives the
same tokens as the row alone). With ``use_cache=True`` (default) the prompt is run once and each step feeds only
the new token through the KV cache.

Shape legend: B batch, S prompt length (padded), V vocabulary.

Example:
    >>> import torch
    >>> from moe_lab.models import MoEModel
    >>> model = MoEModel.from_preset("tiny")
    >>> out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=4)
    >>> [len(t) for t in out.new_tokens], out.finish_reason
    ([4, 4], ['length', 'length'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from pydantic import Field
from torch import Tensor

from moe_lab.config import Config
from moe_lab.nn.kv_cache import KVCache
from moe_lab.nn.router import RoutingDecision

if TYPE_CHECKING:
    from moe_lab.models.model import MoEModel

__all__ = ["GenerationConfig", "GenerationOutput", "filter_logits", "generate", "sample_next_token"]


class _Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class GenerationConfig(Config):
    """Decoding settings (every field can also be passed to :func:`generate` as a keyword)."""

    max_new_tokens: int = Field(default=32, ge=0)
    """Most tokens to generate per row (also capped by the model's max_seq_len)."""
    temperature: float = Field(default=0.0, ge=0)
    """0 = greedy (argmax); > 0 = sample from softmax(logits / temperature)."""
    top_k: int | None = Field(default=None, ge=1)
    """Sample only among the k most likely tokens (None = no limit)."""
    top_p: float | None = Field(default=None, gt=0, le=1)
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p (None = off)."""
    seed: int | None = None
    """Seed of the sampling generator (reproducible sampling); None = torch's global RNG."""
    eos_token_id: int | None = None
    """End-of-sequence token: a row stops after producing it (the token is kept)."""
    stop_token_ids: list[int] = Field(default_factory=list)
    """More token ids that stop a row (kept, like eos)."""
    stop_strings: list[str] = Field(default_factory=list)
    """Stop a row when its decoded new text contains one of these (needs ``tokenizer=``)."""
    pad_token_id: int | None = Field(default=0, ge=0)
    """Id used for left padding of list prompts and after a row has finished (None = 0)."""
    use_cache: bool = True
    """Use the KV cache (False recomputes the whole sequence every step; same tokens, slower)."""
    return_routing: bool = False
    """Keep each step's routing decisions (detached) in ``GenerationOutput.routing``."""


@dataclass
class GenerationOutput:
    """What :func:`generate` returns.

    Attributes:
        sequences: ``[B, S + n]`` the (left-padded) prompts followed by the generated tokens; rows that
            finished early are filled with ``pad_token_id``.
        new_tokens: per row, the generated token ids (up to and including a stop/eos token).
        finish_reason: per row, ``"stop"`` (eos, stop id or stop string) or ``"length"``.
        attention_mask: ``[B, S + n]``, 1 for prompt and generated tokens, 0 for padding.
        routing: when ``return_routing``: per step, one detached RoutingDecision per MoE layer (the first
            step covers the whole prompt); else None.
    """

    sequences: Tensor
    new_tokens: list[list[int]]
    finish_reason: list[str]
    attention_mask: Tensor
    routing: list[list[RoutingDecision]] | None = None


def filter_logits(logits_BV: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set logits outside the top-k / top-p (nucleus) sets to -inf; the most likely token always stays."""
    out = logits_BV.clone()
    if top_k is not None and top_k < out.shape[-1]:
        kth_B1 = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = torch.sort(out, dim=-1, descending=True)
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        before_BV = probs_BV.cumsum(-1) - probs_BV  # probability mass strictly before each token
        drop_BV = before_BV >= top_p
        drop_BV[..., 0] = False
        out = out.masked_fill(drop_BV.scatter(-1, order_BV, drop_BV), float("-inf"))
    return out


def sample_next_token(
    logits_BV: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token per row ``[B]``: argmax when ``temperature == 0``, else a filtered sample."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(filter_logits(logits_BV.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def _prepare_prompts(
    input_ids: Tensor | Sequence[int] | Sequence[Sequence[int]], attention_mask: Tensor | None, pad: int
) -> tuple[Tensor, Tensor]:
    if isinstance(input_ids, Tensor):
        ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq] or [seq], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids {tuple(ids.shape)}")
        return ids.long(), mask.long().to(ids.device)
    seq = list(input_ids)
    rows: list[list[int]]
    if seq and all(isinstance(t, int) for t in seq):
        rows = [[int(t) for t in seq]]  # type: ignore[call-overload]
    else:
        rows = [[int(t) for t in r] for r in seq]  # type: ignore[attr-defined]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    if attention_mask is not None:
        raise ValueError("attention_mask is built from list prompts; pass it only with a tensor input_ids")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


@torch.inference_mode()
def generate(
    model: MoEModel,
    input_ids: Tensor | Sequence[int] | Sequence[Sequence[int]],
    *,
    config: GenerationConfig | None = None,
    attention_mask: Tensor | None = None,
    tokenizer: _Decoder | None = None,
    task_ids: Tensor | None = None,
    **settings: Any,
) -> GenerationOutput:
    """Generate continuations of one or more prompts.

    Args:
        model: an :class:`~moe_lab.models.MoEModel` (anything with its ``forward`` and ``config.max_seq_len``).
        input_ids: ``[B, S]`` / ``[S]`` tensor (left-padded, with ``attention_mask``), or token-id lists
            (padded here on the left with ``pad_token_id``).
        config: a :class:`GenerationConfig`; keyword ``settings`` override its fields
            (``max_new_tokens=``, ``temperature=``, ``top_k=``, ``top_p=``, ``seed=``, ``eos_token_id=``,
            ``stop_token_ids=``, ``stop_strings=``, ``use_cache=``, ``return_routing=``, ``pad_token_id=``).
        attention_mask: ``[B, S]`` 1 = token, 0 = left padding (tensor input only).
        tokenizer: anything with ``decode(list[int]) -> str``; needed for ``stop_strings``.
        task_ids: ``[B]`` task ids for task-adaptive routing models.

    Raises:
        ValueError: a prompt longer than the model's ``max_seq_len``, an empty prompt, ``stop_strings``
            without a tokenizer.

    Example:
        >>> # out = generate(model, tok.encode("Once"), max_new_tokens=20, temperature=0.8, top_p=0.9, seed=0)
    """
    cfg = config or GenerationConfig()
    if settings:
        cfg = GenerationConfig(**{**cfg.to_dict(), **settings})
    if cfg.stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs a tokenizer (pass tokenizer=... with a decode method)")
    max_len = int(model.config.max_seq_len)
    device = next(model.parameters()).device
    pad_id = cfg.pad_token_id or 0
    ids, mask = _prepare_prompts(input_ids, attention_mask, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    b, s = ids.shape
    if s > max_len:
        raise ValueError(f"prompt length {s} exceeds the model's max_seq_len ({max_len})")
    if task_ids is not None:
        task_ids = task_ids.to(device)

    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed)
    stop_ids = set(cfg.stop_token_ids) | ({cfg.eos_token_id} if cfg.eos_token_id is not None else set())
    new_tokens: list[list[int]] = [[] for _ in range(b)]
    reasons: list[str | None] = [None] * b
    done_B = torch.zeros(b, dtype=torch.bool, device=device)
    routing: list[list[RoutingDecision]] | None = [] if cfg.return_routing else None

    steps = min(cfg.max_new_tokens, max_len - s)
    # preallocated [B, S + steps] token and mask buffers: a step writes one column (no torch.cat copies)
    ids_buf = torch.full((b, s + steps), pad_id, dtype=ids.dtype, device=device)
    mask_buf = torch.zeros((b, s + steps), dtype=mask.dtype, device=device)
    ids_buf[:, :s], mask_buf[:, :s] = ids, mask
    width = s
    any_done = False
    # no padding anywhere (the usual case): the model needs no mask (positions 0.., plain causal
    # attention), which spares building one per step; a row that stops early brings the mask back
    padded = not bool(mask.all())
    # per-row stop checks need each step's tokens on the host; without stop conditions they are read once
    check_stops = bool(stop_ids or cfg.stop_strings)
    was_training = model.training
    model.eval()
    try:
        # the KV cache is allocated once at its final length: decode steps write in place, never concatenate
        cache = KVCache(int(model.config.num_layers), capacity=s + steps) if cfg.use_cache else None
        step_ids = ids
        for _ in range(steps):
            step_mask = mask_buf[:, :width] if padded or any_done else None
            if cache is not None:
                out = model(
                    step_ids,
                    attention_mask=step_mask,
                    kv_cache=cache,
                    use_cache=True,
                    task_ids=task_ids,
                    logits_to_keep=1,
                )
            else:
                out = model(ids_buf[:, :width], attention_mask=step_mask, task_ids=task_ids, logits_to_keep=1)
            if routing is not None:
                routing.append([d.detach() for d in out.routing])
            logits_BV = out.logits[:, -1, :]
            next_B = sample_next_token(
                logits_BV if logits_BV.dtype == torch.float32 else logits_BV.float(),
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                generator=generator,
            )
            if any_done:
                next_B = next_B.masked_fill(done_B, pad_id)
                mask_buf[:, width] = (~done_B).long()
            else:
                mask_buf[:, width] = 1
            ids_buf[:, width] = next_B
            width += 1
            step_ids = ids_buf[:, width - 1 : width]
            if not check_stops:
                continue
            for i, tok in enumerate(next_B.tolist()):
                if reasons[i] is not None:
                    continue
                new_tokens[i].append(tok)
                if tok in stop_ids or (
                    cfg.stop_strings
                    and tokenizer is not None
                    and any(st in tokenizer.decode(new_tokens[i]) for st in cfg.stop_strings)
                ):
                    reasons[i] = "stop"
                    done_B[i] = True
                    any_done = True
            if any_done and all(r is not None for r in reasons):
                break
    finally:
        model.train(was_training)
    ids, mask = ids_buf[:, :width].contiguous(), mask_buf[:, :width].contiguous()
    if not check_stops:  # nothing stopped early: every row's new tokens are the generated columns
        new_tokens = ids[:, s:].tolist()
    finish = [r or "length" for r in reasons]
    return GenerationOutput(
        sequences=ids, new_tokens=new_tokens, finish_reason=finish, attention_mask=mask, routing=routing
    )
