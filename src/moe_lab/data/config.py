"""``DataConfig``: the ``data`` section of a run config.

Example:
    >>> from moe_lab.data.config import DataConfig
    >>> cfg = DataConfig(source="corpus/*.jsonl", tokenizer="bpe", bpe_vocab_size=8192, seq_len=512)
    >>> cfg.with_overrides(["seq_len=128"]).seq_len
    128
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from moe_lab.config import Config
from moe_lab.data.sources import DEFAULT_EXTENSIONS

if TYPE_CHECKING:
    from moe_lab.data.tokenizers import Tokenizer

__all__ = ["DataConfig"]


class DataConfig(Config):
    """Where the text comes from, how it is tokenized, packed and split."""

    source: str = "default"
    """A path, glob or folder, or ``"default"`` (bundled sample + this Python's stdlib sources)."""
    format: Literal["auto", "text", "jsonl", "parquet", "hf_disk"] = "auto"
    """File format; ``auto`` picks by suffix (``.jsonl``, ``.parquet``, save_to_disk folders, else text)."""
    text_field: str = "text"
    """JSONL field / Parquet or dataset column holding the text."""
    text_unit: Literal["file", "paragraph", "line"] = "file"
    """For text files: one document per file, per blank-line-separated paragraph, or per line."""
    extensions: list[str] = Field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    """Suffixes read as text when a folder is walked."""
    tokenizer: str = "byte"
    """``byte``, ``bpe`` (trained on the train split) or a path to a tokenizer.json (or its folder)."""
    bpe_vocab_size: int = 4096
    """Vocabulary size when ``tokenizer: bpe`` (includes 256 byte tokens and 3 special tokens)."""
    bpe_min_frequency: int = 2
    """A pair must occur this often to be merged."""
    bpe_train_bytes: int | None = 16_000_000
    """Train BPE on at most this many bytes of the train split (None: all of it)."""
    seq_len: int = 256
    """Tokens per packed sequence (labels are the inputs; the model shifts them)."""
    add_bos: bool = False
    """Put ``bos`` before each document (``eos`` always follows each document)."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation (by a stable hash of each document); 0 = none."""
    seed: int | None = None
    """Seed of the data order (the per-epoch shuffle; None: ``train.seed``). The validation split does not
    depend on it."""
    streaming: bool = False
    """Read, tokenize and pack on the fly instead of in memory (for corpora larger than memory)."""
    shuffle_buffer: int = 1024
    """Sequences held in the streaming shuffle buffer (0 or 1: no shuffling)."""
    max_documents: int | None = None
    """Read at most this many documents (None: all)."""
    max_bytes: int | None = None
    """Read at most this many UTF-8 bytes (None: all; the default corpus then uses 8,000,000)."""

    @field_validator("seq_len")
    @classmethod
    def _seq_len(cls, v: int) -> int:
        if v < 2:
            raise ValueError("seq_len must be >= 2 (one input token and one shifted target)")
        return v

    @field_validator("val_fraction")
    @classmethod
    def _val_fraction(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("val_fraction must be in [0, 1)")
        return v

    @field_validator("bpe_vocab_size")
    @classmethod
    def _vocab(cls, v: int) -> int:
        if v < 260:
            raise ValueError("bpe_vocab_size must be >= 260 (256 byte tokens + 3 special tokens + merges)")
        return v

    @field_validator("max_documents", "max_bytes", "bpe_train_bytes", "bpe_min_frequency")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be >= 1 (or null for no limit)")
        return v

    @field_validator("seed", "shuffle_buffer")
    @classmethod
    def _non_negative(cls, v: int | None) -> int | None:
        if v is not None and v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("source", "text_field", "tokenizer")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _default_corpus_format(self) -> DataConfig:
        if self.source == "default" and self.format != "auto":
            raise ValueError("source 'default' is the bundled corpus; leave format as 'auto'")
        if self.streaming and self.tokenizer == "bpe" and self.bpe_train_bytes is None:
            raise ValueError(
                "bpe_train_bytes: set a byte cap (e.g. 16000000) when streaming: BPE training holds its "
                "text in memory, and a streamed corpus may not fit"
            )
        return self

    def build(
        self, *, tokenizer: Tokenizer | None = None, cache_dir: str | Path | None = None
    ) -> tuple[Any, Any, Tokenizer]:
        """``build_datasets(self, ...)``: ``(train_ds, val_ds or None, tokenizer)``."""
        from moe_lab.data.build import build_datasets

        return build_datasets(self, tokenizer=tokenizer, cache_dir=cache_dir)
