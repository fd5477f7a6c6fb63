"""knowledge: what knowledge bases cost (issue 15): ingestion in chunks/s,
and the latency retrieval adds before a reply's first token.

    .venv/bin/python bench/knowledge.py [--device cpu] [--repeats 3] [--chunks 1000,10000] [--queries 200]

Ingestion runs the pieces chat/knowledge/ingest.py calls, in this process
and without the database, on a generated corpus (the labelled set's English
and Chinese texts, tests/data/knowledge_set.json, their sentences shuffled
into long documents: .txt, .md and one PDF): `document_text`, `chunk_text`
counting with the demo embedder's tokenizer (`EmbeddingEngine.token_count`,
chunk_text's 400 tokens and 50 of overlap, the settings' defaults),
`EmbeddingEngine.embed(kind="passage")` a document's chunks at a time, 32 a
batch, on the demo embedder (gpu_manager/demo_embedder.py, built on the
spot), then `Index.build` and `Index.save`. The floor is the embedding
alone: the model's work, which no pipeline avoids.

Retrieval builds an index of each size in `--chunks` (chunk-sized texts
from the same generator, for BM25; random unit vectors of the embedder's
dimension: a dense search costs the same whatever the vectors hold), saves
it, then times each query (the labelled set's 48 questions in turn) through
what a reply pays before its first token: the query's embedding
(kind="query"), `Index.load` (uncached: the first reply after a restart;
chat/knowledge/retrieve.py keeps an index open after that), and
`Index.search(k=5)`. Its floor in the same run is numpy's matrix-vector
product and top 5 over the same vectors; its peer, the demo chat model's
first token (`LocalEngine.generate`, one new token), which a reply pays
anyway.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import fmt, mark, percentile, results_write, spread  # noqa: E402
from chat.knowledge.parse import document_text  # noqa: E402
from chat.knowledge.search import Index  # noqa: E402
from chat.knowledge.text import chunk_text  # noqa: E402

SET = json.loads((ROOT / "tests" / "data" / "knowledge_set.json").read_text())
EMBEDDER = "embed_demo"
#: The generated corpus: documents per language, paragraphs per document
#: (about 500 chunks in all: ~2 s an ingestion on 2 cores).
DOCUMENTS, PARAGRAPHS = 20, 40
#: Paragraphs per chunk-sized text of a retrieval index (~400 demo tokens).
CHUNK_PARAGRAPHS = 4
#: ingest.py's EMBED_BATCH (EmbeddingEngine.embed's default too).
EMBED_BATCH = 32
#: Uncached loads timed per index size (each a full read of the index).
LOADS = 20
STAGES = ("parse", "chunk", "embed", "build", "save")


class Corpus:
    """Deterministic text: the labelled set's paragraphs, sentences shuffled."""

    _SENTENCE = re.compile(r"(?<=[.!?。！？])\s*")

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.pools = {lang: [t for name, t in SET["documents"].items() if name.startswith(lang)]
                      for lang in ("en", "zh")}

    def paragraph(self, lang: str) -> str:
        sentences = [s for s in self._SENTENCE.split(self.rng.choice(self.pools[lang])) if s]
        self.rng.shuffle(sentences)
        return (" " if lang == "en" else "").join(sentences)

    def text(self, lang: str, paragraphs: int) -> str:
        return "\n\n".join(self.paragraph(lang) for _ in range(paragraphs))

    def documents(self) -> list[tuple[str, bytes]]:
        """(filename, bytes) as uploaded: English .txt and .md, Chinese .txt,
        and one English PDF (the standard PDF fonts have no Chinese)."""
        files = []
        for i in range(DOCUMENTS):
            files.append((f"en-{i}.{'md' if i % 2 else 'txt'}", self.text("en", PARAGRAPHS).encode()))
            files.append((f"zh-{i}.txt", self.text("zh", PARAGRAPHS).encode()))
        files.append(("en.pdf", _pdf([self.text("en", 8) for _ in range(4)])))
        return files


def _pdf(pages: list[str]) -> bytes:
    """A minimal PDF: a page per text, its lines in Helvetica (ASCII only)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        lines = [line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
                 for paragraph in text.split("\n\n") for line in textwrap.wrap(paragraph, 100)]
        stream = ("BT /F1 9 Tf 11 TL 40 800 Td " + " T* ".join(f"({line}) Tj" for line in lines) + " ET").encode()
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] "
                       b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % (len(objects)))
        kids.append(b"%d 0 R" % len(objects))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(kids), len(kids))
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _timed(call):
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def ingest(embedder, files: list[tuple[str, bytes]], directory: Path) -> dict:
    """One ingestion of `files`: each stage's seconds and the chunks."""
    seconds = dict.fromkeys(STAGES, 0.0)
    texts, vectors = [], []
    for name, data in files:
        text, took = _timed(lambda: document_text(name, data))
        seconds["parse"] += took
        chunks, took = _timed(lambda: chunk_text(text, count=embedder.token_count))
        seconds["chunk"] += took
        rows, took = _timed(lambda: embedder.embed(chunks, kind="passage", batch_size=EMBED_BATCH))
        seconds["embed"] += took
        texts += chunks
        vectors.append(rows)
    index, seconds["build"] = _timed(lambda: Index.build(model=EMBEDDER, texts=texts, vectors=np.vstack(vectors)))
    _, seconds["save"] = _timed(lambda: index.save(directory))
    return {"chunks": len(texts), "seconds": seconds}


def retrieval(embedder, size: int, directory: Path, queries: int) -> dict:
    """Per-query timings of each part against an index of `size` chunks."""
    corpus = Corpus(seed=size)
    texts = [corpus.text("en" if i % 2 else "zh", CHUNK_PARAGRAPHS) for i in range(size)]
    vectors = np.random.default_rng(size).standard_normal((size, embedder.dimension)).astype(np.float32)
    Index.build(model=EMBEDDER, texts=texts, vectors=vectors).save(directory)
    index, first_load = _timed(lambda: Index.load(directory))
    questions = [q["q"] for q in SET["questions"]]
    parts = {name: [] for name in ("embed", "search", "dense", "lexical", "floor", "load", "uncached")}
    for i in range(queries):
        question = questions[i % len(questions)]
        vector, took = _timed(lambda: embedder.embed([question], kind="query")[0])
        parts["embed"].append(took)
        parts["search"].append(_timed(lambda: index.search(question, vector, model=EMBEDDER, k=5))[1])
        parts["dense"].append(_timed(lambda: index.dense(vector, model=EMBEDDER))[1])
        parts["lexical"].append(_timed(lambda: index.lexical(question))[1])
        parts["floor"].append(_timed(lambda: _top(index.vectors, vector, 5))[1])
    for i in range(LOADS):  # the first reply after a restart: the index read again, then searched
        question = questions[i % len(questions)]
        started = time.perf_counter()
        vector = embedder.embed([question], kind="query")[0]
        loaded, took = _timed(lambda: Index.load(directory))
        loaded.search(question, vector, model=EMBEDDER, k=5)
        parts["load"].append(took)
        parts["uncached"].append(time.perf_counter() - started)
    parts["cached"] = [e + s for e, s in zip(parts["embed"], parts["search"])]
    return {"chunks": size, "dimension": embedder.dimension, "first_load": first_load, "parts": parts}


def _top(vectors: np.ndarray, vector: np.ndarray, k: int) -> np.ndarray:
    scores = vectors @ vector
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def first_token(engine, queries: int) -> list[float]:
    """The demo chat model's time to one new token for each question."""
    questions = [q["q"] for q in SET["questions"]]
    return [_timed(lambda: engine.generate([{"role": "user", "content": questions[i % len(questions)]}],
                                           max_new_tokens=1, temperature=0.0, top_p=1.0,
                                           on_text=lambda text: None, should_stop=lambda: False))[1]
            for i in range(queries)]


def _ms(samples: list[float]) -> str:
    return f"{percentile(samples, 50) * 1000:.2f} / {percentile(samples, 99) * 1000:.2f} ms"


def _p50(size: dict, part: str) -> float:
    return percentile(size["parts"][part], 50)


def _stats(samples: list[float]) -> dict:
    return {"p50": percentile(samples, 50), "p99": percentile(samples, 99), "n": len(samples)}


def report(ingestions: list[dict], sizes: list[dict], peer: list[float], args, files: int) -> None:
    chunks = ingestions[0]["chunks"]
    stage = {s: spread([r["seconds"][s] for r in ingestions]) for s in STAGES}
    total = spread([sum(r["seconds"].values()) for r in ingestions])
    share = {s: spread([r["seconds"][s] / sum(r["seconds"].values()) for r in ingestions]) for s in STAGES}
    per_second = {s: spread([chunks / r["seconds"][s] for r in ingestions]) for s in STAGES}
    overall = spread([chunks / sum(r["seconds"].values()) for r in ingestions])
    over_floor = spread([r["seconds"]["embed"] / sum(r["seconds"].values()) for r in ingestions])
    notes = {"parse": f"document_text, {files} files (.txt, .md, 1 PDF)",
             "chunk": "chunk_text, counting with EmbeddingEngine.token_count",
             "embed": f"EmbeddingEngine.embed(kind=\"passage\"), {EMBED_BATCH} a batch: the floor",
             "build": "Index.build (normalise, BM25 index)", "save": "Index.save (.npy, BM25 files, index.json)"}
    rows = [[s, fmt(stage[s], " s", digits=3), fmt(share[s], " %", 100, 0), fmt(per_second[s], "", digits=0),
             notes[s]] for s in STAGES]
    rows.append(["all", fmt(total, " s", digits=3), "100 %", fmt(overall, "", digits=0),
                 f"{fmt(over_floor, 'x', digits=2)} the embedding alone's chunks/s"])
    ingestion_table = {
        "title": f"knowledge ingestion: {chunks} chunks (≤ 400 tokens) of English and Chinese, "
                 f"{EMBEDDER} on {args.device}; median (min…max) over {len(ingestions)} runs",
        "header": ["stage", "seconds", "share", "chunks/s (stage alone)", "note"], "rows": rows}

    def row(label: str, part: str) -> list[str]:
        return [label, *(_ms(size["parts"][part]) for size in sizes)]

    def ratio(label: str, part: str, floor) -> list[str]:
        return [label, *(f"{_p50(size, part) / floor(size):.2f}x" for size in sizes)]

    first = percentile(peer, 50)
    rows = [row("the query's embedding (kind=\"query\")", "embed"),
            row("Index.search(k=5): both halves, fused", "search"),
            row("  its dense half (Index.dense, top 50)", "dense"),
            row("  its BM25 half (Index.lexical, top 50)", "lexical"),
            row("floor: numpy vectors @ query, top 5", "floor"),
            ratio("search ÷ floor (p50)", "search", lambda size: _p50(size, "floor")),
            row("added, index kept open: embed + search", "cached"),
            ["Index.load, first after the save", *(f"{size['first_load'] * 1000:.2f} ms" for size in sizes)],
            row(f"Index.load, again ({LOADS} loads)", "load"),
            row("added, index not open: embed + load + search", "uncached"),
            ["peer: the demo chat model's first token", *(_ms(peer) for _ in sizes)],
            ratio("added (kept open) ÷ first token (p50)", "cached", lambda size: first),
            ratio("added (not open) ÷ first token (p50)", "uncached", lambda size: first)]
    retrieval_table = {
        "title": f"knowledge retrieval: what a reply pays before its first token, {EMBEDDER} on {args.device}, "
                 f"dimension {sizes[0]['dimension']}; p50 / p99 over {args.queries} queries (English and Chinese)",
        "header": ["part", *(f"{size['chunks']:,} chunks" for size in sizes)], "rows": rows}
    figures = {
        "ingestion": {"chunks": chunks, "chunks_per_second": overall, "over_embedding_alone": over_floor,
                      "seconds": stage, "share": share, "raw": ingestions},
        "retrieval": {str(size["chunks"]): {"first_load": size["first_load"],
                                            **{name: _stats(samples) for name, samples in size["parts"].items()}}
                      for size in sizes},
        "first_token": _stats(peer),
        "params": vars(args),
    }
    results_write("knowledge", tables=[ingestion_table, retrieval_table], figures=figures, notes=[
        "retrieval's vectors are random unit vectors of the embedder's dimension and its texts come from the "
        "corpus generator, not from chunk_text: the search costs the same; uncached loads read files the OS "
        "has cached (the index was just written)",
        "the first token is local_demo's (a tiny random Llama) on the question alone, without the passages a "
        "reply with sources adds to its prompt: a real model's takes longer, so these ratios overstate "
        "retrieval's share"])


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="the embedder's and the chat model's device")
    parser.add_argument("--repeats", type=int, default=3, help="ingestions of the whole corpus")
    parser.add_argument("--chunks", default="1000,10000", help="retrieval index sizes, comma-separated")
    parser.add_argument("--queries", type=int, default=200, help="queries timed per index size")
    return parser


def main() -> None:
    args = parser().parse_args()
    from gpu_manager.demo_embedder import demo_embedder_create
    from gpu_manager.demo_model import demo_model_create
    from gpu_manager.engines import EmbeddingEngine, LocalEngine

    mark("knowledge")
    with tempfile.TemporaryDirectory(prefix="bench-knowledge-") as tmp:
        tmp = Path(tmp)
        embedder = EmbeddingEngine(name=EMBEDDER, path=str(demo_embedder_create(path=tmp / EMBEDDER)),
                                   device=args.device)
        embedder.load()
        files = Corpus().documents()
        ingest(embedder, files, tmp / "warm-up")  # first calls: allocations, thread pools
        ingestions = []
        for i in range(args.repeats):
            ingestions.append(ingest(embedder, files, tmp / f"ingest-{i}"))
            print(f"  ingestion {i + 1}: {ingestions[-1]['chunks']} chunks in "
                  f"{sum(ingestions[-1]['seconds'].values()):.2f} s", flush=True)
        sizes = []
        for size in (int(n) for n in args.chunks.split(",")):
            sizes.append(retrieval(embedder, size, tmp / f"index-{size}", args.queries))
            print(f"  retrieval over {size} chunks: search p50 {_p50(sizes[-1], 'search') * 1000:.2f} ms", flush=True)
        embedder.unload()
        chat = LocalEngine(name="local_demo", path=str(demo_model_create(path=tmp / "local_demo")), device=args.device)
        chat.load()
        first_token(chat, 5)  # warm-up
        peer = first_token(chat, args.queries)
        chat.unload()
    report(ingestions, sizes, peer, args, len(files))


if __name__ == "__main__":
    main()
