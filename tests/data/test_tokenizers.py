"""Tokenizers: exact round trips, robust decode, save/load, BPE training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lab.data import ByteTokenizer, DataError, HFTokenizer, Tokenizer, load_tokenizer, train_bpe
from moe_lab.data.tokenizers import encode_arrays

TRICKY = [
    "",
    "plain ascii",
    "héllo wörld ñ ß",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "combining a\u0301 e\u0308 \u0915\u094d\u0937",
    "NUL \x00 and controls \x01\x7f\t\r\n",
    "CJK 漢字かなカナ 한국어",
    "RTL עברית العربية",
    "special strings in text <|eos|> <|bos|> <|pad|>",
    "   leading and trailing spaces   ",
    "\ufeffBOM and \u200b zero width",
]


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    texts = [
        "def add(a, b):\n    return a + b\n" * 20,
        "The quick brown fox jumps over the lazy dog. " * 30,
        "Mixture-of-experts routers send tokens to experts. " * 30,
        "héllo wörld 🙂 " * 10,
    ]
    return train_bpe(texts, vocab_size=400)


def test_byte_ids_are_utf8_bytes() -> None:
    tok = ByteTokenizer()
    for text in TRICKY:
        assert tok.encode(text) == list(text.encode("utf-8"))  # obvious reference
        assert tok.decode(tok.encode(text)) == text
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (259, 256, 257, 258)
    assert isinstance(tok, Tokenizer)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_round_trip_any_text(text: str) -> None:
    tok = ByteTokenizer()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates are not UTF-8: a clear error, never silent corruption
        with pytest.raises(DataError, match="UTF-8"):
            tok.encode(text)
        return
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=-1000, max_value=1000), max_size=50))
def test_byte_decode_arbitrary_ids_never_crashes(ids: list[int]) -> None:
    out = ByteTokenizer().decode(ids)
    assert isinstance(out, str)
    kept = bytes(i for i in ids if 0 <= i < 256)
    assert out == kept.decode("utf-8", errors="replace")


def test_byte_decode_specials_and_invalid_utf8() -> None:
    tok = ByteTokenizer()
    assert tok.decode([0xC3, 65]) == "\ufffdA"
    assert tok.decode([72, 257, 105], skip_special_tokens=False) == "H<|eos|>i"
    assert tok.decode([72, 257, 105, -100, 9999]) == "Hi"


def test_byte_save_is_hf_compatible_and_loads_back(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as RawHF

    path = ByteTokenizer().save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer(path), ByteTokenizer)
    raw = HFTokenizer(RawHF.from_file(str(path)), name="raw")  # the HF view gives the same ids
    for text in TRICKY:
        assert raw.encode(text) == ByteTokenizer().encode(text)
        assert raw.decode(raw.encode(text)) == text
    assert (raw.bos_token_id, raw.eos_token_id, raw.pad_token_id, raw.vocab_size) == (256, 257, 258, 259)


def test_bpe_round_trip_and_compresses(bpe: HFTokenizer) -> None:
    for text in TRICKY:
        assert bpe.decode(bpe.encode(text)) == text
    code = "def add(a, b):\n    return a + b\n"
    assert len(bpe.encode(code)) < len(code.encode()) / 2
    assert bpe.vocab_size <= 400
    assert (bpe.bos_token_id, bpe.eos_token_id, bpe.pad_token_id) == (0, 1, 2)
    # special-token strings inside text are text, never control tokens
    assert bpe.eos_token_id not in bpe.encode("a <|eos|> b")
    assert bpe.encode_batch(TRICKY) == [bpe.encode(t) for t in TRICKY]


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"])))
def test_bpe_round_trip_any_text(bpe: HFTokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_decode_arbitrary_ids(bpe: HFTokenizer) -> None:
    assert isinstance(bpe.decode([-100, 5, 10**9, 300, 1]), str)


def test_bpe_save_load(bpe: HFTokenizer, tmp_path: Path) -> None:
    bpe.save(tmp_path)
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(again, HFTokenizer)
    for text in TRICKY:
        assert again.encode(text) == bpe.encode(text)
    assert again.eos_token_id == bpe.eos_token_id


def test_train_bpe_from_files(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("hello hello hello world world " * 40, encoding="utf-8")
    tok = train_bpe([f, "extra text given directly"], vocab_size=300)
    assert len(tok.encode("hello world")) < len("hello world")
    # a single file or a single text is one input, not an iterable of characters
    assert train_bpe(f, vocab_size=300).encode("hello world") == tok.encode("hello world")
    assert len(train_bpe("hello hello hello " * 50, vocab_size=300).encode("hello")) == 1
    with pytest.raises(DataError, match=r"missing\.txt"):
        train_bpe([tmp_path / "missing.txt"], vocab_size=300)
    with pytest.raises(DataError, match="vocab_size"):
        train_bpe(["x"], vocab_size=100)
    with pytest.raises(DataError, match="no text"):
        train_bpe([""], vocab_size=300)


def test_encode_arrays_matches_encode(bpe: HFTokenizer) -> None:
    for tok in (ByteTokenizer(), bpe):
        arrays = encode_arrays(tok, TRICKY)
        assert [a.tolist() for a in arrays] == [tok.encode(t) for t in TRICKY]
        assert all(a.dtype.name == "int64" for a in arrays)


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(DataError, match=r"nope\.json"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(DataError, match=str(tmp_path / "tokenizer.json")):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json.*not valid JSON"):
        load_tokenizer(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}), encoding="utf-8")
    with pytest.raises(DataError, match="not a Hugging Face tokenizer"):
        load_tokenizer(other)
