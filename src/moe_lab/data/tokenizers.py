"""Tokenizers: a byte tokenizer that needs no training, and byte-level BPE trained locally.

Both round-trip any UTF-8 text exactly (``decode(encode(s)) == s``) and share one small protocol
(:class:`Tokenizer`). Special tokens are ``<|bos|>``, ``<|eos|>``, ``<|pad|>``.

* :class:`ByteTokenizer`: ids 0-255 are the UTF-8 bytes, 256 = bos, 257 = eos, 258 = pad;
  ``vocab_size == 259``. Encoding is a ``numpy.frombuffer`` of the UTF-8 bytes.
* :func:`train_bpe` -> :class:`HFTokenizer`: Hugging Face ``tokenizers`` byte-level BPE (GPT-2 style
  pre-tokenizer, no normaliser, no prefix space), special tokens at ids 0, 1, 2.

Decoding never raises: ids outside ``[0, vocab_size)`` (e.g. ``-100``) and special tokens are skipped,
and byte sequences that are not valid UTF-8 decode with ``errors="replace"`` (U+FFFD). Special-token
strings that occur in *text* are encoded as ordinary text, never as control tokens.

``save(directory)`` writes ``directory/tokenizer.json`` in the Hugging Face format for both kinds (the byte
tokenizer as a merge-free byte-level BPE, so ``transformers`` can load it), and :func:`load_tokenizer`
reads it back (recognising the byte tokenizer and returning the fast :class:`ByteTokenizer`).

Example:
    >>> from moe_lab.data.tokenizers import ByteTokenizer, load_tokenizer
    >>> tok = ByteTokenizer()
    >>> tok.encode("hé")
    [104, 195, 169]
    >>> tok.decode(tok.encode("hé 🙂")) == "hé 🙂"
    True
    >>> load_tokenizer("byte").vocab_size
    259
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from moe_lab.config import atomic_write_text
from moe_lab.data.errors import DataError

__all__ = [
    "SPECIAL_TOKENS",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "encode_arrays",
    "load_tokenizer",
    "train_bpe",
]

SPECIAL_TOKENS: tuple[str, str, str] = ("<|bos|>", "<|eos|>", "<|pad|>")
"""``(bos, eos, pad)`` token strings used by every moe-lab tokenizer."""

TOKENIZER_FILE = "tokenizer.json"


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of moe-lab relies on. Both :class:`ByteTokenizer` and :class:`HFTokenizer` conform."""

    name: str

    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_token_id(self) -> int: ...
    @property
    def eos_token_id(self) -> int: ...
    @property
    def pad_token_id(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str: ...
    def save(self, directory: str | os.PathLike[str]) -> Path: ...


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _ids_list(ids: Iterable[int] | Any) -> list[int]:
    if hasattr(ids, "tolist"):  # torch / numpy
        ids = ids.tolist()
    return [int(i) for i in ids]


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255 are bytes, 256 bos, 257 eos, 258 pad (``vocab_size`` 259).

    Needs no training and no files. ``encode`` never emits special tokens; add them yourself (packing
    appends ``eos`` after each document).

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("A\\x00")
        [65, 0]
        >>> tok.decode([72, 105, tok.eos_token_id, 999])  # specials and unknown ids are skipped
        'Hi'
    """

    name = "byte"
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` as ints. Lone surrogates are not valid UTF-8 and raise ``DataError``."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path: the ids as an int64 numpy array."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataError(
                f"text is not encodable as UTF-8 ({err.reason} at position {err.start})"
            ) from None
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Bytes back to text (``errors="replace"``); unknown ids are skipped, specials too by default."""
        out = bytearray()
        names = {256: SPECIAL_TOKENS[0], 257: SPECIAL_TOKENS[1], 258: SPECIAL_TOKENS[2]}
        for i in _ids_list(ids):
            if 0 <= i < 256:
                out.append(i)
            elif i in names and not skip_special_tokens:
                out.extend(names[i].encode())
        return out.decode("utf-8", errors="replace")

    def to_hf_json(self) -> str:
        """The equivalent Hugging Face ``tokenizer.json`` (byte-level BPE without merges)."""
        return _byte_hf_tokenizer().to_str(pretty=True)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``directory/tokenizer.json`` (Hugging Face format, loads back as a ByteTokenizer)."""
        path = Path(directory) / TOKENIZER_FILE
        atomic_write_text(path, self.to_hf_json())
        return path

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


def _byte_hf_tokenizer() -> Any:
    from tokenizers import Tokenizer as _HFTok
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = _HFTok(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _is_byte_tokenizer_json(data: dict[str, Any]) -> bool:
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("merges"):
        return False
    if model.get("vocab") != {ch: b for b, ch in _bytes_to_unicode().items()}:
        return False
    added = {t.get("content"): t.get("id") for t in data.get("added_tokens") or []}
    return added == {SPECIAL_TOKENS[0]: 256, SPECIAL_TOKENS[1]: 257, SPECIAL_TOKENS[2]: 258}


_FALLBACK_NAMES = {
    "bos": (SPECIAL_TOKENS[0], "<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>"),
    "eos": (SPECIAL_TOKENS[1], "</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>"),
    "pad": (SPECIAL_TOKENS[2], "<pad>", "[PAD]", "<|padding|>"),
}


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` behind the moe-lab protocol (see :func:`train_bpe`).

    Special ids are found by name (``<|bos|>``/``<|eos|>``/``<|pad|>``, then common alternatives such as
    ``</s>``); a missing pad falls back to eos, a missing bos to eos. A tokenizer without any end-of-text
    token is rejected.

    Example:
        >>> tok = train_bpe(["low lower lowest " * 50], vocab_size=300)
        >>> tok.decode(tok.encode("lowest low")) == "lowest low"
        True
    """

    def __init__(self, tokenizer: Any, name: str = "bpe") -> None:
        self._tok = tokenizer
        self.name = name
        # Special-token strings inside *text* are plain text, never control tokens.
        self._tok.encode_special_tokens = True
        ids = {k: self._find(v) for k, v in _FALLBACK_NAMES.items()}
        if ids["eos"] is None:
            raise DataError(
                f"tokenizer '{name}' has no end-of-text token (looked for {_FALLBACK_NAMES['eos']})"
            )
        self._eos: int = ids["eos"]
        self._bos: int = ids["bos"] if ids["bos"] is not None else self._eos
        self._pad: int = ids["pad"] if ids["pad"] is not None else self._eos
        self._vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def _find(self, names: Sequence[str]) -> int | None:
        for n in names:
            i = self._tok.token_to_id(n)
            if i is not None:
                return int(i)
        return None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], name: str | None = None) -> HFTokenizer:
        """Load a ``tokenizer.json`` file; errors name the path."""
        from tokenizers import Tokenizer as _HFTok

        try:
            tok = _HFTok.from_file(str(path))
        except Exception as err:
            raise DataError(f"cannot load tokenizer from {path}: {err}") from None
        return cls(tok, name=name or str(path))

    @property
    def backend(self) -> Any:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_token_id(self) -> int:
        return self._bos

    @property
    def eos_token_id(self) -> int:
        return self._eos

    @property
    def pad_token_id(self) -> int:
        return self._pad

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Batched encode (parallel in Rust unless ``TOKENIZERS_PARALLELISM=false``)."""
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids back to text; ids outside the vocabulary are skipped; invalid UTF-8 becomes U+FFFD."""
        clean = [i for i in _ids_list(ids) if 0 <= i < self._vocab_size]
        return str(self._tok.decode(clean, skip_special_tokens=skip_special_tokens))

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``directory/tokenizer.json`` atomically."""
        path = Path(directory) / TOKENIZER_FILE
        atomic_write_text(path, self._tok.to_str(pretty=True))
        return path

    def __repr__(self) -> str:
        return f"HFTokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


def encode_arrays(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Encode a batch into int64 arrays, using the fastest path each tokenizer offers."""
    if isinstance(tokenizer, ByteTokenizer):
        return [tokenizer.encode_array(t) for t in texts]
    enc = getattr(tokenizer, "encode_batch", None)
    lists = enc(list(texts)) if enc is not None else [tokenizer.encode(t) for t in texts]
    return [np.asarray(ids, dtype=np.int64) for ids in lists]


def _iter_training_texts(files_or_texts: Iterable[str | os.PathLike[str]]) -> Iterator[str]:
    for item in files_or_texts:
        if isinstance(item, os.PathLike):
            p = Path(item)
            try:
                yield p.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise DataError(f"tokenizer training file not found: {p}") from None
            except (OSError, UnicodeDecodeError) as err:
                raise DataError(f"cannot read tokenizer training file {p}: {err}") from None
        elif isinstance(item, str):
            yield item
        else:
            raise DataError(f"train_bpe expects str texts or Path files, got {type(item).__name__}")


def train_bpe(
    files_or_texts: Iterable[str | os.PathLike[str]],
    vocab_size: int = 4096,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    show_progress: bool = False,
    name: str = "bpe",
) -> HFTokenizer:
    """Train a byte-level BPE tokenizer locally with Hugging Face ``tokenizers``.

    ``files_or_texts`` mixes ``pathlib.Path`` objects (files read as UTF-8) and ``str`` (the text itself;
    a ``str`` is never treated as a path; a single ``str`` or ``Path`` is one text or one file). Special tokens get ids ``0, 1, 2`` (bos, eos, pad). The result
    round-trips any UTF-8 text exactly. Save it with ``tok.save(run_dir)``.

    Example:
        >>> tok = train_bpe(["the cat sat on the mat. " * 20], vocab_size=280)
        >>> tok.vocab_size <= 280 and tok.decode(tok.encode("the mat")) == "the mat"
        True
    """
    from tokenizers import Tokenizer as _HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if isinstance(files_or_texts, (str, os.PathLike)):
        files_or_texts = [files_or_texts]
    min_vocab = 256 + len(special_tokens)
    if vocab_size < min_vocab + 1:
        raise DataError(
            f"bpe vocab_size must be > {min_vocab} (256 bytes + special tokens), got {vocab_size}"
        )
    tok = _HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in _iter_training_texts(files_or_texts):
            seen += len(text)
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen == 0:
        raise DataError("train_bpe: no text to train on (all inputs were empty)")
    return HFTokenizer(tok, name=name)


def load_tokenizer(path_or_name: str | os.PathLike[str] | Tokenizer) -> Tokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; a ``tokenizer.json`` file or a folder holding one -> tokenizer.

    A Hugging Face ``tokenizer.json`` written by :meth:`ByteTokenizer.save` loads back as a ByteTokenizer.
    Errors name the path that was tried.

    Example:
        >>> load_tokenizer("byte").name
        'byte'
    """
    if isinstance(path_or_name, (ByteTokenizer, HFTokenizer)):
        return path_or_name
    if isinstance(path_or_name, str) and path_or_name == "byte":
        return ByteTokenizer()
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise DataError(
            f"tokenizer must be 'byte' or a path to tokenizer.json, got {type(path_or_name).__name__}"
        )
    path = Path(path_or_name)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(
            f"tokenizer not found: {path} (expected 'byte', a tokenizer.json file or a folder containing one)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"tokenizer file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or "model" not in data:
        raise DataError(f"tokenizer file {path} is not a Hugging Face tokenizer.json (no 'model' key)")
    if _is_byte_tokenizer_json(data):
        return ByteTokenizer()
    return HFTokenizer.from_file(path, name=str(path))
