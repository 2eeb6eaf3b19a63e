"""Document sources: text files, globs, folders, JSONL, Parquet, ``datasets.save_to_disk`` folders, lists.

A :class:`DocumentSource` is re-iterable and lazy: each pass reads the files again in a fixed (sorted)
order and yields documents (``str``). Errors name the file, and the line or field where it applies.

Formats (``format="auto"`` picks per path):

* ``text``: each file is one document (``text_unit="file"``), or is split into paragraphs at blank
  lines (``"paragraph"``) or into lines (``"line"``). Files must be UTF-8.
* ``jsonl``: one JSON object per line, the document in ``text_field`` (default ``"text"``); blank lines
  are skipped. Picked for ``.jsonl`` / ``.ndjson`` files.
* ``parquet``: column ``text_field`` of a ``.parquet`` file (read in record batches with pyarrow).
* ``hf_disk``: a folder written by ``datasets.Dataset.save_to_disk`` (column ``text_field``); for a
  ``DatasetDict`` every split is read, in sorted split-name order.

A folder that is not a ``save_to_disk`` folder is walked recursively (sorted), taking files whose suffix
is in ``extensions`` plus ``.jsonl``/``.ndjson``/``.parquet`` in auto mode. Empty documents are dropped;
``max_documents`` and ``max_bytes`` (UTF-8 bytes; the last document is cut to fit) cap a pass.

Example:
    >>> from moe_lab.data.sources import DocumentSource
    >>> list(DocumentSource(["first doc", "", "second doc"]))
    ['first doc', 'second doc']
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

from moe_lab.data.errors import DataError

__all__ = [
    "DEFAULT_EXTENSIONS",
    "DocumentSource",
    "iter_documents",
    "read_hf_disk",
    "read_jsonl",
    "read_parquet",
    "read_text_file",
]

Format = Literal["auto", "text", "jsonl", "parquet", "hf_disk"]
TextUnit = Literal["file", "paragraph", "line"]

DEFAULT_EXTENSIONS: tuple[str, ...] = (".txt", ".md", ".rst", ".py", ".text")
"""File suffixes taken as text when a folder is walked."""

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_PARQUET_SUFFIXES = (".parquet",)
_GLOB_CHARS = re.compile(r"[*?\[]")
_PARAGRAPH_SPLIT = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


def read_text_file(path: Path, text_unit: TextUnit = "file") -> Iterator[str]:
    """Documents of one UTF-8 text file (the whole file, its paragraphs, or its lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not valid UTF-8 text (byte {err.start}); use format=jsonl/parquet?"
        ) from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from None
    if text_unit == "file":
        yield text
    elif text_unit == "paragraph":
        yield from (p for p in _PARAGRAPH_SPLIT.split(text) if p.strip())
    else:
        yield from text.splitlines()


def read_jsonl(path: Path, text_field: str = "text") -> Iterator[str]:
    """The ``text_field`` of each JSON object line; errors name the file, line number and field."""
    try:
        fh = path.open("r", encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from None
    with fh:
        lineno = 0
        try:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                if text_field not in obj:
                    keys = ", ".join(sorted(obj)[:10])
                    raise DataError(f"{path}:{lineno}: missing field '{text_field}' (keys: {keys})")
                value = obj[text_field]
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise DataError(
                        f"{path}:{lineno}: field '{text_field}' must be a string, got {type(value).__name__}"
                    )
                yield value
        except UnicodeDecodeError as err:
            raise DataError(f"{path}:{lineno + 1}: not valid UTF-8 (byte {err.start})") from None


def read_parquet(path: Path, text_field: str = "text") -> Iterator[str]:
    """Strings of column ``text_field`` of a Parquet file (nulls skipped), read in record batches."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install 'moe-lab[hf]'") from None
    try:
        pf = pq.ParquetFile(str(path))
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except Exception as err:
        raise DataError(f"cannot read Parquet file {path}: {err}") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: missing column '{text_field}' (columns: {', '.join(names)})")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(
                    f"{path}: column '{text_field}' must hold strings, got {type(value).__name__}"
                )
            yield value


def is_hf_disk_dir(path: Path) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def read_hf_disk(path: Path, text_field: str = "text") -> Iterator[str]:
    """Column ``text_field`` of a ``save_to_disk`` folder (every split of a DatasetDict, sorted by name)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {path} needs the 'datasets' package: pip install 'moe-lab[hf]'") from None
    if not path.exists():
        raise DataError(f"dataset folder not found: {path}")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"cannot load dataset saved with save_to_disk from {path}: {err}") from None
    parts = [(name, loaded[name]) for name in sorted(loaded)] if isinstance(loaded, dict) else [("", loaded)]
    for split, ds in parts:
        where = f"{path}[{split}]" if split else str(path)
        if text_field not in ds.column_names:
            raise DataError(f"{where}: missing column '{text_field}' (columns: {', '.join(ds.column_names)})")
        col = ds.select_columns([text_field])
        for start in range(0, len(col), 1024):
            for value in col[start : start + 1024][text_field]:
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise DataError(
                        f"{where}: column '{text_field}' must hold strings, got {type(value).__name__}"
                    )
                yield value


def _file_format(path: Path, fmt: Format) -> Format:
    if fmt != "auto":
        return fmt
    if is_hf_disk_dir(path):
        return "hf_disk"
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix in _PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def _walk(root: Path, fmt: Format, extensions: Sequence[str]) -> list[Path]:
    wanted = {e.lower() for e in extensions}
    if fmt == "auto":
        wanted |= {*_JSONL_SUFFIXES, *_PARQUET_SUFFIXES}
    elif fmt == "jsonl":
        wanted = set(_JSONL_SUFFIXES) | {".json"}
    elif fmt == "parquet":
        wanted = set(_PARQUET_SUFFIXES)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if Path(f).suffix.lower() in wanted)
    return sorted(found)


class DocumentSource:
    """A re-iterable, lazy stream of documents from a path, glob, folder, list of texts, or a mix.

    ``source`` is a path or glob (``str`` / ``Path``), or a list whose ``str`` items are documents and
    whose ``Path`` items are files. Iterating raises :class:`DataError` naming the source when no text is
    found at all.

    Example:
        >>> src = DocumentSource("corpus/**/*.md", text_unit="paragraph", max_documents=100)  # doctest: +SKIP
        >>> for doc in src: ...  # doctest: +SKIP
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        format: Format = "auto",
        text_field: str = "text",
        text_unit: TextUnit = "file",
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        max_documents: int | None = None,
        max_bytes: int | None = None,
        description: str | None = None,
    ) -> None:
        if format not in ("auto", "text", "jsonl", "parquet", "hf_disk"):
            raise DataError(
                f"unknown data format '{format}' (expected auto, text, jsonl, parquet or hf_disk)"
            )
        if text_unit not in ("file", "paragraph", "line"):
            raise DataError(f"unknown text_unit '{text_unit}' (expected file, paragraph or line)")
        self.source = source
        self.format: Format = format
        self.text_field = text_field
        self.text_unit: TextUnit = text_unit
        self.extensions = tuple(extensions)
        self.max_documents = max_documents
        self.max_bytes = max_bytes
        if description is None:
            if isinstance(source, (str, os.PathLike)):
                description = str(source)
            else:
                description = f"a list of {len(source)} items"
        self.description = description

    def _items(self) -> list[str | Path]:
        """Documents (str) and files (Path) in reading order; resolves globs and folders."""
        if isinstance(self.source, (str, os.PathLike)):
            return list(self._resolve(self.source))
        items: list[str | Path] = []
        for item in self.source:
            if isinstance(item, os.PathLike):
                items.extend(self._resolve(item))
            elif isinstance(item, str):
                items.append(item)
            else:
                raise DataError(
                    f"data source list items must be str (texts) or Path, got {type(item).__name__}"
                )
        return items

    def _resolve(self, spec: str | os.PathLike[str]) -> list[Path]:
        text = os.fspath(spec)
        path = Path(text).expanduser()
        if path.exists():
            if path.is_dir() and not (self.format in ("auto", "hf_disk") and is_hf_disk_dir(path)):
                if self.format == "hf_disk":
                    raise DataError(f"{path} is not a datasets.save_to_disk folder (no state.json)")
                files = _walk(path, self.format, self.extensions)
                if not files:
                    raise DataError(
                        f"no text found in {path}: no files with suffix {', '.join(self.extensions)}"
                    )
                return files
            return [path]
        if _GLOB_CHARS.search(text):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True))
            files = [m for m in matches if m.is_file() or is_hf_disk_dir(m)]
            if not files:
                raise DataError(f"no text found in {text}: the pattern matches no files")
            return files
        raise DataError(f"data source not found: {path}")

    def files(self) -> list[Path]:
        """The files (and ``save_to_disk`` folders) this source reads, in order."""
        return [i for i in self._items() if isinstance(i, Path)]

    def _raw(self) -> Iterator[str]:
        for item in self._items():
            if isinstance(item, str):
                yield item
                continue
            fmt = _file_format(item, self.format)
            if fmt == "text":
                yield from read_text_file(item, self.text_unit)
            elif fmt == "jsonl":
                yield from read_jsonl(item, self.text_field)
            elif fmt == "parquet":
                yield from read_parquet(item, self.text_field)
            else:
                yield from read_hf_disk(item, self.text_field)

    def __iter__(self) -> Iterator[str]:
        count = 0
        used = 0
        for doc in self._raw():
            if not doc:
                continue
            if self.max_bytes is not None:
                size = len(doc.encode("utf-8", errors="surrogatepass"))
                if used + size > self.max_bytes:
                    room = self.max_bytes - used
                    doc = doc.encode("utf-8", errors="surrogatepass")[:room].decode("utf-8", errors="ignore")
                    if doc:
                        count += 1
                        yield doc
                    break
                used += size
            count += 1
            yield doc
            if self.max_documents is not None and count >= self.max_documents:
                break
        if count == 0:
            raise DataError(f"no text found in {self.description}")

    def __repr__(self) -> str:
        return f"DocumentSource({self.description!r}, format={self.format!r}, text_unit={self.text_unit!r})"


def iter_documents(
    source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], **kwargs: object
) -> Iterator[str]:
    """Shorthand for ``iter(DocumentSource(source, **kwargs))``.

    Example:
        >>> next(iter_documents(["hello"]))
        'hello'
    """
    src = source if isinstance(source, (str, os.PathLike)) else list(source)
    return iter(DocumentSource(src, **kwargs))  # type: ignore[arg-type]
