"""Data for moe-lab: tokenizers, document sources, packing, datasets and the bundled default corpus.

The trainer's entry point is :func:`build_datasets`::

    >>> from moe_lab.data import DataConfig, build_datasets, make_batch_iterator
    >>> cfg = DataConfig(source="default", tokenizer="byte", seq_len=128, max_bytes=200_000)
    >>> train_ds, val_ds, tok = build_datasets(cfg)
    >>> it = make_batch_iterator(train_ds, batch_size=4, seed=0)
    >>> batch = next(it)                     # {"input_ids": LongTensor[4, 128]}
    >>> state = it.state_dict()              # save with the checkpoint; it.load_state_dict(state) resumes

Conventions:

* Sequences hold exactly ``seq_len`` token ids; pass ``labels=input_ids`` (the model shifts internally).
* Documents are joined with ``eos`` after each document, concatenated and cut into ``seq_len`` chunks; the
  final partial chunk is dropped and reported (``dropped_tokens``).
* The validation split is chosen per *document* by a stable hash of its text (independent of ``seed``),
  so no document is in both splits, and identical documents land in the same split.

Public API (signatures):

* ``ByteTokenizer()``; ``HFTokenizer(tokenizer, name="bpe")``; ``train_bpe(files_or_texts, vocab_size=4096,
  *, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False) -> HFTokenizer``;
  ``load_tokenizer(path_or_name) -> Tokenizer``. Tokenizer protocol: ``name``, ``vocab_size``,
  ``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ``encode(text) -> list[int]``,
  ``encode_batch(texts) -> list[list[int]]``, ``decode(ids, skip_special_tokens=True) -> str``,
  ``save(directory) -> Path`` (writes ``directory/tokenizer.json``).
* ``DocumentSource(source, *, format="auto", text_field="text", text_unit="file", extensions=...,
  max_documents=None, max_bytes=None)``: re-iterable over documents (``str``); ``iter_documents(...)``.
* ``pack_documents(docs, tokenizer, seq_len, *, add_bos=False) -> PackedTokens``; ``split_documents``,
  ``is_validation_document``, ``encode_documents``, ``shuffle_indices``.
* ``PackedDataset`` (map-style, ``[N, S]`` int64), ``StreamingPackedDataset`` (iterable, bounded shuffle
  buffer); ``make_batch_iterator(dataset, batch_size, *, seed=0, shuffle=True, drop_last=True,
  epochs=None, rank=0, world_size=1)`` -> ``BatchIterator`` / ``StreamingBatchIterator`` with
  ``state_dict()`` / ``load_state_dict()`` for bitwise-exact resume.
* ``DataConfig`` and ``build_datasets(cfg, *, tokenizer=None, cache_dir=None) -> (train, val | None, tok)``.
* ``default_corpus(max_bytes=8_000_000, *, include_stdlib=True) -> DocumentSource``, ``default_corpus_info``.
"""

from __future__ import annotations

from moe_lab.data.build import build_datasets
from moe_lab.data.config import DataConfig
from moe_lab.data.corpus import (
    DEFAULT_CORPUS_BYTES,
    bundled_corpus_files,
    default_corpus,
    default_corpus_info,
)
from moe_lab.data.datasets import BatchIterator, PackedDataset, make_batch_iterator
from moe_lab.data.errors import DataError
from moe_lab.data.packing import (
    PackedTokens,
    encode_documents,
    is_validation_document,
    pack_documents,
    shuffle_indices,
    split_documents,
)
from moe_lab.data.sources import DEFAULT_EXTENSIONS, DocumentSource, iter_documents
from moe_lab.data.streaming import StreamingBatchIterator, StreamingPackedDataset
from moe_lab.data.tokenizers import (
    SPECIAL_TOKENS,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "DEFAULT_CORPUS_BYTES",
    "DEFAULT_EXTENSIONS",
    "SPECIAL_TOKENS",
    "BatchIterator",
    "ByteTokenizer",
    "DataConfig",
    "DataError",
    "DocumentSource",
    "HFTokenizer",
    "PackedDataset",
    "PackedTokens",
    "StreamingBatchIterator",
    "StreamingPackedDataset",
    "Tokenizer",
    "build_datasets",
    "bundled_corpus_files",
    "default_corpus",
    "default_corpus_info",
    "encode_documents",
    "is_validation_document",
    "iter_documents",
    "load_tokenizer",
    "make_batch_iterator",
    "pack_documents",
    "shuffle_indices",
    "split_documents",
    "train_bpe",
]
