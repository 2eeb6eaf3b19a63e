"""Datasets and batch iterators: shapes, shuffling, exact resume, streaming == in-memory, sharding."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from moe_lab.data import (
    BatchIterator,
    ByteTokenizer,
    DataError,
    PackedDataset,
    StreamingBatchIterator,
    StreamingPackedDataset,
    make_batch_iterator,
    shuffle_indices,
    split_documents,
)


def _docs(n: int = 120, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["expert", "router", "token", "layer", "🙂", "naïve", "def", "return", "\n"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def _take(it, k: int) -> list[torch.Tensor]:
    return [next(it)["input_ids"] for _ in range(k)]


@pytest.fixture
def ds() -> PackedDataset:
    return PackedDataset.from_documents(_docs(), ByteTokenizer(), seq_len=16)


def test_packed_dataset_items(ds: PackedDataset) -> None:
    assert len(ds) > 50 and ds.seq_len == 16
    item = ds[3]["input_ids"]
    assert item.dtype == torch.int64 and item.shape == (16,)
    assert ds.num_tokens == len(ds) * 16
    with pytest.raises(DataError, match="2-D"):
        PackedDataset(torch.zeros(5, dtype=torch.int64))


def test_batch_iterator_matches_reference_permutation(ds: PackedDataset) -> None:
    it = BatchIterator(ds, batch_size=4, seed=7)
    per_epoch = len(ds) // 4
    assert len(it) == per_epoch
    got = _take(it, per_epoch + 2)  # crosses into epoch 1
    for e, start, batch in [
        (0, 0, got[0]),
        (0, per_epoch - 1, got[per_epoch - 1]),
        (1, 1, got[per_epoch + 1]),
    ]:
        idx = shuffle_indices(len(ds), 7, e)[start * 4 : start * 4 + 4]
        assert torch.equal(batch, torch.stack([ds[int(i)]["input_ids"] for i in idx]))
    assert it.epoch == 1


def test_shuffle_deterministic_per_seed(ds: PackedDataset) -> None:
    a = torch.cat(_take(BatchIterator(ds, 4, seed=1), 5))
    b = torch.cat(_take(BatchIterator(ds, 4, seed=1), 5))
    c = torch.cat(_take(BatchIterator(ds, 4, seed=2), 5))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("k", [0, 1, 5, 13, 29])
def test_resume_gives_identical_remaining_batches(ds: PackedDataset, k: int) -> None:
    ref = _take(BatchIterator(ds, 4, seed=3), 40)  # several epochs
    it = BatchIterator(ds, 4, seed=3)
    _take(it, k)
    state = it.state_dict()
    fresh = BatchIterator(ds, 4, seed=3)
    fresh.load_state_dict(state)
    rest = _take(fresh, 40 - k)
    assert all(torch.equal(x, y) for x, y in zip(ref[k:], rest))


def test_resume_state_mismatch_is_an_error(ds: PackedDataset) -> None:
    it = BatchIterator(ds, 4, seed=3)
    state = it.state_dict()
    with pytest.raises(DataError, match="seed=3 but this iterator has seed=4"):
        BatchIterator(ds, 4, seed=4).load_state_dict(state)
    with pytest.raises(DataError, match="batch_size"):
        BatchIterator(ds, 2, seed=3).load_state_dict(state)


def test_eval_pass_covers_everything_once(ds: PackedDataset) -> None:
    it = make_batch_iterator(ds, 5, shuffle=False, drop_last=False, epochs=1)
    batches = list(it)
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), ds.input_ids)


def test_world_size_partitions_each_global_batch(ds: PackedDataset) -> None:
    ranks = [BatchIterator(ds, 3, seed=5, rank=r, world_size=2) for r in range(2)]
    single = BatchIterator(ds, 6, seed=5)
    for _ in range(4):
        parts = [next(r)["input_ids"] for r in ranks]
        whole = next(single)["input_ids"]
        assert torch.equal(parts[0], whole[0::2]) and torch.equal(parts[1], whole[1::2])


def test_too_small_dataset_errors() -> None:
    small = PackedDataset(torch.zeros(3, 8, dtype=torch.int64))
    with pytest.raises(DataError, match="fewer than one batch"):
        BatchIterator(small, 4)


def test_streaming_unshuffled_equals_in_memory() -> None:
    docs = _docs(80, seed=1)
    tok = ByteTokenizer()
    mem = PackedDataset.from_documents(docs, tok, seq_len=12)
    stream = StreamingPackedDataset(docs, tok, seq_len=12)
    seqs = torch.stack([x["input_ids"] for x in stream])
    assert torch.equal(seqs, mem.input_ids)  # same sequences, same order


def test_streaming_shuffled_same_multiset_and_seeded() -> None:
    docs = _docs(80, seed=2)
    tok = ByteTokenizer()
    mem = PackedDataset.from_documents(docs, tok, seq_len=12)
    sh = StreamingPackedDataset(docs, tok, seq_len=12, shuffle_buffer=16, seed=4)
    a = [tuple(s.tolist()) for s in sh.iter_epoch(0)]
    assert Counter(a) == Counter(tuple(r) for r in mem.input_ids.tolist())
    assert a != [tuple(r) for r in mem.input_ids.tolist()]
    assert a == [tuple(s.tolist()) for s in sh.iter_epoch(0)]
    assert a != [tuple(s.tolist()) for s in sh.iter_epoch(1)]


def test_streaming_split_matches_in_memory_split() -> None:
    docs = _docs(300, seed=3)
    tok = ByteTokenizer()
    train_docs, val_docs = split_documents(docs, 0.2)
    for split, part in [("train", train_docs), ("val", val_docs)]:
        s = StreamingPackedDataset(docs, tok, seq_len=10, split=split, val_fraction=0.2)
        m = PackedDataset.from_documents(part, tok, seq_len=10)
        assert torch.equal(torch.stack([x["input_ids"] for x in s]), m.input_ids)


@pytest.mark.parametrize("k", [0, 3, 11])
def test_streaming_iterator_resume(k: int) -> None:
    docs = _docs(10, seed=4)
    ds = StreamingPackedDataset(docs, ByteTokenizer(), seq_len=32, shuffle_buffer=10, seed=1)
    it = make_batch_iterator(ds, 4, seed=1)
    assert isinstance(it, StreamingBatchIterator)
    ref = _take(make_batch_iterator(ds, 4, seed=1), 25)  # > 1 epoch
    _take(it, k)
    fresh = make_batch_iterator(ds, 4, seed=1)
    fresh.load_state_dict(it.state_dict())
    rest = _take(fresh, 25 - k)
    assert all(torch.equal(x, y) for x, y in zip(ref[k:], rest))
    assert fresh.epoch >= 1


def test_streaming_world_size_partitions_each_global_batch() -> None:
    ds = StreamingPackedDataset(_docs(30, seed=6), ByteTokenizer(), seq_len=8, shuffle_buffer=8, seed=2)
    ranks = [make_batch_iterator(ds, 3, seed=2, rank=r, world_size=2) for r in range(2)]
    single = make_batch_iterator(ds, 6, seed=2)
    for _ in range(5):
        parts = [next(r)["input_ids"] for r in ranks]
        whole = next(single)["input_ids"]
        assert torch.equal(parts[0], whole[0::2]) and torch.equal(parts[1], whole[1::2])


def test_streaming_dataloader_workers_cover_everything() -> None:
    docs = _docs(40, seed=5)
    ds = StreamingPackedDataset(docs, ByteTokenizer(), seq_len=8)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    got = Counter(tuple(x["input_ids"].tolist()) for x in loader)
    want = Counter(tuple(x["input_ids"].tolist()) for x in ds)
    assert got == want


def test_streaming_errors() -> None:
    with pytest.raises(DataError, match="re-iterable"):
        StreamingPackedDataset(iter(["a"]), ByteTokenizer(), seq_len=4)
    tiny = StreamingPackedDataset(["ab"], ByteTokenizer(), seq_len=4)
    with pytest.raises(DataError, match="fewer than one batch"):
        next(make_batch_iterator(tiny, 2))
    assert list(tiny.iter_epoch()) == []  # "ab" + eos is shorter than one sequence
    assert np.array_equal(
        next(StreamingPackedDataset(["abc"], ByteTokenizer(), 4).iter_epoch()), [97, 98, 99, 257]
    )
