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

Where the vectors live is the index's store (KNOWLEDGE_STORE, chosen when
an index is saved and recorded in it, so an index is always read from
where it was written): the embedded matrix (`MatrixVectors`, the default,
no server) or a Qdrant collection (`QdrantVectors`). Either way the index
is a directory holding the BM25 half and index.json, and the same `Index`
searches it (docs/knowledge.md, "Where the vectors live").
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import uuid
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import bm25s
import numpy as np
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from chat.knowledge.text import lexical_tokens
from chatsite.errors import CodedError

#: Reciprocal rank fusion's constant.
RRF_K = 60
#: How deep each ranking is read before fusing.
DEPTH = 50


class IndexMismatch(CodedError, ValueError):
    """The index cannot answer: another model or dimension, or its vectors
    are not what index.json says (a ValueError: ingest.py then embeds the
    base's chunks again rather than reuse them)."""

    code = "knowledge_index_mismatch"


class QdrantUnavailable(CodedError):
    """Qdrant cannot be reached or refused a call, or its local mode is
    open in another process (several processes need a server)."""

    code = "knowledge_store_unavailable"


@dataclass(frozen=True)
class Hit:
    chunk: int  # the chunk's position in the index
    score: float  # the fused score (or the one ranking's, for a half alone)


@dataclass
class Index:
    """The searchable form of a base's chunks."""

    model: str
    store: MatrixVectors | QdrantVectors = field(repr=False)
    bm25: bm25s.BM25 = field(repr=False)

    @property
    def vectors(self) -> np.ndarray:
        """(chunks, dimension), float32, rows of norm 1: ingest.py reuses them
        when a base gets more files (read back from Qdrant for that store)."""
        return self.store.vectors()

    @property
    def dimension(self) -> int:
        return self.store.dimension

    def __len__(self) -> int:
        return len(self.store)

    @classmethod
    def build(cls, *, model: str, texts: list[str], vectors) -> "Index":
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise ValueError(f"{len(texts)} texts but vectors of shape {vectors.shape}")
        retriever = bm25s.BM25()
        # An empty token list would leave a chunk out of BM25's corpus and
        # shift every position after it: each chunk has at least one token.
        retriever.index([lexical_tokens(t) or ["\x00"] for t in texts], show_progress=False)
        return cls(model=model, store=MatrixVectors(_normalised(vectors)), bm25=retriever)

    # --- on disk (and in Qdrant) ---------------------------------------------

    #: Written last: a directory without it is not an index.
    META = "index.json"

    def save(self, path: Path) -> Path:
        """Write the index to `path` (a new directory, built beside it and
        renamed into place: never half written; an index is never changed,
        a new model or new documents make a new one), its vectors to the
        configured store."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        store = _store(_configured_store())
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        written = None
        try:
            self.bm25.save(staging / "bm25", show_progress=False)
            written = store.write(self.vectors, directory=staging, name=f"{path.parent.name}.{path.name}")
            (staging / self.META).write_text(json.dumps(
                {"model": self.model, "dimension": self.dimension, "chunks": len(self),
                 "store": store.name, **written}))
            os.rename(staging, path)
        except BaseException:
            if written is not None:  # e.g. `path` exists: the vectors written for it go too
                store.forget(written)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: Path) -> "Index":
        path = Path(path)
        meta = json.loads((path / cls.META).read_text())
        # Indexes written before there was a choice of store have no "store".
        store = _store(meta.get("store", MatrixVectors.name)).read(path, meta)
        if (len(store), store.dimension) != (meta["chunks"], meta["dimension"]):
            raise IndexMismatch(f"{path}: {len(store)} vectors of dimension {store.dimension}, the index says "
                                f"{meta['chunks']} x {meta['dimension']}")
        return cls(model=meta["model"], store=store, bm25=bm25s.BM25.load(path / "bm25", show_progress=False))

    @classmethod
    def drop(cls, path: Path) -> None:
        """Delete the index at `path`, or every index under it (a base's
        directory), with what it keeps outside the directory (its Qdrant
        collection), then the directory. Nothing there: nothing to do.
        A collection that cannot be deleted raises, and the directory that
        names it stays, so that another try can find it."""
        path = Path(path)
        for meta_file in [path / cls.META, *path.glob(f"*/{cls.META}")]:
            try:
                meta = json.loads(meta_file.read_text())
            except FileNotFoundError:
                continue
            _store(meta.get("store", MatrixVectors.name)).forget(meta)
        shutil.rmtree(path, ignore_errors=True)

    # --- the two halves and their fusion ---------------------------------

    def dense(self, query_vector, *, model: str, k: int = DEPTH) -> list[Hit]:
        if model != self.model:
            raise IndexMismatch(f"this index was built with {self.model}, not {model}: it must be built again")
        vector = _normalised(np.asarray(query_vector, dtype=np.float32).reshape(1, -1))[0]
        if vector.shape[0] != self.dimension:
            raise IndexMismatch(f"a {vector.shape[0]}-dimensional query for a {self.dimension}-dimensional index")
        return self.store.nearest(vector, k=k)

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
    """Reciprocal rank fusion of rankings (best first). A tie goes to the
    better rank in the *last* ranking, then to first appearance. `search`
    puts the lexical ranking last: of two passages one ranking prefers each,
    the one with the query's own words comes first, which a reader can check.
    Ties are the rule, not a corner: a chunk first in one ranking and second
    in the other ties with its mirror image (1/61 + 1/62 each), and the
    dense side's order of near-equal scores can turn on float rounding
    (the CPU copy of a model against the GPU's)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            scores[hit.chunk] = scores.get(hit.chunk, 0.0) + 1.0 / (k + rank)
    last = {hit.chunk: rank for rank, hit in enumerate(rankings[-1] if rankings else [])}
    order = sorted(scores.items(), key=lambda kv: (-kv[1], last.get(kv[0], len(last))))
    return [Hit(chunk, score) for chunk, score in order]


# --- the vector stores --------------------------------------------------------
#
# Each: `write(vectors, directory=, name=)` stores an index's vectors and
# returns what index.json must record to find them; `read(directory, meta)`
# opens them; `forget(meta)` deletes what lives outside the directory. An
# opened store has `len()`, `dimension`, `vectors()` and `nearest(vector, k=)`
# (best first, ties by position).


class MatrixVectors:
    """The embedded store: one normalised float32 matrix, vectors.npy in the
    index's directory, searched with one matrix-vector product."""

    name = "embedded"
    FILE = "vectors.npy"

    def __init__(self, matrix: np.ndarray) -> None:
        self.matrix = matrix

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def dimension(self) -> int:
        return int(self.matrix.shape[1])

    def vectors(self) -> np.ndarray:
        return self.matrix

    def nearest(self, vector: np.ndarray, *, k: int) -> list[Hit]:
        scores = self.matrix @ vector
        order = np.argsort(-scores, kind="stable")[:k]
        return [Hit(int(i), float(scores[i])) for i in order]

    @classmethod
    def write(cls, vectors: np.ndarray, *, directory: Path, name: str) -> dict:
        np.save(directory / cls.FILE, vectors)
        return {}

    @classmethod
    def read(cls, directory: Path, meta: dict) -> "MatrixVectors":
        return cls(np.load(directory / cls.FILE))

    @classmethod
    def forget(cls, meta: dict) -> None:
        pass  # all of it is in the directory


class QdrantVectors:
    """A Qdrant collection per index (cosine; point id = chunk position),
    on the server at QDRANT_URL, or in qdrant-client's local mode under
    QDRANT_PATH when that is blank."""

    name = "qdrant"
    #: Points per upsert: 1,000 vectors of 384 floats are ~4 MB of JSON,
    #: well under a Qdrant server's 32 MB request limit (its
    #: `service.max_request_size_mb` default).
    BATCH = 1000

    def __init__(self, collection: str, *, dimension: int, count: int) -> None:
        self.collection, self.dimension, self.count = collection, dimension, count

    def __len__(self) -> int:
        return self.count

    def vectors(self) -> np.ndarray:
        matrix = np.zeros((self.count, self.dimension), dtype=np.float32)
        for start in range(0, self.count, self.BATCH):
            with _qdrant() as client:
                points = client.retrieve(self.collection, with_vectors=True,
                                         ids=list(range(start, min(self.count, start + self.BATCH))))
            for point in points:
                matrix[int(point.id)] = point.vector
        return matrix

    def nearest(self, vector: np.ndarray, *, k: int) -> list[Hit]:
        with _qdrant() as client:
            points = client.query_points(self.collection, query=vector.tolist(), limit=k).points
        # Qdrant leaves the order of equal scores open; the matrix's is by position.
        return sorted((Hit(int(p.id), float(p.score)) for p in points), key=lambda h: (-h.score, h.chunk))

    @classmethod
    def write(cls, vectors: np.ndarray, *, directory: Path, name: str) -> dict:
        from qdrant_client import models

        # A random tail: no name is used twice, so the collection of a save
        # that failed after its upload cannot be taken for a later one's.
        collection = f"{name}.{uuid.uuid4().hex[:8]}"
        with _qdrant() as client:
            client.create_collection(collection, vectors_config=models.VectorParams(
                size=int(vectors.shape[1]), distance=models.Distance.COSINE))
        try:
            for start in range(0, len(vectors), cls.BATCH):  # a batch at a time: queries go on between
                batch = vectors[start:start + cls.BATCH]
                with _qdrant() as client:
                    client.upsert(collection, wait=True, points=models.Batch(
                        ids=list(range(start, start + len(batch))), vectors=batch.tolist()))
        except BaseException:
            cls.forget({"collection": collection})
            raise
        return {"collection": collection}

    @classmethod
    def read(cls, directory: Path, meta: dict) -> "QdrantVectors":
        collection = meta["collection"]
        with _qdrant() as client:
            if not client.collection_exists(collection):
                raise IndexMismatch(f"{directory}: its Qdrant collection {collection} is gone")
            count = client.count(collection, exact=True).count
        return cls(collection, dimension=meta["dimension"], count=count)

    @classmethod
    def forget(cls, meta: dict) -> None:
        with _qdrant() as client:  # a collection already gone is no error, on a server or in local mode
            client.delete_collection(meta["collection"])


_STORES = {store.name: store for store in (MatrixVectors, QdrantVectors)}


def _store(name: str) -> type[MatrixVectors] | type[QdrantVectors]:
    try:
        return _STORES[name]
    except KeyError:
        raise ImproperlyConfigured(f"no knowledge store {name!r}: KNOWLEDGE_STORE is one of "
                                   f"{sorted(_STORES)}") from None


def _configured_store() -> str:
    try:
        return settings.KNOWLEDGE_STORE
    except ImproperlyConfigured:  # no Django: bench/knowledge.py saves indexes bare, and the matrix needs none
        return MatrixVectors.name


# --- the process's Qdrant client ----------------------------------------------
#
# One per process, made on first use, never at import: local mode locks its
# path for the process that opens it (a second client, even in the same
# process, is refused) and loads every collection into memory as it opens.
# Local mode is not thread-safe (its points are numpy arrays grown in place,
# its persistence one SQLite connection), so its calls take turns; a
# server's client is an HTTP client, and its calls run side by side.


_client = None
_client_turns: AbstractContextManager = nullcontext()
_client_lock = threading.Lock()


@contextmanager
def _qdrant():
    """The process's Qdrant client, for one call or a few."""
    from qdrant_client.http.exceptions import ApiException

    global _client, _client_turns
    with _client_lock:
        if _client is None:
            _client, _client_turns = _qdrant_connect()
        client, turns = _client, _client_turns
    with turns:
        try:
            yield client
        except ApiException as exc:  # unreachable, or a refusal (a collection dropped under a query)
            raise QdrantUnavailable(f"Qdrant at {settings.QDRANT_URL}: {exc}") from exc


def _qdrant_connect():
    from qdrant_client import QdrantClient

    if settings.QDRANT_URL:
        return QdrantClient(url=settings.QDRANT_URL), nullcontext()
    try:
        return QdrantClient(path=str(settings.QDRANT_PATH), force_disable_check_same_thread=True), threading.Lock()
    except RuntimeError as exc:  # "already accessed by another instance of Qdrant client"
        raise QdrantUnavailable(f"Qdrant's local mode at {settings.QDRANT_PATH} is open in another process; "
                                "several processes need a Qdrant server: set QDRANT_URL.") from exc


def qdrant_close() -> None:
    """Close the process's Qdrant client (local mode: let go of its path);
    the next use opens one from the settings of then (tests change them)."""
    global _client
    with _client_lock:
        if _client is not None:
            with _client_turns:
                _client.close()
            _client = None


def _normalised(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)
