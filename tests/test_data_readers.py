import pytest
from conftest import PYDOCS, write_jsonl

from lorafit.data.documents import Problems
from lorafit.data.prepare import PrepareOptions, prepare_documents
from lorafit.data.readers import find_files, html_main_text, read_documents
from lorafit.errors import DataError

LONG = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 10


def make_pdf(path, text: str) -> None:
    """A minimal valid one-page PDF with `text`, written without extra libraries."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))


def test_mixed_folder_reads_every_kind(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.md").write_text("# Title\n\n" + LONG)
    (tmp_path / "sub" / "b.txt").write_text("plain " + LONG)
    (tmp_path / "c.html").write_text(
        f"<html><body><nav>Menu Home About</nav><article><h1>Guide</h1><p>{LONG}</p>"
        "</article><footer>Copyright footer text</footer></body></html>"
    )
    write_jsonl(tmp_path / "d.jsonl", [{"text": "json " + LONG}, {"body": "other field " + LONG}])
    make_pdf(tmp_path / "e.pdf", "Portable document text about pathlib")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    problems = Problems()
    docs = read_documents([tmp_path], "text", problems)
    by_source = {d.source.rsplit("/", 1)[-1]: d.text for d in docs}
    assert set(by_source) >= {"a.md", "b.txt", "c.html", "e.pdf"}
    assert "pathlib" in by_source["e.pdf"]
    assert "Guide" in by_source["c.html"] and "Menu Home About" not in by_source["c.html"]
    assert any(t.startswith("json ") for t in by_source.values())
    # The record without a `text` field is reported with file and line.
    assert [p.where for p in problems.items] == [f"{tmp_path / 'd.jsonl'}:2"]
    assert "body" in problems.items[0].message


def test_text_field_is_configurable(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"body": "x " + LONG}])
    assert read_documents([tmp_path / "d.jsonl"], "body", Problems())[0].text.startswith("x ")


def test_unreadable_inputs_are_reported_and_counted(tmp_path):
    (tmp_path / "good.txt").write_text(LONG)
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 " * 100)
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    (tmp_path / "lines.jsonl").write_bytes(
        b'{"text": "' + b"Sockets, ports and TLS handshakes. " * 10 + b'"}\n{not json}\n[1, 2]\n\xff\xfe\n'
    )
    prepared = prepare_documents([tmp_path], PrepareOptions(valid_ratio=0))
    wheres = sorted(p.where for p in prepared.problems.items)
    assert str(tmp_path / "bad.txt") in wheres
    assert str(tmp_path / "broken.pdf") in wheres
    assert {f"{tmp_path / 'lines.jsonl'}:{n}" for n in (2, 3, 4)} <= set(wheres)
    assert prepared.stats["removed"]["unreadable"] == 5
    assert prepared.stats["documents_kept"] == 2


def test_missing_path_and_empty_folder_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        find_files([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no supported documents"):
        find_files([tmp_path / "empty"])


def test_sphinx_html_keeps_code_and_tables_drops_navigation():
    html = (PYDOCS / "tutorial" / "controlflow.html").read_text()
    text = html_main_text(html)
    assert ">>> x = int(input(" in text  # code block kept
    assert "    print('Negative changed to zero')" in text  # with its indentation
    assert "Navigation" not in text and "previous |" not in text  # Sphinx navigation dropped
    assert "Theme\nAuto" not in text
    table_page = html_main_text((PYDOCS / "library" / "string.html").read_text())
    assert "Presentation Type" in table_page or "Meaning" in table_page  # table content kept


def test_code_inside_sphinx_definition_lists_keeps_its_lines():
    text = html_main_text((PYDOCS / "library" / "itertools.html").read_text())
    assert "itertools.accumulate(iterable[, func, *, initial=None])" in text  # the signature (<dt>)
    assert ">>> data = [3, 4, 6, 2, 1, 9, 0, 7, 5, 8]\n>>> list(accumulate(data, operator.mul))" in text
    assert "def accumulate(iterable, func=operator.add, *, initial=None):\n    'Return running totals'" in text


def test_unparsable_html_is_still_read():
    assert html_main_text("") == ""
    assert "hello world" in html_main_text("<p>" + "hello world " * 20 + "</p>")


def test_prepared_html_has_no_pilcrow_anchors():
    prepared = prepare_documents([PYDOCS / "tutorial"], PrepareOptions(valid_ratio=0))
    assert prepared.train and all("\u00b6" not in d.text for d in prepared.train)
