"""Streaming datasets: read, tokenize and pack on the fly, with a seeded shuffle buffer, resumable.

For corpora larger than memory (``streaming: true``). Without shuffling, a :class:`StreamingPackedDataset`
yields exactly the sequences of :class:`moe_lab.data.datasets.PackedDataset` over the same documents, in the
same order. :class:`StreamingBatchIterator` restores its position by replaying the epoch and skipping.

Example:
    >>> from moe_lab.data.tokenizers import ByteTokenizer
    >>> ds = StreamingPackedDataset(["hello world"] * 4, ByteTokenizer(), seq_len=8, shuffle_buffer=4, seed=0)
    >>> it = StreamingBatchIterator(ds, batch_size=2, seed=0)
    >>> next(it)["input_ids"].shape
    torch.Size([2, 8])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from moe_lab.data.datasets import _ResumableBatches
from moe_lab.data.errors import DataError
from moe_lab.data.packing import SequencePacker, check_seq_len, encode_documents, is_validation_document
from moe_lab.data.tokenizers import Tokenizer

__all__ = ["StreamingBatchIterator", "StreamingPackedDataset"]

Split = Literal["train", "val", "all"]

DocumentsArg = Any  # a DocumentSource, a re-iterable of str (list), or a callable returning one


class StreamingPackedDataset(IterableDataset):
    """Packed sequences computed on the fly from a re-iterable source of documents.

    ``split`` keeps ``"train"`` or ``"val"`` documents (per :func:`is_validation_document` with
    ``val_fraction``) or ``"all"``. ``shuffle_buffer > 1`` shuffles sequences through a reservoir of that
    many sequences, seeded by ``(seed, epoch)``; 0 or 1 keeps the packing order (same sequences and order
    as :class:`PackedDataset` over the same documents). Inside a ``DataLoader`` with workers each worker
    yields every ``num_workers``-th sequence.

    Example:
        >>> from moe_lab.data.tokenizers import ByteTokenizer
        >>> ds = StreamingPackedDataset(["hello", "world"], ByteTokenizer(), seq_len=4)
        >>> [x["input_ids"].tolist() for x in ds][0]
        [104, 101, 108, 108]
    """

    def __init__(
        self,
        documents: DocumentsArg,
        tokenizer: Tokenizer,
        seq_len: int,
        *,
        split: Split = "all",
        val_fraction: float = 0.0,
        shuffle_buffer: int = 0,
        seed: int = 0,
        add_bos: bool = False,
        encode_batch_size: int = 64,
    ) -> None:
        if split not in ("train", "val", "all"):
            raise DataError(f"split must be train, val or all (got {split!r})")
        if isinstance(documents, Iterator):
            raise DataError(
                "StreamingPackedDataset needs a re-iterable source (list, DocumentSource), not an iterator"
            )
        self.documents = documents
        self.tokenizer = tokenizer
        self.seq_len = check_seq_len(seq_len)
        self.split: Split = split
        self.val_fraction = val_fraction
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.add_bos = add_bos
        self.encode_batch_size = encode_batch_size
        self.epoch = 0

    def _docs(self) -> Iterator[str]:
        source = self.documents() if callable(self.documents) else self.documents
        for doc in source:
            if self.split == "all" or is_validation_document(doc, self.val_fraction) == (self.split == "val"):
                yield doc

    def _packed(self) -> Iterator[np.ndarray]:
        packer = SequencePacker(self.tokenizer, self.seq_len, add_bos=self.add_bos)
        for ids in encode_documents(self._docs(), self.tokenizer, batch_size=self.encode_batch_size):
            yield from packer.push(ids)

    def iter_epoch(self, epoch: int = 0, seed: int | None = None) -> Iterator[np.ndarray]:
        """The sequences (int64 ``[S]`` arrays) of one pass, shuffled by ``(seed, epoch)``."""
        if self.shuffle_buffer <= 1:
            yield from self._packed()
            return
        rng = np.random.Generator(np.random.PCG64([self.seed if seed is None else seed, epoch]))
        buf: list[np.ndarray] = []
        for seq in self._packed():
            if len(buf) < self.shuffle_buffer:
                buf.append(seq)
                continue
            j = int(rng.integers(len(buf)))
            out, buf[j] = buf[j], seq
            yield out
        for j in rng.permutation(len(buf)):
            yield buf[int(j)]

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by ``__iter__`` (and therefore by a ``DataLoader``)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, seq in enumerate(self.iter_epoch(self.epoch)):
            if i % nw == wid:
                yield {"input_ids": torch.from_numpy(seq)}


class StreamingBatchIterator(_ResumableBatches):
    """Resumable batches over a :class:`StreamingPackedDataset` (position restored by skipping).

    A restore re-reads the epoch from its start and skips the sequences already consumed, so resuming
    costs re-tokenizing that part of the epoch but yields exactly the batches an uninterrupted run would.
    """

    kind = "streaming"
    state_name = "streaming data iterator"
    dataset: StreamingPackedDataset

    def _setup(self) -> None:
        self._gen: Iterator[dict[str, torch.Tensor]] | None = None

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        step = self.batch_size * self.world_size
        stream: Iterable[np.ndarray] = (
            self.dataset.iter_epoch(epoch, seed=self.seed) if self.shuffle else self.dataset._packed()
        )
        chunk: list[np.ndarray] = []
        n_batches = 0
        for seq in stream:
            chunk.append(seq)
            if len(chunk) == step:
                n_batches += 1
                if n_batches > skip:
                    yield {"input_ids": torch.from_numpy(np.stack(chunk[self.rank :: self.world_size]))}
                chunk = []
        if chunk and not self.drop_last:
            n_batches += 1
            mine = chunk[self.rank :: self.world_size]
            if n_batches > skip and mine:
                yield {"input_ids": torch.from_numpy(np.stack(mine))}
        if n_batches == 0:
            raise DataError(
                f"streaming dataset has fewer than one batch ({self.batch_size} x {self.world_size} rank(s) "
                f"of {self.dataset.seq_len} tokens) in epoch {epoch}; lower batch_size/seq_len or add data"
            )

    def __next__(self) -> dict[str, torch.Tensor]:
        while True:
            if self.epochs is not None and self.epoch >= self.epochs:
                raise StopIteration
            if self._gen is None:
                self._gen = self._epoch_batches(self.epoch, self.index)
            try:
                batch = next(self._gen)
            except StopIteration:
                self._gen = None
                self.epoch += 1
                self.index = 0
                continue
            self.index += 1
            return batch

    def _size_key(self) -> dict[str, Any]:
        return {"seq_len": self.dataset.seq_len}

    def _on_restore(self) -> None:
        self._gen = None
