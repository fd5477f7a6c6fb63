"""The text of an uploaded document: plain text, Markdown or PDF.

A document that yields no text gets a clear error of its own
(`DocumentError`, one per document), never a base half indexed: an
encrypted PDF, a PDF with no text layer (a scan: OCR is not done here),
a corrupt file, a file that is not UTF-8 text, or an unknown type.
PDFs are read with pypdf (pure Python, maintained by the py-pdf project).
"""
from __future__ import annotations

import io
from pathlib import PurePath

from chatsite.errors import CodedError

TEXT_TYPES = {".txt": "text", ".md": "markdown", ".markdown": "markdown", ".pdf": "pdf"}


class DocumentError(CodedError):
    code = "document_unreadable"


class UnsupportedType(DocumentError):
    code = "document_type_unsupported"


class EncryptedDocument(DocumentError):
    code = "document_encrypted"


class NoTextLayer(DocumentError):
    code = "document_no_text"


def document_text(filename: str, data: bytes) -> str:
    """The document's text; DocumentError (naming the file) otherwise."""
    kind = TEXT_TYPES.get(PurePath(filename).suffix.lower())
    if kind is None:
        raise UnsupportedType(f"{filename}: only .txt, .md and .pdf files can be added "
                              f"({', '.join(sorted(TEXT_TYPES))})")
    text = _pdf_text(filename, data) if kind == "pdf" else _plain_text(filename, data)
    if not text.strip():
        raise NoTextLayer(f"{filename}: no text in it" + (
            " (a scanned PDF has only images: run OCR on it first)" if kind == "pdf" else ""))
    return text


def _plain_text(filename: str, data: bytes) -> str:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{filename}: not UTF-8 text (byte {exc.start})") from None
    if "\x00" in text:
        raise DocumentError(f"{filename}: a binary file, not text")
    return text.replace("\r\n", "\n")


def _pdf_text(filename: str, data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        encrypted = reader.is_encrypted
        pages = [] if encrypted else [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise DocumentError(f"{filename}: not a readable PDF ({type(exc).__name__}: {exc})") from None
    if encrypted:
        raise EncryptedDocument(f"{filename}: the PDF is encrypted; add it without the password")
    # Pages as paragraphs: the chunker cuts there first.
    return "\n\n".join(p.strip() for p in pages if p.strip())
