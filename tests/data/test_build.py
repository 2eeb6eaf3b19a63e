"""DataConfig validation, build_datasets end to end, BPE caching, and the default corpus."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from moe_lab.config import ConfigError
from moe_lab.data import (
    ByteTokenizer,
    DataConfig,
    DataError,
    HFTokenizer,
    PackedDataset,
    StreamingPackedDataset,
    build_datasets,
    bundled_corpus_files,
    default_corpus,
    default_corpus_info,
    make_batch_iterator,
    split_documents,
)
from moe_lab.data.corpus import stdlib_dir, stdlib_source_files


def _corpus(tmp_path: Path, n: int = 200) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(n):
        (root / f"doc{i:03d}.txt").write_text(f"Document {i}. " + "experts route tokens. " * (i % 7 + 3))
    return root


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match="seq_len: seq_len must be >= 2"):
        DataConfig(seq_len=1)
    with pytest.raises(ConfigError, match="val_fraction"):
        DataConfig(val_fraction=1.0)
    with pytest.raises(ConfigError, match="unknown key 'sequence_length'"):
        DataConfig(sequence_length=5)
    with pytest.raises(ConfigError, match="format"):
        DataConfig(format="csv")
    with pytest.raises(ConfigError, match="bpe_vocab_size"):
        DataConfig(bpe_vocab_size=100)
    # streaming + BPE needs a cap on the text BPE is trained on (it is held in memory)
    with pytest.raises(ConfigError, match="bpe_train_bytes: set a byte cap"):
        DataConfig(streaming=True, tokenizer="bpe", bpe_train_bytes=None)
    assert DataConfig(streaming=True, tokenizer="bpe").bpe_train_bytes == 16_000_000
    cfg = DataConfig().with_overrides(["seq_len=64", "tokenizer=bpe"])
    assert (cfg.seq_len, cfg.tokenizer) == (64, "bpe")
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


def test_build_text_folder_byte(tmp_path: Path) -> None:
    cfg = DataConfig(source=str(_corpus(tmp_path)), seq_len=32, val_fraction=0.1)
    train, val, tok = build_datasets(cfg)
    assert isinstance(train, PackedDataset) and isinstance(val, PackedDataset)
    assert isinstance(tok, ByteTokenizer)
    assert train.seq_len == 32 and len(train) > len(val) > 0
    # the validation documents are exactly the hashed-out ones, and no text is shared
    docs = [p.read_text() for p in sorted((tmp_path / "corpus").iterdir())]
    tr_docs, va_docs = split_documents(docs, 0.1)
    assert set(tr_docs).isdisjoint(va_docs)
    assert val.num_documents == len(va_docs) and train.num_documents == len(tr_docs)
    # the same config builds the same data
    again, _, _ = build_datasets(cfg)
    assert torch.equal(again.input_ids, train.input_ids)
    assert config_roundtrip(cfg, tmp_path) == cfg


def config_roundtrip(cfg: DataConfig, tmp_path: Path) -> DataConfig:
    cfg.to_yaml(tmp_path / "data.yaml")
    return DataConfig.from_yaml(tmp_path / "data.yaml")


def test_build_jsonl_bpe_with_cache(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    rows = [{"body": f"row {i}: the router picks experts for tokens {i % 13}"} for i in range(400)]
    f.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    cfg = DataConfig(source=str(f), text_field="body", tokenizer="bpe", bpe_vocab_size=320, seq_len=16)
    cache = tmp_path / "cache"
    train, val, tok = build_datasets(cfg, cache_dir=cache)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size <= 320
    cached = list(cache.glob("bpe-*/tokenizer.json"))
    assert len(cached) == 1
    # second build reuses the cache (same ids)
    _, _, tok2 = build_datasets(cfg, cache_dir=cache)
    assert tok2.encode(rows[0]["body"]) == tok.encode(rows[0]["body"])
    assert len(list(cache.glob("bpe-*"))) == 1
    # the trainer saves the tokenizer into the run dir and passes it back on resume
    tok.save(tmp_path / "run")
    t3, _, tok3 = build_datasets(cfg, tokenizer=tmp_path / "run")
    assert torch.equal(t3.input_ids, train.input_ids) and tok3.vocab_size == tok.vocab_size
    # BPE trained on the train split only: a tokenizer path in the config loads as is
    cfg_path = cfg.with_overrides({"tokenizer": str(tmp_path / "run" / "tokenizer.json")})
    t4, _, _ = build_datasets(cfg_path)
    assert torch.equal(t4.input_ids, train.input_ids)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_build_streaming(tmp_path: Path, tokenizer: str) -> None:
    cfg = DataConfig(
        source=str(_corpus(tmp_path)),
        seq_len=32,
        val_fraction=0.1,
        streaming=True,
        shuffle_buffer=0,
        tokenizer=tokenizer,
        bpe_vocab_size=300,
    )
    train, val, _ = build_datasets(cfg)
    assert isinstance(train, StreamingPackedDataset) and isinstance(val, StreamingPackedDataset)
    mem_train, mem_val, _ = build_datasets(cfg.with_overrides({"streaming": False}))
    assert torch.equal(torch.stack([x["input_ids"] for x in train]), mem_train.input_ids)
    assert torch.equal(torch.stack([x["input_ids"] for x in val]), mem_val.input_ids)
    batch = next(make_batch_iterator(train, 4, seed=0))
    assert batch["input_ids"].shape == (4, 32)


def test_build_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data source not found: .*missing\.jsonl"):
        build_datasets(DataConfig(source=str(tmp_path / "missing.jsonl")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no text found in .*empty\.jsonl"):
        build_datasets(DataConfig(source=str(empty)))
    few = tmp_path / "few"
    few.mkdir()
    (few / "a.txt").write_text("tiny")
    with pytest.raises(DataError, match=r"validation split .* is empty"):
        build_datasets(DataConfig(source=str(few), val_fraction=0.01))
    with pytest.raises(DataError, match="fewer than one sequence of seq_len=64"):
        build_datasets(DataConfig(source=str(few), val_fraction=0.0, seq_len=64))
    bad_hf = tmp_path / "bad_hf"
    bad_hf.mkdir()
    (bad_hf / "state.json").write_text("{}")
    with pytest.raises(DataError, match=r"cannot load dataset saved with save_to_disk from .*bad_hf"):
        build_datasets(DataConfig(source=str(bad_hf)))
    with pytest.raises(DataError, match=r"tokenizer not found: .*nope"):
        build_datasets(DataConfig(source=str(_corpus(tmp_path, 50)), tokenizer=str(tmp_path / "nope")))


def test_bundled_sample_is_real_and_sizeable() -> None:
    files = bundled_corpus_files()
    assert len(files) >= 3
    total = sum(p.stat().st_size for p in files)
    assert 50_000 < total < 600_000
    docs = list(default_corpus(None, include_stdlib=False))
    assert len(docs) > 100  # paragraphs, so the bundled-only fallback still has a validation split
    _, val = split_documents(docs, 0.05)
    assert val


def test_default_corpus_deterministic_and_capped() -> None:
    a = list(default_corpus(300_000))
    b = list(default_corpus(300_000))
    assert a == b
    assert sum(len(d.encode()) for d in a) <= 300_000
    assert split_documents(a, 0.05) == split_documents(b, 0.05)


@pytest.mark.skipif(stdlib_dir() is None, reason="this Python ships without stdlib sources")
def test_default_corpus_uses_stdlib_and_is_large() -> None:
    files = stdlib_source_files()
    assert len(files) > 100 and all(p.suffix == ".py" for p in files)
    assert not any("test" in p.relative_to(stdlib_dir()).parts for p in files)
    docs = list(default_corpus(2_000_000))
    assert sum(len(d.encode()) for d in docs) > 1_500_000
    assert any("def " in d for d in docs)
    info = default_corpus_info(2_000_000)
    assert info["stdlib_files_available"] == len(files) and info["bytes"] > 1_000_000


def test_default_corpus_falls_back_with_warning(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="standard library sources not found"):
        src = default_corpus(include_stdlib=True, stdlib_root=tmp_path)
    docs = list(src)
    assert docs == list(default_corpus(include_stdlib=False))


def test_build_default_small() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, val, tok = build_datasets(DataConfig(source="default", seq_len=64, max_bytes=400_000))
    assert len(train) > 1000 and len(val) > 10
    assert tok.decode(train[0]["input_ids"].tolist())
