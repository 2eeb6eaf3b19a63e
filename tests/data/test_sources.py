"""Document sources: every format, globs and folders, limits, and errors that name the file/line/field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_lab.data import DataError, DocumentSource, iter_documents


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_list_of_strings_skips_empty_and_is_reiterable() -> None:
    src = DocumentSource(["a", "", "b 🙂"])
    assert list(src) == ["a", "b 🙂"]
    assert list(src) == ["a", "b 🙂"]
    assert list(iter_documents(["x"])) == ["x"]


def test_text_file_units(tmp_path: Path) -> None:
    f = _write(tmp_path / "a.txt", "para one\nstill one\n\n  \npara two\n")
    assert list(DocumentSource(f)) == ["para one\nstill one\n\n  \npara two\n"]
    assert list(DocumentSource(f, text_unit="paragraph")) == ["para one\nstill one", "para two\n"]
    assert list(DocumentSource(str(f), text_unit="line")) == ["para one", "still one", "  ", "para two"]


def test_glob_and_directory_are_sorted_and_recursive(tmp_path: Path) -> None:
    _write(tmp_path / "b.txt", "B")
    _write(tmp_path / "a.md", "A")
    _write(tmp_path / "sub" / "c.py", "C")
    _write(tmp_path / "sub" / "skip.bin", "X")
    _write(tmp_path / ".hidden" / "h.txt", "H")
    assert list(DocumentSource(tmp_path)) == ["A", "B", "C"]
    assert list(DocumentSource(str(tmp_path / "*.txt"))) == ["B"]
    assert list(DocumentSource(str(tmp_path / "**" / "*.py"))) == ["C"]
    assert list(DocumentSource(tmp_path, extensions=[".txt"])) == ["B"]
    assert [p.name for p in DocumentSource(tmp_path).files()] == ["a.md", "b.txt", "c.py"]


def test_jsonl_default_and_named_field(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    rows = [{"text": "one", "body": "uno"}, {"text": "two", "body": "dos"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert list(DocumentSource(f)) == ["one", "two"]
    assert list(DocumentSource(f, text_field="body")) == ["uno", "dos"]
    # a folder mixing text and JSONL in auto mode
    _write(tmp_path / "z.txt", "zed")
    assert list(DocumentSource(tmp_path)) == ["one", "two", "zed"]


def test_jsonl_errors_name_file_line_and_field(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        list(DocumentSource(f))
    f.write_text('{"text": "ok"}\n\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: missing field 'text' \(keys: body\)"):
        list(DocumentSource(f))
    f.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'text' must be a string"):
        list(DocumentSource(f))
    f.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: expected a JSON object"):
        list(DocumentSource(f))


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["alpha", None, "beta"], "n": [1, 2, 3]}), f)
    assert list(DocumentSource(f, text_field="content")) == ["alpha", "beta"]
    with pytest.raises(DataError, match=r"d\.parquet: missing column 'text' \(columns: content, n\)"):
        list(DocumentSource(f))
    bad = _write(tmp_path / "bad.parquet", "not parquet")
    with pytest.raises(DataError, match=r"cannot read Parquet file .*bad\.parquet"):
        list(DocumentSource(bad))


def test_hf_save_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    one = tmp_path / "one"
    datasets.Dataset.from_dict({"text": ["first", "second"], "x": [1, 2]}).save_to_disk(str(one))
    assert list(DocumentSource(one)) == ["first", "second"]
    assert list(DocumentSource(one, format="hf_disk")) == ["first", "second"]
    both = tmp_path / "both"
    dd = datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_dict({"body": ["v"]}),
            "train": datasets.Dataset.from_dict({"body": ["t1", "t2"]}),
        }
    )
    dd.save_to_disk(str(both))
    assert list(DocumentSource(both, text_field="body")) == ["t1", "t2", "v"]
    with pytest.raises(DataError, match=r"both\[train\]: missing column 'text' \(columns: body\)"):
        list(DocumentSource(both))
    with pytest.raises(DataError, match=r"not a datasets\.save_to_disk folder"):
        list(DocumentSource(tmp_path / "one" / "..", format="hf_disk"))


def test_limits(tmp_path: Path) -> None:
    docs = ["aaaa", "bbbb", "cccc"]
    assert list(DocumentSource(docs, max_documents=2)) == ["aaaa", "bbbb"]
    assert list(DocumentSource(docs, max_bytes=6)) == ["aaaa", "bb"]
    assert list(DocumentSource(docs, max_bytes=8)) == ["aaaa", "bbbb"]
    # a cut never splits a UTF-8 character
    assert list(DocumentSource(["é€"], max_bytes=4)) == ["é"]


def test_errors_missing_empty_and_bad_encoding(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data source not found: .*nothere\.txt"):
        list(DocumentSource(tmp_path / "nothere.txt"))
    with pytest.raises(DataError, match=r"no text found in .*\*\.txt: the pattern matches no files"):
        list(DocumentSource(str(tmp_path / "*.txt")))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError, match=r"no text found in .*empty"):
        list(DocumentSource(empty_dir))
    _write(tmp_path / "blank.txt", "")
    with pytest.raises(DataError, match=r"no text found in .*blank\.txt"):
        list(DocumentSource(tmp_path / "blank.txt"))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt: not valid UTF-8"):
        list(DocumentSource(latin))
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        DocumentSource("x", format="csv")  # type: ignore[arg-type]
