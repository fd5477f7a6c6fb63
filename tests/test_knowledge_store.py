"""Where an index's vectors live (chat/knowledge/search.py, docs/knowledge.md
"Where the vectors live"): the Qdrant store, in qdrant-client's local mode
under a temporary directory, answers as the embedded one on the labelled
set, refuses what the embedded one refuses, and goes with its index.
No server and no stack: a few seconds."""
import json
import time

import numpy as np
import pytest
from qdrant_client import QdrantClient

from chat.knowledge.search import Hit, Index, IndexMismatch, QdrantUnavailable, qdrant_close
from chat.knowledge.text import chunk_text, lexical_tokens
from tests.test_knowledge_retrieval import DIMENSION, MODEL, SET, embed

#: Scores closer than this are a tie: the matrix product and Qdrant's cosine
#: round differently (by ~1e-8 on this set), so equal vectors may swap.
TIE = 1e-6


@pytest.fixture(scope="module")
def built():
    texts = [chunk for text in SET["documents"].values()
             for chunk in chunk_text(text, count=lambda t: len(lexical_tokens(t)), size=40, overlap=8)]
    return Index.build(model=MODEL, texts=texts, vectors=np.stack([embed(t) for t in texts]))


@pytest.fixture
def qdrant(settings, tmp_path):
    """Local mode in tmp_path; the process's client is closed on each side,
    so that the next one opens with these settings (and lets go of its path)."""
    qdrant_close()
    settings.KNOWLEDGE_STORE, settings.QDRANT_URL, settings.QDRANT_PATH = "qdrant", "", tmp_path / "qdrant"
    yield settings
    qdrant_close()


def collections(path) -> set[str]:
    """The collections in the local store at `path`, seen by a client of its own."""
    qdrant_close()
    client = QdrantClient(path=str(path))
    try:
        return {c.name for c in client.get_collections().collections}
    finally:
        client.close()


def ranked(hits: list[Hit]) -> list[frozenset[int]]:
    """The chunks in order, those of tied scores together."""
    groups: list[tuple[float, set[int]]] = []
    for hit in hits:
        if groups and groups[-1][0] - hit.score < TIE:
            groups[-1][1].add(hit.chunk)
        else:
            groups.append((hit.score, {hit.chunk}))
    return [frozenset(chunks) for _, chunks in groups]


def test_a_qdrant_index_answers_as_the_embedded_one(built, qdrant, tmp_path):
    qdrant.KNOWLEDGE_STORE = "embedded"
    embedded = Index.load(built.save(tmp_path / "base-1" / "embedded"))
    qdrant.KNOWLEDGE_STORE = "qdrant"
    saved = built.save(tmp_path / "base-1" / "qdrant")

    meta = json.loads((saved / Index.META).read_text())
    assert meta["store"] == "qdrant" and meta["collection"].startswith("base-1.qdrant.")
    assert sorted(p.name for p in saved.iterdir()) == ["bm25", "index.json"]  # the vectors are Qdrant's
    index = Index.load(saved)
    assert (index.model, len(index), index.dimension) == (MODEL, len(built), DIMENSION)
    np.testing.assert_allclose(index.vectors, embedded.vectors, atol=1e-6)  # what ingest.py reuses
    everything = len(built)  # not DEPTH: a cut may fall inside a tie and keep different members of it
    for q in SET["questions"]:
        vector = embed(q["q"])
        assert ranked(index.dense(vector, model=MODEL, k=everything)) == ranked(
            embedded.dense(vector, model=MODEL, k=everything)), q["q"]
        got, want = (i.search(q["q"], vector, model=MODEL) for i in (index, embedded))
        assert len(got) == 5 and ranked(got) == ranked(want), q["q"]


def test_a_qdrant_index_refuses_a_query_from_another_model_or_dimension(built, qdrant, tmp_path):
    index = Index.load(built.save(tmp_path / "base-1" / "kb"))
    with pytest.raises(IndexMismatch):
        index.dense(embed("tides"), model="another-model")
    with pytest.raises(IndexMismatch):
        index.dense(np.ones(DIMENSION // 2), model=MODEL)


def test_drop_deletes_an_index_or_a_bases_indexes_with_their_collections(built, qdrant, tmp_path):
    base = tmp_path / "base-1"
    first, second = built.save(base / "kb-1"), built.save(base / "kb-2")
    qdrant.KNOWLEDGE_STORE = "embedded"
    built.save(base / "kb-3")
    first_name, second_name = (json.loads((p / Index.META).read_text())["collection"] for p in (first, second))
    assert collections(qdrant.QDRANT_PATH) == {first_name, second_name}

    Index.drop(first)
    assert not first.exists() and collections(qdrant.QDRANT_PATH) == {second_name}
    Index.drop(base)  # a base's directory: each index in it
    assert not base.exists() and collections(qdrant.QDRANT_PATH) == set()
    Index.drop(base)  # nothing there: nothing to do


def test_a_save_that_fails_leaves_no_collection_behind(built, qdrant, tmp_path):
    saved = built.save(tmp_path / "base-1" / "kb")
    with pytest.raises(OSError):  # an index is never written over
        built.save(saved)
    assert collections(qdrant.QDRANT_PATH) == {json.loads((saved / Index.META).read_text())["collection"]}
    assert sorted(p.name for p in saved.parent.iterdir()) == ["kb"]


def test_local_mode_held_elsewhere_is_a_clear_error(built, qdrant, tmp_path):
    saved = built.save(tmp_path / "base-1" / "kb")
    qdrant_close()
    other = QdrantClient(path=str(qdrant.QDRANT_PATH))  # as another process would hold it
    try:
        with pytest.raises(QdrantUnavailable, match="QDRANT_URL"):
            Index.load(saved)
    finally:
        other.close()
    assert len(Index.load(saved)) == len(built)


def test_a_qdrant_server_that_cannot_be_reached_is_a_clear_error(built, qdrant, tmp_path):
    saved = built.save(tmp_path / "base-1" / "kb")
    qdrant_close()
    qdrant.QDRANT_URL = "http://127.0.0.1:9"  # the discard port: nothing listens
    # The client checks the server's version in a thread of its own (kept:
    # it tells an operator of a mismatch); waited for, so it warns here.
    with pytest.warns(UserWarning, match="server version") as warned:
        with pytest.raises(QdrantUnavailable, match="127.0.0.1:9"):
            Index.load(saved)
        with pytest.raises(QdrantUnavailable):
            Index.drop(saved)
        deadline = time.monotonic() + 5
        while not warned.list and time.monotonic() < deadline:
            time.sleep(0.01)
    assert saved.exists()  # so that another try can find its collection
