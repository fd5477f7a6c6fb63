"""knowledge_store: where a knowledge base's vectors live (issue 15, the
choice in docs/knowledge.md), measured before choosing.

    .venv/bin/python bench/knowledge_store.py [--chunks 1000,10000] [--dimension 384]

The embedded store (a normalised float32 matrix saved as .npy, searched
with one matrix-vector product) against Qdrant's local mode
(`qdrant-client`, `QdrantClient(path=...)`, when it is installed: `pip
install qdrant-client==1.20.0`; a project dependency since the Qdrant store), and the BM25
half (bm25s over `chat.knowledge.text.lexical_tokens`): build, reopen and
query latency (top 50) on random unit vectors and random 150-token chunks.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bm25s  # noqa: E402
import numpy as np  # noqa: E402

from chat.knowledge.text import lexical_tokens  # noqa: E402

QUERIES = 200


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    return f"p50 {statistics.median(ordered) * 1000:.2f} ms, p99 {ordered[int(0.99 * (len(ordered) - 1))] * 1000:.2f} ms"


def embedded(vectors: np.ndarray, queries: np.ndarray, directory: str) -> str:
    path = os.path.join(directory, "vectors.npy")
    started = time.perf_counter()
    np.save(path, vectors)
    build = time.perf_counter() - started
    started = time.perf_counter()
    loaded = np.load(path)
    reopen = time.perf_counter() - started
    latencies = []
    for q in queries:
        started = time.perf_counter()
        scores = loaded @ q
        top = np.argpartition(-scores, 50)[:50]
        top[np.argsort(-scores[top])]
        latencies.append(time.perf_counter() - started)
    return f"build {build * 1000:.1f} ms, reopen {reopen * 1000:.1f} ms, query {_ms(latencies)}"


def qdrant_local(vectors: np.ndarray, queries: np.ndarray, directory: str) -> str:
    try:
        from qdrant_client import QdrantClient, models
    except ImportError:
        return "not measured: qdrant-client is not installed"
    path = os.path.join(directory, "qdrant")
    started = time.perf_counter()
    client = QdrantClient(path=path)
    client.create_collection("k", vectors_config=models.VectorParams(size=vectors.shape[1],
                                                                     distance=models.Distance.COSINE))
    for i in range(0, len(vectors), 1000):
        client.upsert("k", points=models.Batch(ids=list(range(i, min(len(vectors), i + 1000))),
                                               vectors=vectors[i:i + 1000].tolist()))
    build = time.perf_counter() - started
    client.close()
    started = time.perf_counter()
    client = QdrantClient(path=path)
    client.count("k")
    reopen = time.perf_counter() - started
    latencies = []
    for q in queries:
        started = time.perf_counter()
        client.query_points("k", query=q.tolist(), limit=50)
        latencies.append(time.perf_counter() - started)
    client.close()
    return f"build {build:.2f} s, reopen {reopen * 1000:.0f} ms, query {_ms(latencies)}"


def bm25(chunks: int, rng: random.Random) -> str:
    words = [f"w{i}" for i in range(20000)] + [chr(0x4E00 + i) for i in range(3000)]
    texts = [" ".join(rng.choices(words, k=150)) for _ in range(chunks)]
    started = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index([lexical_tokens(t) for t in texts], show_progress=False)
    build = time.perf_counter() - started
    latencies = []
    for _ in range(QUERIES):
        tokens = lexical_tokens(" ".join(rng.choices(words, k=8)))
        started = time.perf_counter()
        retriever.retrieve([tokens], k=50, show_progress=False)
        latencies.append(time.perf_counter() - started)
    return f"build {build:.2f} s ({chunks / build:,.0f} chunks/s), query {_ms(latencies)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", default="1000,10000")
    parser.add_argument("--dimension", type=int, default=384)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for n in (int(x) for x in args.chunks.split(",")):
        vectors = rng.standard_normal((n, args.dimension)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        queries = rng.standard_normal((QUERIES, args.dimension)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        directory = tempfile.mkdtemp(prefix="knowledge-store-")
        try:
            print(f"{n} chunks, dimension {args.dimension}:")
            print(f"  embedded (.npy, matrix product): {embedded(vectors, queries, directory)}")
            print(f"  Qdrant local mode:               {qdrant_local(vectors, queries, directory)}")
            print(f"  BM25 (bm25s):                    {bm25(n, random.Random(0))}", flush=True)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
