"""``build_datasets``: from a :class:`DataConfig` to ``(train_ds, val_ds, tokenizer)``.

Example:
    >>> from moe_lab.data import DataConfig, build_datasets
    >>> cfg = DataConfig(source="default", seq_len=64, max_bytes=300_000, val_fraction=0.1)
    >>> train, val, tok = build_datasets(cfg)
    >>> train[0]["input_ids"].shape, tok.name
    (torch.Size([64]), 'byte')
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from moe_lab.data.config import DataConfig
from moe_lab.data.corpus import DEFAULT_CORPUS_BYTES, default_corpus
from moe_lab.data.datasets import PackedDataset
from moe_lab.data.errors import DataError
from moe_lab.data.packing import is_validation_document, split_documents
from moe_lab.data.sources import DocumentSource
from moe_lab.data.streaming import StreamingPackedDataset
from moe_lab.data.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer, train_bpe

__all__ = ["build_datasets", "make_source", "resolve_tokenizer"]

log = logging.getLogger(__name__)


def make_source(cfg: DataConfig) -> DocumentSource:
    """The :class:`DocumentSource` that ``cfg`` describes (the default corpus for ``source: default``)."""
    if cfg.source == "default":
        max_bytes = DEFAULT_CORPUS_BYTES if cfg.max_bytes is None else cfg.max_bytes
        return default_corpus(max_bytes, max_documents=cfg.max_documents)
    return DocumentSource(
        cfg.source,
        format=cfg.format,
        text_field=cfg.text_field,
        text_unit=cfg.text_unit,
        extensions=cfg.extensions,
        max_documents=cfg.max_documents,
        max_bytes=cfg.max_bytes,
    )


def _capped(docs: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    used = 0
    for doc in docs:
        if max_bytes is not None and used >= max_bytes:
            return
        used += len(doc.encode("utf-8", errors="surrogatepass"))
        yield doc


def resolve_tokenizer(
    cfg: DataConfig, train_docs: Iterable[str], cache_dir: str | Path | None = None
) -> Tokenizer:
    """``byte``, a tokenizer file, or BPE trained on ``train_docs`` (cached in ``cache_dir`` by content)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer != "bpe":
        return load_tokenizer(cfg.tokenizer)
    texts = list(_capped(train_docs, cfg.bpe_train_bytes))
    cache_file = None
    if cache_dir is not None:
        h = hashlib.blake2b(digest_size=12)
        h.update(f"bpe-v1|{cfg.bpe_vocab_size}|{cfg.bpe_min_frequency}|{len(texts)}|".encode())
        for t in texts:
            h.update(t.encode("utf-8", errors="surrogatepass"))
            h.update(b"\x00")
        cache_file = Path(cache_dir) / f"bpe-{h.hexdigest()}" / "tokenizer.json"
        if cache_file.is_file():
            log.info("using cached BPE tokenizer %s", cache_file)
            return load_tokenizer(cache_file)
    tok = train_bpe(texts, cfg.bpe_vocab_size, min_frequency=cfg.bpe_min_frequency)
    if cache_file is not None:
        tok.save(cache_file.parent)
    return tok


def _too_short(split: str, n_docs: int, n_tokens: int, cfg: DataConfig) -> DataError:
    return DataError(
        f"{split} split of {cfg.source} has {n_docs} documents / {n_tokens} tokens, fewer than one sequence of "
        f"seq_len={cfg.seq_len}; add data or lower seq_len"
    )


def build_datasets(
    cfg: DataConfig, *, tokenizer: Tokenizer | str | Path | None = None, cache_dir: str | Path | None = None
) -> tuple[Any, Any, Tokenizer]:
    """Read, split, tokenize and pack: ``(train_ds, val_ds or None, tokenizer)``.

    ``tokenizer`` (an object, ``"byte"`` or a tokenizer.json path) overrides ``cfg.tokenizer``: pass the run
    directory's tokenizer when resuming. With ``cfg.tokenizer == "bpe"`` a tokenizer is trained on the train
    split only (cached under ``cache_dir`` when given). ``val_ds`` is None when ``val_fraction == 0``.
    In-memory mode returns :class:`PackedDataset` s, streaming mode :class:`StreamingPackedDataset` s.

    Raises :class:`DataError` for a missing file, an unreadable dataset, an empty corpus, or a split too
    small for one sequence.
    """
    if not isinstance(cfg, DataConfig):
        raise DataError(f"build_datasets expects a DataConfig, got {type(cfg).__name__}")
    source = make_source(cfg)
    tok: Tokenizer | None = load_tokenizer(tokenizer) if tokenizer is not None else None
    if cfg.streaming:
        if tok is None:
            train_stream = (d for d in source if not is_validation_document(d, cfg.val_fraction))
            tok = resolve_tokenizer(cfg, train_stream, cache_dir)
        common: dict[str, Any] = {"val_fraction": cfg.val_fraction, "add_bos": cfg.add_bos}
        train_s = StreamingPackedDataset(
            source,
            tok,
            cfg.seq_len,
            split="train",
            shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed or 0,  # the trainer's iterator passes the run's data-order seed per epoch
            **common,
        )
        val_s = None
        if cfg.val_fraction > 0:
            val_s = StreamingPackedDataset(source, tok, cfg.seq_len, split="val", shuffle_buffer=0, **common)
        return train_s, val_s, tok

    docs = list(source)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    if cfg.val_fraction > 0 and not val_docs:
        raise DataError(
            f"validation split of {cfg.source} is empty: none of its {len(docs)} documents hashed into "
            f"val_fraction={cfg.val_fraction}; add documents, use text_unit=paragraph, or set val_fraction=0"
        )
    if not train_docs:
        raise DataError(f"train split of {cfg.source} is empty ({len(docs)} documents, all held out)")
    if tok is None:
        tok = resolve_tokenizer(cfg, train_docs, cache_dir)
    train = PackedDataset.from_documents(train_docs, tok, cfg.seq_len, add_bos=cfg.add_bos)
    if len(train) == 0:
        raise _too_short("train", len(train_docs), train.dropped_tokens, cfg)
    val = None
    if cfg.val_fraction > 0:
        val = PackedDataset.from_documents(val_docs, tok, cfg.seq_len, add_bos=cfg.add_bos)
        if len(val) == 0:
            raise _too_short("validation", len(val_docs), val.dropped_tokens, cfg)
    log.info(
        "data: %d train / %d val sequences of %d tokens (%s tokenizer, vocab %d)",
        len(train),
        0 if val is None else len(val),
        cfg.seq_len,
        tok.name,
        tok.vocab_size,
    )
    return train, val, tok
