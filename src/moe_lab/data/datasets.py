"""Datasets of packed sequences and resumable batch iterators.

* :class:`PackedDataset`: in-memory, map-style; ``ds[i] == {"input_ids": LongTensor[S]}``.
* :class:`~moe_lab.data.streaming.StreamingPackedDataset` (in :mod:`moe_lab.data.streaming`): iterable; reads the source lazily, tokenizes and packs on the fly and
  shuffles with a bounded, seeded buffer, for corpora larger than memory.
* :func:`make_batch_iterator` -> :class:`BatchIterator` / ``StreamingBatchIterator``: yield
  ``{"input_ids": LongTensor[B, S]}``; ``state_dict()`` / ``load_state_dict()`` restore the exact position,
  so iterating after a restore yields bit-for-bit the batches an uninterrupted run would have seen.

Epoch ``e`` of a shuffled iterator uses the permutation (or shuffle-buffer stream) seeded by ``(seed, e)``.
With ``world_size > 1`` each global batch of ``batch_size * world_size`` sequences is dealt out strided:
rank ``r`` takes items ``r, r + W, ...``; all ranks share one state.

Example:
    >>> import torch
    >>> ds = PackedDataset(torch.arange(40).reshape(10, 4))
    >>> it = make_batch_iterator(ds, batch_size=2, seed=0)
    >>> first = next(it); state = it.state_dict(); second = next(it)
    >>> it2 = make_batch_iterator(ds, batch_size=2, seed=0); it2.load_state_dict(state)
    >>> torch.equal(next(it2)["input_ids"], second["input_ids"])
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from moe_lab.data.errors import DataError
from moe_lab.data.packing import PackedTokens, pack_documents, shuffle_indices
from moe_lab.data.tokenizers import Tokenizer

if TYPE_CHECKING:
    from moe_lab.data.streaming import StreamingBatchIterator

__all__ = ["BatchIterator", "PackedDataset", "make_batch_iterator"]


class PackedDataset(Dataset):
    """Packed sequences held in memory as one int64 tensor ``[N, S]``.

    Example:
        >>> from moe_lab.data.tokenizers import ByteTokenizer
        >>> ds = PackedDataset.from_documents(["hello", "world"], ByteTokenizer(), seq_len=4)
        >>> len(ds), ds[0]["input_ids"].tolist()
        (3, [104, 101, 108, 108])
    """

    def __init__(
        self,
        input_ids: torch.Tensor | np.ndarray,
        *,
        num_documents: int = 0,
        dropped_tokens: int = 0,
    ) -> None:
        ids = torch.as_tensor(np.asarray(input_ids) if isinstance(input_ids, np.ndarray) else input_ids)
        if ids.dim() != 2:
            raise DataError(
                f"PackedDataset expects a 2-D [N, S] tensor of token ids, got shape {tuple(ids.shape)}"
            )
        self.input_ids = ids.to(torch.int64).contiguous()
        self.num_documents = num_documents
        self.dropped_tokens = dropped_tokens

    @classmethod
    def from_packed(cls, packed: PackedTokens) -> PackedDataset:
        """Wrap the result of :func:`moe_lab.data.packing.pack_documents`."""
        seqs = packed.sequences.reshape(-1, packed.seq_len)
        return cls(
            torch.from_numpy(seqs), num_documents=packed.num_documents, dropped_tokens=packed.dropped_tokens
        )

    @classmethod
    def from_documents(
        cls, docs: Iterable[str], tokenizer: Tokenizer, seq_len: int, *, add_bos: bool = False
    ) -> PackedDataset:
        """Tokenize and pack ``docs`` (see :func:`moe_lab.data.packing.pack_documents`)."""
        return cls.from_packed(pack_documents(docs, tokenizer, seq_len, add_bos=add_bos))

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        """Tokens in all sequences (``N * S``)."""
        return int(self.input_ids.numel())

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index]}

    def get_batch(self, indices: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """``{"input_ids": [len(indices), S]}`` gathered in one indexing op (a fresh tensor)."""
        return {"input_ids": self.input_ids[torch.as_tensor(np.asarray(indices, dtype=np.int64))]}

    def __repr__(self) -> str:
        return f"PackedDataset(sequences={len(self)}, seq_len={self.seq_len}, documents={self.num_documents})"


def _check_common(batch_size: int, rank: int, world_size: int, seed: int) -> None:
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1 (got {batch_size})")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need 0 <= rank < world_size (got rank={rank}, world_size={world_size})")
    if seed < 0:
        raise DataError(f"seed must be >= 0 (got {seed})")


def _check_state(kind: str, state: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, want in expected.items():
        if key not in state:
            raise DataError(f"{kind} state is missing key '{key}'")
        if state[key] != want:
            raise DataError(f"{kind} state has {key}={state[key]!r} but this iterator has {key}={want!r}")


class _ResumableBatches:
    """Settings and position shared by the batch iterators, and their ``state_dict`` protocol.

    Subclasses set ``kind`` and ``state_name`` and give :meth:`_size_key` (what identifies their data).
    """

    kind = ""
    state_name = "data iterator"

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        epochs: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_common(batch_size, rank, world_size, seed)
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epochs = epochs
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.index = 0
        self._setup()

    def _setup(self) -> None:
        """Subclass state built from the settings above (called at the end of ``__init__``)."""

    def __iter__(self) -> Any:
        return self

    def _size_key(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _identity(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            **self._size_key(),
            "shuffle": self.shuffle,
        }

    def _on_restore(self) -> None:
        """Drop any state derived from the old position."""

    def state_dict(self) -> dict[str, Any]:
        """Position and identity: ``epoch``, ``index`` (batches done in the epoch), ``seed`` and sizes."""
        return {"epoch": self.epoch, "index": self.index, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`; the data and settings must match."""
        _check_state(self.state_name, state, self._identity())
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._on_restore()


class BatchIterator(_ResumableBatches):
    """Resumable batches over a map-style dataset (normally :class:`PackedDataset`).

    ``epochs=None`` iterates forever (reshuffling every epoch); ``epochs=1, shuffle=False,
    drop_last=False`` is one ordered pass (evaluation). With ``drop_last=True`` an epoch has
    ``len(dataset) // (batch_size * world_size)`` batches.
    """

    kind = "map"

    def _setup(self) -> None:
        self.num_samples = len(self.dataset)
        self._order_epoch = -1
        self._order = np.zeros(0, dtype=np.int64)
        if len(self) == 0:
            raise DataError(
                f"dataset has {self.num_samples} sequences, fewer than one batch of "
                f"{self.batch_size} x {self.world_size} rank(s); lower batch_size or seq_len, or add data"
            )

    def __len__(self) -> int:
        """Batches per epoch."""
        step = self.batch_size * self.world_size
        return self.num_samples // step if self.drop_last else -(-self.num_samples // step)

    def _indices(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = (
                shuffle_indices(self.num_samples, self.seed, epoch)
                if self.shuffle
                else np.arange(self.num_samples, dtype=np.int64)
            )
            self._order_epoch = epoch
        return self._order

    def __next__(self) -> dict[str, torch.Tensor]:
        while True:
            if self.epochs is not None and self.epoch >= self.epochs:
                raise StopIteration
            if self.index >= len(self):
                self.epoch += 1
                self.index = 0
                continue
            step = self.batch_size * self.world_size
            chunk = self._indices(self.epoch)[self.index * step : (self.index + 1) * step]
            self.index += 1
            mine = chunk[self.rank :: self.world_size]
            if mine.size == 0:  # only possible for the last partial batch with drop_last=False
                continue
            if hasattr(self.dataset, "get_batch"):
                return dict(self.dataset.get_batch(mine))
            items = [self.dataset[int(i)]["input_ids"] for i in mine]
            return {"input_ids": torch.stack(items)}

    def _size_key(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples}


def make_batch_iterator(
    dataset: Any,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    epochs: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> BatchIterator | StreamingBatchIterator:
    """The resumable batch iterator that fits ``dataset`` (map-style, or a ``StreamingPackedDataset``).

    Training: ``make_batch_iterator(train_ds, B, seed=0)`` (infinite, reshuffled per epoch).
    Evaluation: ``make_batch_iterator(val_ds, B, shuffle=False, drop_last=False, epochs=1)``.
    """
    from moe_lab.data.streaming import StreamingBatchIterator, StreamingPackedDataset

    cls: Callable[..., BatchIterator | StreamingBatchIterator]
    cls = StreamingBatchIterator if isinstance(dataset, StreamingPackedDataset) else BatchIterator
    return cls(
        dataset,
        batch_size,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        epochs=epochs,
        rank=rank,
        world_size=world_size,
    )
