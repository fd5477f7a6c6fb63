"""Uploaded documents' text (chat/knowledge/parse.py, issue 15): text,
Markdown and PDF read; an encrypted PDF, one with no text layer, a
corrupt file, a binary file and an unknown type each get their own clear
error."""
import io

import pytest
from pypdf import PdfReader, PdfWriter

from chat.knowledge.parse import (
    DocumentError, EncryptedDocument, NoTextLayer, UnsupportedType, document_text,
)


def pdf_with_text(*lines: str) -> bytes:
    """A one-page PDF whose text layer holds `lines` (Helvetica, ASCII)."""
    stream = "BT /F1 12 Tf 72 720 Td " + " ".join(f"({line}) Tj 0 -16 Td" for line in lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = io.BytesIO(), []
    out.write(b"%PDF-1.4\n")
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n{body}\nendobj\n".encode())
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    out.write("".join(f"{o:010d} 00000 n \n" for o in offsets).encode())
    out.write(f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()


def test_text_markdown_and_a_pdf_are_read():
    assert document_text("notes.txt", "长江是中国第一长河。\r\nSecond line".encode("utf-8-sig")) == \
        "长江是中国第一长河。\nSecond line"
    assert document_text("README.MD", b"# Title\n\nBody") == "# Title\n\nBody"
    text = document_text("etna.pdf", pdf_with_text("Mount Etna is an active volcano.", "It is in Sicily."))
    assert "Mount Etna is an active volcano." in text and "Sicily" in text


def test_each_unreadable_document_gets_its_own_clear_error():
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf_with_text("secret"))))
    writer.encrypt("a password")
    encrypted = io.BytesIO()
    writer.write(encrypted)
    blank = PdfWriter()
    blank.add_blank_page(width=612, height=792)
    scanned = io.BytesIO()
    blank.write(scanned)
    cases = {
        ("locked.pdf", encrypted.getvalue()): (EncryptedDocument, "encrypted"),
        ("scan.pdf", scanned.getvalue()): (NoTextLayer, "OCR"),
        ("broken.pdf", b"%PDF-1.4\nthis is not a PDF at all"): (DocumentError, "not a readable PDF"),
        ("photo.txt", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"): (DocumentError, "not UTF-8"),
        ("empty.md", b"  \n\n "): (NoTextLayer, "no text"),
        ("slides.pptx", b"PK\x03\x04"): (UnsupportedType, ".txt, .md and .pdf"),
    }
    for (name, data), (error, words) in cases.items():
        with pytest.raises(error) as raised:
            document_text(name, data)
        assert name in str(raised.value) and words in str(raised.value), (name, str(raised.value))
        assert raised.value.code.startswith("document_")
