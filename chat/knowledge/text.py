"""Text for retrieval: lexical tokens and chunks.

BM25 needs words. Chinese has no spaces between them, and a dictionary
segmenter (jieba) is a 20 MB dictionary and a second of loading per
process; overlapping character bigrams are what Lucene's CJK analyzer
uses, need nothing, and match a two-character word wherever it stands.
Latin-script text is lowercased and split into words.

Chunks are measured with the embedding model's own tokenizer (`count`):
what it truncates is what the vector does not see. A text is cut at the
coarsest boundary that makes pieces short enough: paragraphs, then lines,
then sentence ends (. ! ? and 。！？), then spaces, then characters; the
pieces are packed into chunks of at most `size` tokens, each starting with
the last `overlap` tokens' worth of pieces of the one before.
"""
from __future__ import annotations

import re
from typing import Callable

#: Han characters (CJK Unified Ideographs, extension A, compatibility).
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_HAN}]+|[^\W{_HAN}_]+", re.UNICODE)
_IS_HAN = re.compile(rf"[{_HAN}]")

#: The boundaries a text is cut at, coarsest first ("" = anywhere).
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])")
BOUNDARIES = ("\n\n", "\n", _SENTENCE_END, " ", "")


def lexical_tokens(text: str) -> list[str]:
    """Lowercased words; a run of Han characters as its overlapping
    bigrams (a single character as itself)."""
    tokens: list[str] = []
    for match in _TOKEN.finditer(text):
        run = match.group()
        if _IS_HAN.match(run):
            tokens.extend([run] if len(run) == 1 else [run[i:i + 2] for i in range(len(run) - 1)])
        else:
            tokens.append(run.lower())
    return tokens


def chunk_text(text: str, *, count: Callable[[str], int], size: int = 400, overlap: int = 50) -> list[str]:
    """The text as chunks of at most `size` tokens by `count` (a piece
    that cannot be cut finer, one character, may be alone over it), each
    but the first starting with up to `overlap` tokens of the one before."""
    if overlap >= size:
        raise ValueError("the overlap must be smaller than the chunk")
    pieces = [(p, count(p)) for p in _pieces(text, count, size, 0) if p.strip()]
    chunks: list[str] = []
    current: list[tuple[str, int]] = []
    total = 0  # the tokens in `current`
    for piece, tokens in pieces:
        if current and total + tokens > size:
            chunks.append("".join(p for p, _ in current).strip())
            # The next chunk starts with the tail of this one, up to
            # `overlap`, leaving room for the piece that did not fit.
            kept, total = 0, 0
            while kept < len(current) and total + current[-1 - kept][1] <= min(overlap, size - tokens):
                total += current[-1 - kept][1]
                kept += 1
            current = current[len(current) - kept:]
        current.append((piece, tokens))
        total += tokens
    if current:
        chunks.append("".join(p for p, _ in current).strip())
    return [c for c in chunks if c]


def _pieces(text: str, count: Callable[[str], int], size: int, level: int) -> list[str]:
    """`text` cut at BOUNDARIES[level] (the boundary kept with the piece
    before it), each piece over `size` cut again at the next boundary."""
    if count(text) <= size or level == len(BOUNDARIES):
        return [text]
    boundary = BOUNDARIES[level]
    if boundary == "":
        parts = list(text)
    elif isinstance(boundary, str):
        parts = [p + boundary for p in text.split(boundary)]
        parts[-1] = parts[-1][:-len(boundary)]
    else:
        parts = boundary.split(text)
    out: list[str] = []
    for part in parts:
        if part:
            out.extend(_pieces(part, count, size, level + 1))
    return out
