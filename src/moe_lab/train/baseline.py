"""The unigram baseline: validation cross-entropy of a model that ignores context.

A language model is worth something only when its validation loss is clearly below this number: the
entropy of the validation targets under the (add-one smoothed) unigram distribution of the training
targets, in nats/token like the LM loss.

Example:
    >>> import torch
    >>> train = torch.tensor([[0, 1, 1, 1, 1]])
    >>> round(unigram_baseline(train, train, vocab_size=2)["unigram_val_loss"], 3)
    0.182
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["target_ids", "unigram_baseline"]


def target_ids(dataset: Any, max_sequences: int | None = 50_000) -> Tensor:
    """The next-token targets (positions 1..S-1) of a dataset as one flat LongTensor; ``-100`` dropped."""
    ids = dataset if isinstance(dataset, Tensor) else getattr(dataset, "input_ids", None)
    if isinstance(ids, Tensor) and ids.ndim == 2:
        rows = ids[:max_sequences] if max_sequences else ids
        return rows[:, 1:].reshape(-1).long()
    parts = []
    for i in range(min(len(dataset), max_sequences or len(dataset))):
        item = dataset[i]
        seq = item.get("labels", item["input_ids"]) if isinstance(item, dict) else item
        seq = torch.as_tensor(seq)[1:]
        parts.append(seq[seq != -100])
    return torch.cat(parts).long() if parts else torch.zeros(0, dtype=torch.long)


def unigram_baseline(train_data: Any, val_data: Any, vocab_size: int) -> dict[str, Any]:
    """``unigram_val_loss`` (nats/token), its perplexity, and the train unigram entropy."""
    train_t = target_ids(train_data)
    val_t = target_ids(val_data)
    counts = torch.bincount(train_t, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    val_loss = float(-logp[val_t].mean()) if val_t.numel() else float("nan")
    train_entropy = float(-(logp.exp() * logp).sum())
    return {
        "unigram_val_loss": val_loss,
        "unigram_val_perplexity": math.exp(val_loss) if math.isfinite(val_loss) else None,
        "unigram_train_entropy": train_entropy,
        "baseline_tokens": int(val_t.numel()),
    }
