"""Read raw documents from files and folders: HTML, Markdown, text, PDF and JSONL.

A file (or JSONL line) that cannot be read is reported with its path and line and skipped, so one
bad file never stops a run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from lorafit.data.documents import Document, Problems
from lorafit.data.records import RECORD_SUFFIXES, iter_records
from lorafit.errors import DataError

log = logging.getLogger(__name__)

HTML_SUFFIXES = {".html", ".htm"}
TEXT_SUFFIXES = {".md", ".markdown", ".txt"}
SUFFIXES = HTML_SUFFIXES | TEXT_SUFFIXES | RECORD_SUFFIXES | {".pdf"}


def find_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into the supported files, in a stable order."""
    files: list[Path] = []
    for entry in inputs:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not found:
                raise DataError(f"{path}: no supported documents inside ({', '.join(sorted(SUFFIXES))}).")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise DataError(
                    f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(sorted(SUFFIXES))}."
                )
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder; check the path.")
    return files


# trafilatura flattens <pre> blocks nested in definition lists (one line per code example), and
# Sphinx puts every function's documentation in one (<dl><dt>signature</dt><dd>text, examples</dd>).
_DEFINITION_LIST_TAGS = {"dl": "div", "dt": "p", "dd": "div"}


def _parse_html(html: str):
    """An lxml tree with definition lists turned into paragraphs and blocks, or the raw string."""
    import lxml.etree
    import lxml.html

    try:
        tree = lxml.html.fromstring(html)
    except (lxml.etree.ParserError, ValueError):
        return html
    for element in tree.iter(*_DEFINITION_LIST_TAGS):
        element.tag = _DEFINITION_LIST_TAGS[element.tag]
    return tree


def html_main_text(html: str) -> str:
    """Main content of an HTML page; navigation, headers and footers dropped, code and tables kept."""
    import trafilatura

    text = trafilatura.extract(
        _parse_html(html),
        include_comments=False,
        include_tables=True,
        include_formatting=False,
        include_links=False,
        include_images=False,
        with_metadata=False,
        output_format="txt",
        deduplicate=False,
    )
    return text or ""


def pdf_text(path: Path) -> str:
    from pypdf import PdfReader

    reader = PdfReader(str(path))
    return "\n\n".join((page.extract_text() or "") for page in reader.pages)


def read_jsonl(
    path: Path, text_field: str, problems: Problems, start: int = 0, end: int | None = None, first_line: int = 1
) -> Iterator[Document]:
    """Documents of a JSONL file (or of its lines from byte `start` to `end`, see iter_records)."""
    for where, record in iter_records(path, problems, start, end, first_line):
        text = record.get(text_field)
        if not isinstance(text, str):
            found = ", ".join(sorted(map(str, record))) or "none"
            problems.add(
                where,
                "unreadable",
                f"no text field '{text_field}' (fields: {found}); set data.text_field / --text-field",
            )
            continue
        yield Document(text=text, source=str(record.get("source") or where))


def read_file(path: Path, text_field: str, problems: Problems) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix in RECORD_SUFFIXES:
        yield from read_jsonl(path, text_field, problems)
        return
    try:
        if suffix == ".pdf":
            text = pdf_text(path)
        else:
            text = path.read_bytes().decode("utf-8")
            if suffix in HTML_SUFFIXES:
                text = html_main_text(text)
    except UnicodeDecodeError as exc:
        problems.add(str(path), "unreadable", f"not valid UTF-8 (byte {exc.start})")
        return
    except Exception as exc:  # a broken PDF or HTML raises many kinds; skipping is the contract
        problems.add(str(path), "unreadable", f"cannot be read ({exc.__class__.__name__}: {exc})")
        return
    yield Document(text=text, source=str(path))


def read_documents(inputs: Iterable[str | Path], text_field: str, problems: Problems) -> list[Document]:
    """All documents under `inputs`; unreadable files and lines land in `problems`."""
    documents: list[Document] = []
    for path in find_files(inputs):
        documents.extend(read_file(path, text_field, problems))
    return documents
