"""The embedding engine (gpu_manager/engines.py EmbeddingEngine, issue 15)
on the demo embedder the project builds itself: vectors of norm 1, the
same text the same vector in a batch or alone, padding without effect,
and an unload that frees what it loaded (weakrefs and the allocator)."""
import numpy as np
import pytest

from gpu_manager.demo_embedder import demo_embedder_create
from gpu_manager.engines import EmbeddingEngine


@pytest.fixture(scope="module")
def embedder_path(tmp_path_factory):
    return demo_embedder_create(path=tmp_path_factory.mktemp("models") / "embed_demo")


@pytest.fixture
def engine(embedder_path):
    engine = EmbeddingEngine(name="embed_demo", path=str(embedder_path), device="cpu",
                             query_prefix="query: ", passage_prefix="passage: ")
    engine.load()
    yield engine
    if engine.model is not None:
        engine.unload()


def test_vectors_are_normalised_and_a_text_embeds_the_same_alone_or_padded_in_a_batch(engine):
    texts = ["长江是中国第一长河", "Mount Etna is an active volcano on the east coast of Sicily, in Italy.", "tea"]
    vectors = engine.embed(texts)
    assert vectors.shape == (3, engine.dimension) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    alone = engine.embed([texts[2]])  # no padding: the mean is over the real tokens only
    assert np.allclose(alone[0], vectors[2], atol=1e-5)
    assert not np.allclose(engine.embed([texts[2]], kind="query")[0], alone[0], atol=1e-3)  # the prefixes count
    assert engine.embed([]).shape == (0, engine.dimension)


def test_the_token_count_is_the_models_own_tokenizer(engine):
    assert engine.token_count("长江") == 2  # one WordPiece word per Chinese character
    assert engine.token_count("") == 0


def test_unloading_frees_the_model(engine):
    assert engine.nbytes > 0
    survivors = engine.unload()
    assert survivors == {} and not engine.loaded and engine.model is None


def test_an_unknown_pooling_is_refused(embedder_path):
    with pytest.raises(ValueError):
        EmbeddingEngine(name="x", path=str(embedder_path), device="cpu", pooling="max")
