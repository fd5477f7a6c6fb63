"""Hybrid search over one knowledge base's chunks.

An index holds the chunks' vectors (normalised, so a dot product is the
cosine) and a BM25 index of their lexical tokens (`text.lexical_tokens`),
both built once, when the base is indexed, never per query. A query is
ranked both ways and the two rankings are fused by reciprocal rank fusion
(Cormack, Clarke and Büttcher, SIGIR 2009): each chunk scores the sum of
1 / (RRF_K + rank) over the rankings it appears in. RRF needs no score
normalisation, which BM25's unbounded scores and cosines would otherwise
need, and k = 60 is the paper's value.

The index records the embedding model and dimension it was built with; a
query vector from another model is refused (`IndexMismatch`) instead of
being compared with vectors it does not share a space with.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import bm25s
import numpy as np

from chat.knowledge.text import lexical_tokens
from chatsite.errors import CodedError

#: Reciprocal rank fusion's constant.
RRF_K = 60
#: How deep each ranking is read before fusing.
DEPTH = 50


class IndexMismatch(CodedError):
    code = "knowledge_index_mismatch"


@dataclass(frozen=True)
class Hit:
    chunk: int  # the chunk's position in the index
    score: float  # the fused score (or the one ranking's, for a half alone)


@dataclass
class Index:
    """The searchable form of a base's chunks."""

    model: str
    vectors: np.ndarray  # (chunks, dimension), float32, rows of norm 1
    bm25: bm25s.BM25 = field(repr=False)

    @property
    def dimension(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @classmethod
    def build(cls, *, model: str, texts: list[str], vectors) -> "Index":
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise ValueError(f"{len(texts)} texts but vectors of shape {vectors.shape}")
        retriever = bm25s.BM25()
        # An empty token list would leave a chunk out of BM25's corpus and
        # shift every position after it: each chunk has at least one token.
        retriever.index([lexical_tokens(t) or ["\x00"] for t in texts], show_progress=False)
        return cls(model=model, vectors=_normalised(vectors), bm25=retriever)

    # --- the embedded store (docs/knowledge.md: measured against Qdrant) ---

    #: Written last: a directory without it is not an index.
    META = "index.json"

    def save(self, path: Path) -> Path:
        """Write the index to `path` (a new directory, built beside it and
        renamed into place: never half written; an index is never changed,
        a new model or new documents make a new one)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            np.save(staging / "vectors.npy", self.vectors)
            self.bm25.save(staging / "bm25", show_progress=False)
            (staging / self.META).write_text(json.dumps(
                {"model": self.model, "dimension": self.dimension, "chunks": len(self)}))
            os.rename(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: Path) -> "Index":
        path = Path(path)
        meta = json.loads((path / cls.META).read_text())
        vectors = np.load(path / "vectors.npy")
        if vectors.shape != (meta["chunks"], meta["dimension"]):
            raise IndexMismatch(f"{path}: vectors of shape {vectors.shape}, the index says "
                                f"{meta['chunks']} x {meta['dimension']}")
        return cls(model=meta["model"], vectors=vectors,
                   bm25=bm25s.BM25.load(path / "bm25", show_progress=False))

    # --- the two halves and their fusion ---------------------------------

    def dense(self, query_vector, *, model: str, k: int = DEPTH) -> list[Hit]:
        if model != self.model:
            raise IndexMismatch(f"this index was built with {self.model}, not {model}: it must be built again")
        vector = _normalised(np.asarray(query_vector, dtype=np.float32).reshape(1, -1))[0]
        if vector.shape[0] != self.dimension:
            raise IndexMismatch(f"a {vector.shape[0]}-dimensional query for a {self.dimension}-dimensional index")
        scores = self.vectors @ vector
        order = np.argsort(-scores, kind="stable")[:k]
        return [Hit(int(i), float(scores[i])) for i in order]

    def lexical(self, query: str, *, k: int = DEPTH) -> list[Hit]:
        tokens = lexical_tokens(query)
        if not tokens or not len(self):
            return []
        documents, scores = self.bm25.retrieve([tokens], k=min(k, len(self)), show_progress=False)
        return [Hit(int(d), float(s)) for d, s in zip(documents[0], scores[0]) if s > 0]

    def search(self, query: str, query_vector, *, model: str, k: int = 5) -> list[Hit]:
        """The best `k` chunks for the query, both rankings fused."""
        return rrf([self.dense(query_vector, model=model), self.lexical(query)])[:k]


def rrf(rankings: list[list[Hit]], *, k: int = RRF_K) -> list[Hit]:
    """Reciprocal rank fusion of rankings (best first); ties by first appearance."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            scores[hit.chunk] = scores.get(hit.chunk, 0.0) + 1.0 / (k + rank)
    return [Hit(chunk, score) for chunk, score in sorted(scores.items(), key=lambda kv: -kv[1])]


def _normalised(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)
