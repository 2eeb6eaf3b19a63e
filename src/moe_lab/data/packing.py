"""Packing documents into fixed-length sequences, the document-level validation split, shuffling.

The token stream is ``[bos] doc_0 eos [bos] doc_1 eos ...`` (``bos`` only with ``add_bos=True``). It is
cut into consecutive sequences of exactly ``seq_len`` tokens; the model shifts labels internally
(``labels=input_ids``), so each sequence gives ``seq_len - 1`` next-token targets. The final partial
sequence (``tail``, fewer than ``seq_len`` tokens) is dropped from training and reported, so packing is
lossless: ``concat(sequences) + tail == stream``.

The validation split is per document: a document is held out when a stable 64-bit BLAKE2b hash of its
UTF-8 text, read as a number in ``[0, 1)``, is below ``val_fraction``. It does not depend on the seed,
the order or the machine, and identical documents always fall in the same split.

Example:
    >>> from moe_lab.data.packing import pack_documents
    >>> from moe_lab.data.tokenizers import ByteTokenizer
    >>> packed = pack_documents(["abc", "de"], ByteTokenizer(), seq_len=3)
    >>> packed.sequences.tolist(), packed.tail.tolist()
    ([[97, 98, 99], [257, 100, 101]], [257])
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from moe_lab.data.errors import DataError
from moe_lab.data.tokenizers import Tokenizer, encode_arrays

__all__ = [
    "PackedTokens",
    "SequencePacker",
    "check_seq_len",
    "document_hash_fraction",
    "encode_documents",
    "is_validation_document",
    "pack_documents",
    "shuffle_indices",
    "split_documents",
]

_HASH_PERSON = b"moe-lab-split"


def check_seq_len(seq_len: int) -> int:
    """Validate ``seq_len`` (an int >= 2: one input and one shifted target)."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2 (got {seq_len!r})")
    return seq_len


def document_hash_fraction(text: str) -> float:
    """A stable number in ``[0, 1)`` from the document's text (BLAKE2b-64, machine independent)."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8, person=_HASH_PERSON)
    return int.from_bytes(digest.digest(), "big") / 2.0**64


def is_validation_document(text: str, val_fraction: float) -> bool:
    """True when ``text`` belongs to the held-out split for ``val_fraction`` (see module docs).

    Example:
        >>> is_validation_document("any text", 0.0), is_validation_document("any text", 1.0)
        (False, True)
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise DataError(f"val_fraction must be in [0, 1] (got {val_fraction})")
    return document_hash_fraction(text) < val_fraction


def split_documents(docs: Iterable[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """``(train_docs, val_docs)``, order preserved, split per document by :func:`is_validation_document`."""
    train: list[str] = []
    val: list[str] = []
    for doc in docs:
        (val if is_validation_document(doc, val_fraction) else train).append(doc)
    return train, val


def encode_documents(
    docs: Iterable[str], tokenizer: Tokenizer, *, batch_size: int = 256
) -> Iterator[np.ndarray]:
    """Token ids (int64 arrays) of each document, encoded in batches (``encode_batch`` fast path)."""
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) >= batch_size:
            yield from encode_arrays(tokenizer, batch)
            batch = []
    if batch:
        yield from encode_arrays(tokenizer, batch)


def _with_specials(ids: np.ndarray, tokenizer: Tokenizer, add_bos: bool) -> list[np.ndarray]:
    parts = [ids, np.array([tokenizer.eos_token_id], dtype=np.int64)]
    if add_bos:
        parts.insert(0, np.array([tokenizer.bos_token_id], dtype=np.int64))
    return parts


@dataclass
class PackedTokens:
    """Result of :func:`pack_documents`.

    ``sequences``: int64 ``[N, seq_len]``; ``tail``: the dropped last ``< seq_len`` tokens;
    ``num_documents``; ``num_tokens`` (the whole stream, eos included).
    """

    sequences: np.ndarray
    tail: np.ndarray
    num_documents: int
    num_tokens: int
    seq_len: int

    @property
    def dropped_tokens(self) -> int:
        """Tokens in the dropped tail."""
        return int(self.tail.size)

    def stream(self) -> np.ndarray:
        """The full token stream (sequences then tail): packing is lossless."""
        return np.concatenate([self.sequences.reshape(-1), self.tail])


def pack_documents(
    docs: Iterable[str],
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    add_bos: bool = False,
    batch_size: int = 256,
) -> PackedTokens:
    """Tokenize ``docs``, append eos after each (bos before with ``add_bos``), concatenate, cut.

    Example:
        >>> from moe_lab.data.tokenizers import ByteTokenizer
        >>> pack_documents(["hello world"], ByteTokenizer(), seq_len=4).sequences.shape
        (3, 4)
    """
    check_seq_len(seq_len)
    parts: list[np.ndarray] = []
    n_docs = 0
    for ids in encode_documents(docs, tokenizer, batch_size=batch_size):
        parts.extend(_with_specials(ids, tokenizer, add_bos))
        n_docs += 1
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n_seq = stream.size // seq_len
    cut = n_seq * seq_len
    return PackedTokens(
        sequences=stream[:cut].reshape(n_seq, seq_len).copy(),
        tail=stream[cut:].copy(),
        num_documents=n_docs,
        num_tokens=int(stream.size),
        seq_len=seq_len,
    )


class SequencePacker:
    """Incremental packer for streams: ``push(doc_ids)`` returns the full sequences completed so far.

    Produces exactly the sequences of :func:`pack_documents` for the same documents, in the same order.

    Example:
        >>> from moe_lab.data.tokenizers import ByteTokenizer
        >>> p = SequencePacker(ByteTokenizer(), seq_len=3)
        >>> [s.tolist() for s in p.push(np.array([97, 98, 99]))], p.pending
        ([[97, 98, 99]], 1)
    """

    def __init__(self, tokenizer: Tokenizer, seq_len: int, *, add_bos: bool = False) -> None:
        self.tokenizer = tokenizer
        self.seq_len = check_seq_len(seq_len)
        self.add_bos = add_bos
        self._buf = np.zeros(0, dtype=np.int64)

    @property
    def pending(self) -> int:
        """Tokens waiting for the next full sequence."""
        return int(self._buf.size)

    def push(self, ids: np.ndarray | Sequence[int]) -> list[np.ndarray]:
        """Add one document's ids; return the completed ``[seq_len]`` sequences."""
        arr = np.asarray(ids, dtype=np.int64)
        self._buf = np.concatenate([self._buf, *_with_specials(arr, self.tokenizer, self.add_bos)])
        n = self._buf.size // self.seq_len
        if n == 0:
            return []
        full = self._buf[: n * self.seq_len].reshape(n, self.seq_len)
        self._buf = self._buf[n * self.seq_len :].copy()
        return list(full.copy())


def shuffle_indices(n: int, seed: int, epoch: int = 0) -> np.ndarray:
    """A permutation of ``range(n)`` determined by ``(seed, epoch)`` (numpy PCG64).

    Example:
        >>> shuffle_indices(5, seed=1).tolist() == shuffle_indices(5, seed=1).tolist()
        True
    """
    if seed < 0 or epoch < 0:
        raise DataError(f"seed and epoch must be >= 0 (got seed={seed}, epoch={epoch})")
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)
