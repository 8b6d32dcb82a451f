"""Corpus: the bundled KJV, and documents from the user's txt/jsonl files and directories."""

import json
from pathlib import Path

import pytest

from iota.data import Corpus, kjv_path


def test_kjv_by_chapter_and_book() -> None:
    chapters = Corpus.kjv()
    assert kjv_path().name == "kjv.jsonl"
    assert len(chapters) == 1189
    assert chapters.documents[0].source == "Genesis 1"
    assert chapters.documents[0].text.startswith("In the beginning God created the heaven and the earth.\n")
    assert chapters.documents[-1].source == "Revelation 22"
    assert chapters.documents[-1].text.endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    books = Corpus.kjv("book")
    assert len(books) == 66 and books.documents[18].source == "Psalms"
    assert books.characters == chapters.characters + 2 * (
        len(chapters) - len(books)
    )  # "\n\n" between chapters
    assert Corpus.kjv().digest == chapters.digest != books.digest


def test_digest_covers_content_order_and_boundaries() -> None:
    base = Corpus.from_texts(["ab", "c"])
    assert base.digest == Corpus.from_texts(["ab", "c"], name="other").digest  # names are not content
    assert base.digest != Corpus.from_texts(["a", "bc"]).digest
    assert base.digest != Corpus.from_texts(["c", "ab"]).digest
    assert base.digest != Corpus.from_texts(["ab", "d"]).digest
    with pytest.raises(ValueError, match="no documents"):
        Corpus.from_texts([])


def test_txt_files_whole_or_split_on_blank_lines(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("First paragraph\nstill first.\n\n  \nSecond one.\n\n\nThird.\n")
    (tmp_path / "b.txt").write_text("Only one.")
    whole = Corpus.from_paths([tmp_path / "a.txt", tmp_path / "b.txt"])
    assert whole.texts == ["First paragraph\nstill first.\n\n  \nSecond one.\n\n\nThird.\n", "Only one."]
    split = Corpus.from_paths([tmp_path / "a.txt", tmp_path / "b.txt"], split_paragraphs=True)
    assert split.texts == ["First paragraph\nstill first.", "Second one.", "Third.", "Only one."]
    assert [d.source for d in split][:2] == ["a.txt#0", "a.txt#1"]


def test_jsonl_with_a_chosen_field_and_clear_errors(tmp_path: Path) -> None:
    rows = [{"content": "one"}, {"content": ""}, {"content": "two", "text": "ignored"}]
    path = tmp_path / "export.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    corpus = Corpus.from_paths([path], text_field="content")
    assert corpus.texts == ["one", "two"]  # the empty record adds nothing
    assert [d.source for d in corpus] == ["export.jsonl:1", "export.jsonl:3"]
    with pytest.raises(ValueError, match=r"export.jsonl:1: no string field 'text'"):
        Corpus.from_paths([path])


def test_directory_is_read_recursively_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "late.txt").write_text("late")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "jsonl row"}) + "\n")
    (tmp_path / "a.txt").write_text("early")
    (tmp_path / "notes.md").write_text("not corpus text")
    corpus = Corpus.from_paths([tmp_path])
    assert corpus.texts == ["early", "jsonl row", "late"]
    with pytest.raises(ValueError, match="unsupported corpus file"):
        Corpus.from_paths([tmp_path / "notes.md"])
    with pytest.raises(FileNotFoundError):
        Corpus.from_paths([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        Corpus.from_paths([tmp_path / "empty"])


def test_parquet_without_pyarrow_says_what_to_do(tmp_path: Path) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "x.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pyarrow"):
            Corpus.from_paths([tmp_path / "x.parquet"])
    else:
        pytest.skip("pyarrow is installed; the missing-dependency message cannot be observed")
