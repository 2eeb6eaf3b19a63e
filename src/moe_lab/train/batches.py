"""Turn training data into shuffled, resumable ``[B, S]`` batches.

Accepted data: an indexable dataset whose items are ``[S]`` LongTensors or dicts with ``input_ids``
(optionally ``labels``, ``attention_mask``, and an integer ``task_ids`` per item), such as the datasets of :mod:`moe_lab.data`; a ``[N, S]``
LongTensor; or a list of token-id lists (unequal lengths are right-padded and masked).

The order is a per-epoch permutation drawn from its own generator (``seed + epoch``), so the position
``(epoch, index)`` is all that is needed to resume exactly; the global RNGs are not touched.

Example:
    >>> import torch
    >>> it = BatchIterator(as_dataset(torch.arange(40).view(10, 4)), batch_size=4, seed=0)
    >>> next(it)["input_ids"].shape
    torch.Size([4, 4])
    >>> it.state_dict()["position"]
    4
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchIterator", "as_dataset", "collate", "eval_batches", "is_indexable", "make_train_iterator"]


def is_indexable(data: Any) -> bool:
    """True for map-style data (``len`` and ``[i]``); False for streaming (iterable-only) datasets."""
    return hasattr(data, "__len__") and hasattr(data, "__getitem__")


class _PaddedLists:
    """Variable-length token lists, right-padded with 0 and masked (labels -100 on padding)."""

    def __init__(self, seqs: Sequence[Sequence[int]]) -> None:
        self.seqs = [torch.as_tensor(list(s), dtype=torch.long) for s in seqs]
        self.max_len = max(len(s) for s in self.seqs)

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        s = self.seqs[i]
        n = s.numel()
        ids = torch.zeros(self.max_len, dtype=torch.long)
        ids[:n] = s
        mask = torch.zeros(self.max_len, dtype=torch.long)
        mask[:n] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def as_dataset(data: Any, *, name: str = "train_data") -> Any:
    """Normalise the accepted data kinds to an indexable dataset of ``[S]`` items (or dicts)."""
    if isinstance(data, Tensor):
        if data.ndim != 2 or data.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(
                f"{name}: expected a [N, S] integer tensor, got {tuple(data.shape)} {data.dtype}"
            )
        if data.shape[0] == 0 or data.shape[1] < 2:
            raise ValueError(
                f"{name}: needs at least 1 sequence of at least 2 tokens, got {tuple(data.shape)}"
            )
        return data.long()
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError(f"{name} is empty")
        if all(isinstance(x, Tensor) for x in data):
            return list(data)
        try:
            lengths = {len(s) for s in data}
        except TypeError:
            raise ValueError(f"{name}: expected a list of token-id lists") from None
        if min(lengths) < 2:
            raise ValueError(f"{name}: every sequence needs at least 2 tokens")
        if len(lengths) == 1:
            return torch.as_tensor([list(s) for s in data], dtype=torch.long)
        return _PaddedLists(data)
    if is_indexable(data):
        if len(data) == 0:
            raise ValueError(f"{name} is empty (0 sequences); use more text or a shorter data.seq_len")
        return data
    if _is_streaming(data):
        return data
    raise ValueError(
        f"{name}: expected a dataset with __len__/__getitem__, a streaming dataset of moe_lab.data, a [N, S] "
        f"LongTensor or a list of token-id lists, got {type(data).__name__}"
    )


def _is_streaming(data: Any) -> bool:
    from moe_lab.data import StreamingPackedDataset

    return isinstance(data, StreamingPackedDataset)


def make_train_iterator(dataset: Any, batch_size: int, *, seed: int) -> Any:
    """:class:`BatchIterator` for map-style data; the data package's resumable streaming iterator for a
    ``StreamingPackedDataset`` (same ``state_dict``/``load_state_dict``/``epoch`` protocol)."""
    if is_indexable(dataset):
        return BatchIterator(dataset, batch_size, seed=seed)
    from moe_lab.data import make_batch_iterator

    return make_batch_iterator(dataset, batch_size, seed=seed)


def _task_ids(items: list[Any]) -> Tensor:
    """The items' ``task_ids`` (one integer each) as a ``[B]`` int64 tensor."""
    out = []
    for i, it in enumerate(items):
        t = torch.as_tensor(it["task_ids"]) if "task_ids" in it else None
        if t is None or t.numel() != 1 or t.is_floating_point() or t.dtype == torch.bool:
            got = "no task_ids" if t is None else f"{tuple(t.shape)} {t.dtype}"
            raise ValueError(
                f"dataset item {i} of the batch: 'task_ids' must be one integer per item (as in item 0), "
                f"got {got}"
            )
        out.append(t.reshape(()).long())
    return torch.stack(out)


def collate(items: list[Any]) -> dict[str, Tensor]:
    """Stack items (tensors or dicts) into a batch dict with ``input_ids`` (and ``labels``...).

    Dict items may carry ``task_ids``: one integer each (task-adaptive routing), stacked to ``[B]`` int64.

    Example:
        >>> b = collate([{"input_ids": torch.arange(4), "task_ids": 1}, {"input_ids": torch.arange(4), "task_ids": 0}])
        >>> b["input_ids"].shape, b["task_ids"].tolist()
        (torch.Size([2, 4]), [1, 0])
    """
    first = items[0]
    if isinstance(first, Tensor):
        ids = torch.stack([t.long() for t in items])
        return {"input_ids": ids}
    if isinstance(first, dict):
        batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in first if k != "task_ids"}
        if "task_ids" in first:
            batch["task_ids"] = _task_ids(items)
        return batch
    raise ValueError(f"dataset items must be tensors or dicts, got {type(first).__name__}")


class BatchIterator:
    """Endless shuffled batches over epochs; ``state_dict()`` is the exact position."""

    def __init__(
        self, dataset: Any, batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_last: bool = True
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        n = len(dataset)
        if drop_last and n < batch_size:
            raise ValueError(
                f"the training set has {n} sequences, fewer than batch_size={batch_size}; use a smaller "
                "train.batch_size, a shorter data.seq_len or more text"
            )
        self._order: Tensor | None = None

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _perm(self) -> Tensor:
        if self._order is None:
            n = len(self.dataset)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._order = torch.randperm(n, generator=g)
            else:
                self._order = torch.arange(n)
        return self._order

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        n = len(self.dataset)
        end = self.position + self.batch_size
        if self.position >= n or (self.drop_last and end > n):
            self.epoch += 1
            self.position = 0
            self._order = None
            end = self.batch_size
        idx = self._perm()[self.position : min(end, n)].tolist()
        self.position = min(end, n)
        return collate([self.dataset[i] for i in idx])

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_sequences": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("num_sequences", len(self.dataset))) != len(self.dataset):
            raise ValueError(
                f"the training data changed since the checkpoint: {state['num_sequences']} sequences then, "
                f"{len(self.dataset)} now"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state.get("seed", self.seed))
        self._order = None


def eval_batches(
    dataset: Any, batch_size: int, max_batches: int | None = None
) -> Iterator[dict[str, Tensor]]:
    """Batches in order, the last one possibly smaller; at most ``max_batches``."""
    if not is_indexable(dataset):
        from moe_lab.data import make_batch_iterator

        it = make_batch_iterator(dataset, batch_size, shuffle=False, drop_last=False, epochs=1)
        for count, batch in enumerate(it):
            if max_batches is not None and count >= max_batches:
                return
            yield batch
        return
    n = len(dataset)
    for count, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and count >= max_batches:
            return
        yield collate([dataset[i] for i in range(start, min(start + batch_size, n))])
