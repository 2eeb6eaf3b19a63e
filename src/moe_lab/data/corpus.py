"""The default corpus (``source: default``): real text and code, offline, deterministic.

It is, in this order:

1. the bundled sample in ``moe_lab/data/corpus/`` (prose about MoE models, training and programming,
   written for this project; Apache-2.0 like the code), one document per blank-line-separated paragraph;
2. this Python's standard library sources (``sysconfig.get_paths()["stdlib"]``): every ``*.py`` file except
   tests (``test/``, ``tests/``, ``idle_test/``), ``site-packages/``, ``encodings/`` (codec tables) and
   ``pydoc_data/`` (one generated 700 KB string), one document per file, ordered by a BLAKE2b hash of the
   file's relative path (an even sample of the whole stdlib, independent of the file system's order);

cut at ``max_bytes`` UTF-8 bytes (default 8,000,000). The same Python version gives the same corpus and the
same train/validation split on every machine (the split hashes document text; see
:mod:`moe_lab.data.packing`). Without stdlib sources (e.g. a stripped container) the corpus falls back to the
bundled sample alone, with a warning.

Example:
    >>> from moe_lab.data.corpus import default_corpus, default_corpus_info
    >>> docs = list(default_corpus(max_bytes=100_000))
    >>> sum(len(d.encode()) for d in docs) <= 100_000
    True
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moe_lab.data.sources import DocumentSource, read_text_file

__all__ = [
    "BUNDLED_DIR",
    "DEFAULT_CORPUS_BYTES",
    "bundled_corpus_files",
    "default_corpus",
    "default_corpus_info",
    "stdlib_dir",
    "stdlib_source_files",
]

DEFAULT_CORPUS_BYTES = 8_000_000
"""Default cap of the default corpus in UTF-8 bytes."""

BUNDLED_DIR = Path(__file__).resolve().parent / "corpus"
"""Folder of the bundled sample text (shipped in the wheel)."""

_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data", "__pycache__"}
)


def bundled_corpus_files() -> list[Path]:
    """The bundled sample files (``*.md``, ``*.txt``), sorted by name."""
    return sorted(p for p in BUNDLED_DIR.iterdir() if p.suffix in (".md", ".txt") and p.is_file())


def stdlib_dir() -> Path | None:
    """This interpreter's standard library folder, or None when it holds no Python sources."""
    raw = sysconfig.get_paths().get("stdlib")
    if not raw:
        return None
    path = Path(raw)
    return path if (path / "os.py").is_file() else None


def _path_key(rel: str) -> bytes:
    return hashlib.blake2b(rel.encode("utf-8"), digest_size=8, person=b"moe-lab-corpus").digest()


def stdlib_source_files(root: Path | None = None) -> list[Path]:
    """Stdlib ``*.py`` files (exclusions in the module docs), in hash-of-relative-path order."""
    root = stdlib_dir() if root is None else root
    if root is None:
        return []
    found: list[tuple[bytes, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("."))
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((_path_key(path.relative_to(root).as_posix()), path))
    found.sort()
    return [p for _, p in found]


class _DefaultCorpus(DocumentSource):
    """Bundled paragraphs, then stdlib files (undecodable ones are skipped, deterministically)."""

    def __init__(self, stdlib_files: list[Path], *, max_bytes: int | None, max_documents: int | None) -> None:
        super().__init__(
            [*bundled_corpus_files(), *stdlib_files],
            max_bytes=max_bytes,
            max_documents=max_documents,
            description="the default corpus",
        )
        self._stdlib_files = stdlib_files

    def _raw(self) -> Iterator[str]:
        for path in bundled_corpus_files():
            yield from read_text_file(path, "paragraph")
        for path in self._stdlib_files:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            yield text


def default_corpus(
    max_bytes: int | None = DEFAULT_CORPUS_BYTES,
    *,
    include_stdlib: bool = True,
    max_documents: int | None = None,
    stdlib_root: Path | None = None,
) -> DocumentSource:
    """The default corpus as a re-iterable :class:`DocumentSource` (see the module docs).

    Example:
        >>> src = default_corpus(max_bytes=50_000, include_stdlib=False)
        >>> next(iter(src))[:2]
        '# '
    """
    files: list[Path] = []
    if include_stdlib:
        files = stdlib_source_files(stdlib_root)
        if not files:
            where = stdlib_root or sysconfig.get_paths().get("stdlib")
            warnings.warn(
                f"Python standard library sources not found (looked in {where}); the default corpus is the "
                "bundled sample only (a few hundred KB)",
                UserWarning,
                stacklevel=2,
            )
    return _DefaultCorpus(files, max_bytes=max_bytes, max_documents=max_documents)


def default_corpus_info(max_bytes: int | None = DEFAULT_CORPUS_BYTES) -> dict[str, Any]:
    """What the default corpus is made of here: Python version, stdlib folder, file counts, bytes.

    Example:
        >>> info = default_corpus_info(max_bytes=10_000)
        >>> info["bytes"] <= 10_000
        True
    """
    root = stdlib_dir()
    files = stdlib_source_files(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        docs = list(default_corpus(max_bytes, include_stdlib=bool(files)))
    return {
        "python": ".".join(str(v) for v in sys.version_info[:3]),
        "stdlib_dir": str(root) if root else None,
        "stdlib_files_available": len(files),
        "bundled_files": [p.name for p in bundled_corpus_files()],
        "documents": len(docs),
        "bytes": sum(len(d.encode("utf-8")) for d in docs),
        "max_bytes": max_bytes,
    }
