"""`POST /v1/embeddings` (issue 16) through the official `openai` client,
against the web server as `make run` starts it, real Celery workers (GPU,
knowledge, CPU) and the fake Ollama and OpenAI servers: a local embedding
engine on the GPU worker or the knowledge worker's CPU by the GPU's owner,
Ollama on its GPU under a lease or on its CPU, an OpenAI endpoint with the
caller's parameters passed through, the errors, and embeddings batches."""
import base64
import json
import math
import struct

import httpx
import numpy as np
import openai
import pytest
from django.conf import settings

from chat.catalog import catalog_forget, local_spec
from chat.models import ModelConfig, ModelKind
from gpu_manager.leases import Leases
from gpu_manager.state import GpuStateStore
from tests.fakes import model as fake_model
from tests.support.api import jsonl, request_line, wait_batch

pytestmark = pytest.mark.django_db(transaction=True)

EMBEDDER = "embed_demo"
OLLAMA_EMBEDDER = "nomic-embed-text:latest"
OPENAI_EMBEDDER = "text-embedding-3-small"


def store() -> GpuStateStore:
    return GpuStateStore(slot=settings.GPU_SLOT)


@pytest.fixture
def engine(demo_engines):
    """The demo embedder loaded in this process, on the CPU: what the
    workers' copies compute for the same texts."""
    from gpu_manager.engines import engine_create

    loaded = engine_create(local_spec(EMBEDDER), device="cpu")
    loaded.load()
    yield loaded
    loaded.unload()


@pytest.fixture
def embedders(stack):
    """The fakes offer an embedding model beside their chat model."""
    stack.ollama.models = ("qwen:7b", OLLAMA_EMBEDDER)
    stack.openai.models = ("gpt-4o-mini", OPENAI_EMBEDDER)
    catalog_forget()
    yield
    stack.ollama.models = ("qwen:7b",)
    stack.openai.models = ("gpt-4o-mini",)
    catalog_forget()


def gpu_to_local(api) -> None:
    """A local reply: the local models hold the GPU."""
    ModelConfig.objects.filter(name="local_demo").update(max_new_tokens=4)
    api.chat.completions.create(model="local_demo", messages=[{"role": "user", "content": "hi"}])
    assert store().read().owner == "local"


def gpu_to_ollama(api) -> None:
    api.chat.completions.create(model="ollama_qwen:7b", messages=[{"role": "user", "content": "hi"}])
    state = store().read()
    assert (state.owner, state.local_models) == ("ollama", []), state


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def local_loads() -> int:
    return sum(1 for e in store().events(settings.GPU_EVENTS_KEPT) if e["kind"] == "local_load")


# --- a local engine ----------------------------------------------------------------

def test_local_engine_on_the_gpu_worker_while_the_local_models_hold_the_gpu(api, demo_model, engine, workers):
    gpu_to_local(api)
    texts = ["The volcano on Sicily is Etna.", "Sourdough needs a starter.", "茶起源于中国。"]
    expected = engine.embed(texts, kind="passage")  # the demo has no prefixes: the text as given

    # The client's default: it asks for base64 and decodes it itself.
    answer = api.embeddings.create(model=EMBEDDER, input=texts)
    assert answer.object == "list" and answer.model == EMBEDDER
    assert [d.index for d in answer.data] == [0, 1, 2] and all(d.object == "embedding" for d in answer.data)
    got = np.array([d.embedding for d in answer.data], dtype=np.float32)
    assert got.shape == (3, engine.dimension)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == sum(engine.token_count(t) for t in texts)
    assert answer.model_extra["embedded_by"].startswith("gpu worker on ")
    assert store().read().owner == "local"

    # A string, as floats on the wire.
    raw = api.embeddings.with_raw_response.create(model=EMBEDDER, input=texts[0], encoding_format="float")
    body = json.loads(raw.text)
    assert isinstance(body["data"][0]["embedding"], list) and len(body["data"]) == 1
    np.testing.assert_allclose(body["data"][0]["embedding"], expected[0], atol=1e-5)
    # Asked for base64 explicitly: the client hands the string over as it came.
    b64 = api.embeddings.create(model=EMBEDDER, input=[texts[1]], encoding_format="base64").data[0].embedding
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(b64), dtype="<f4"), got[1], atol=1e-6)
    # The model's own dimension may be named; another may not (the demo was not trained to be cut).
    assert len(api.embeddings.create(model=EMBEDDER, input="x", dimensions=engine.dimension).data[0].embedding) \
        == engine.dimension
    with pytest.raises(openai.BadRequestError) as caught:
        api.embeddings.create(model=EMBEDDER, input="x", dimensions=8)
    assert caught.value.param == "dimensions"


def test_local_engine_on_the_cpu_while_ollama_holds_the_gpu(api, engine, workers):
    gpu_to_ollama(api)
    loads = local_loads()
    answer = api.embeddings.create(model=EMBEDDER, input=["same text", "other words", "same text"],
                                   encoding_format="float")
    assert answer.model_extra["embedded_by"] == "knowledge worker on cpu"
    a, b, c = (np.array(d.embedding) for d in answer.data)
    assert cosine(a, c) == pytest.approx(1.0, abs=1e-6) and cosine(a, b) < 0.99
    np.testing.assert_allclose(a, engine.embed(["same text"], kind="passage")[0], atol=1e-5)
    # Nothing local was loaded for it, and Ollama keeps the GPU.
    assert local_loads() == loads
    state = store().read()
    assert (state.owner, state.local_models) == ("ollama", []), state


def test_input_type_asks_for_the_models_prefixes(api, engine, workers):
    """An e5-style row (prefixes set in the admin) on the same weights: no
    prefix by default, the query's or the passage's with `input_type`."""
    gpu_to_ollama(api)  # on the knowledge worker: this row never becomes resident on the GPU
    ModelConfig.objects.create(name="embed_prefixed", kind=ModelKind.EMBEDDING, path=engine.path,
                               query_prefix="query: ", passage_prefix="passage: ")
    text = "Where is Etna?"

    def vector(**extra):
        return np.array(api.embeddings.create(model="embed_prefixed", input=text, **extra).data[0].embedding)

    plain, query, passage = vector(), vector(extra_body={"input_type": "query"}), \
        vector(extra_body={"input_type": "passage"})
    np.testing.assert_allclose(plain, engine.embed([text], kind="passage")[0], atol=1e-5)
    np.testing.assert_allclose(query, engine.embed(["query: " + text], kind="passage")[0], atol=1e-5)
    np.testing.assert_allclose(passage, engine.embed(["passage: " + text], kind="passage")[0], atol=1e-5)
    with pytest.raises(openai.BadRequestError) as caught:
        api.embeddings.create(model="embed_prefixed", input=text, extra_body={"input_type": "document"})
    assert caught.value.param == "input_type"


# --- Ollama ------------------------------------------------------------------------

def test_ollama_on_its_gpu_under_a_lease_while_it_holds_the_gpu(api, embedders, workers, stack):
    gpu_to_ollama(api)
    stack.ollama.clear()
    answer = api.embeddings.create(model=f"ollama_{OLLAMA_EMBEDDER}", input=["one", "two"], dimensions=16)
    sent = stack.ollama.requests_to("/api/embed")[-1].body
    assert sent["model"] == OLLAMA_EMBEDDER and sent["input"] == ["one", "two"] and sent["dimensions"] == 16
    assert "num_gpu" not in (sent.get("options") or {}) and "keep_alive" not in sent
    assert answer.model_extra["embedded_by"].startswith("ollama on the GPU")
    np.testing.assert_allclose(answer.data[1].embedding, fake_model.embedding("two", 16), atol=1e-7)
    assert answer.usage.prompt_tokens == 2  # the fake's prompt_eval_count
    assert Leases(slot=settings.OLLAMA_GPU_SLOT).live() == []  # released


def test_ollama_on_its_cpu_while_the_local_models_hold_the_gpu(api, demo_model, demo_engines, embedders, workers,
                                                              stack):
    gpu_to_local(api)
    stack.ollama.clear()
    answer = api.embeddings.create(model=f"ollama_{OLLAMA_EMBEDDER}", input="one", encoding_format="float")
    sent = stack.ollama.requests_to("/api/embed")[-1].body
    assert sent["input"] == ["one"] and sent["options"] == {"num_gpu": 0} and sent["keep_alive"] == 0
    assert answer.model_extra["embedded_by"] == "ollama on the CPU (num_gpu 0)"
    np.testing.assert_allclose(answer.data[0].embedding, fake_model.embedding("one"), atol=1e-7)
    assert store().read().owner == "local"  # the local models kept the GPU: nothing was switched for it

    with pytest.raises(openai.BadRequestError) as caught:  # a chat model: Ollama's runner refuses it
        api.embeddings.create(model="ollama_qwen:7b", input="one")
    assert caught.value.param == "model"
    with pytest.raises(openai.BadRequestError) as caught:  # Ollama takes text only
        api.embeddings.create(model=f"ollama_{OLLAMA_EMBEDDER}", input=[[1, 2, 3]])
    assert caught.value.param == "input"


# --- an OpenAI-compatible endpoint ---------------------------------------------------

def test_openai_endpoint_gets_the_callers_parameters(api, embedders, workers, stack):
    model = f"openai_{OPENAI_EMBEDDER}"
    answer = api.embeddings.create(model=model, input=["x", "y"], dimensions=4, user="user-42")
    sent = stack.openai.requests_to("/v1/embeddings")[-1].body
    assert sent == {"model": OPENAI_EMBEDDER, "input": ["x", "y"], "encoding_format": "base64", "dimensions": 4,
                    "user": "user-42"}
    np.testing.assert_allclose(answer.data[0].embedding, fake_model.embedding("x", 4), atol=1e-7)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 0

    # Token ids go through as they are; floats come back as floats.
    raw = api.embeddings.with_raw_response.create(model=model, input=[[1, 2, 3], [4]], encoding_format="float")
    assert stack.openai.requests_to("/v1/embeddings")[-1].body["input"] == [[1, 2, 3], [4]]
    body = json.loads(raw.text)
    assert [len(d["embedding"]) for d in body["data"]] == [8, 8] and body["model"] == model

    with pytest.raises(openai.BadRequestError) as caught:  # a chat model: the endpoint refuses (403)
        api.embeddings.create(model="openai_gpt-4o-mini", input="x")
    assert caught.value.param == "model"
    stack.openai.fail_status = 500
    with pytest.raises(openai.InternalServerError) as caught:
        api.embeddings.create(model=model, input="x")
    assert caught.value.status_code == 502


# --- errors --------------------------------------------------------------------------

def test_errors_in_openai_shape(api, api_server, api_key, demo_model, demo_engines):
    def refused(status, param, **create):
        with pytest.raises(openai.APIStatusError) as caught:
            api.embeddings.create(**{"model": EMBEDDER, "input": "x", **create})
        assert (caught.value.status_code, caught.value.param) == (status, param), caught.value.body
        return caught.value

    assert refused(404, "model", model="no-such-model").code == "model_not_found"
    assert "embedding model" in refused(400, "model", model="local_demo").message
    refused(400, "model", model="translate_demo")
    for bad in ("", [], ["a", ""], ["a", 1], [[]], [True], [[1, -2]]):
        refused(400, "input", input=bad)
    refused(400, "input", input=["x"] * (settings.EMBEDDINGS_MAX_INPUTS + 1))
    refused(400, "input", input=[1, 2, 3])  # token ids: the local engine takes text
    refused(400, "dimensions", dimensions=0)
    error = refused(400, "foo", extra_body={"foo": 1})
    assert error.body["message"] == "Unrecognized request argument supplied: foo"

    headers = {"Authorization": f"Bearer {api_key}"}
    answer = httpx.post(f"{api_server}/v1/embeddings", json={"model": EMBEDDER, "input": "x",
                                                              "encoding_format": "hex"}, headers=headers)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "encoding_format"
    answer = httpx.post(f"{api_server}/v1/embeddings", json={"model": EMBEDDER, "input": "x"})
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    answer = httpx.get(f"{api_server}/v1/embeddings", headers=headers)
    assert answer.status_code == 405 and answer.headers["Allow"] == "POST"
    assert answer.json()["error"]["type"] == "invalid_request_error"

    # Listed for /v1 (owned_by "local"), but no chat model.
    listed = {m.id: m for m in api.models.list()}
    assert listed[EMBEDDER].owned_by == "local" and api.models.retrieve(EMBEDDER).id == EMBEDDER
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=EMBEDDER, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.param == "model" and caught.value.code == "not_a_chat_model"
    assert "/v1/embeddings" in caught.value.body["message"]


# --- batches ---------------------------------------------------------------------------

def embedding_line(custom_id: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}


def results(api, file_id) -> dict:
    if file_id is None:
        return {}
    return {r["custom_id"]: r for r in map(json.loads, api.files.content(file_id).text.splitlines())}


def test_an_embeddings_batch(api, engine, embedders, workers):
    lines = [embedding_line("a", model=EMBEDDER, input=["hello", "world"]),
             embedding_line("b", model=EMBEDDER, input="hello", encoding_format="base64"),
             embedding_line("c", model=f"ollama_{OLLAMA_EMBEDDER}", input="hi"),
             embedding_line("d", model=EMBEDDER, input=""),                        # invalid: line 4
             embedding_line("e", model=EMBEDDER, input="x", dimensions=3),         # runs, then refused
             request_line("f", "local_demo")]                                      # invalid: its url
    upload = api.files.create(file=("embeddings.jsonl", jsonl(lines)), purpose="batch")
    batch = wait_batch(api, api.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings",
                                               completion_window="24h").id)
    assert batch.status == "completed" and batch.endpoint == "/v1/embeddings", batch
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (6, 3, 3)

    output, errors = results(api, batch.output_file_id), results(api, batch.error_file_id)
    assert set(output) == {"a", "b", "c"} and set(errors) == {"d", "e", "f"}
    a = output["a"]["response"]
    assert a["status_code"] == 200 and a["body"]["object"] == "list" and a["body"]["model"] == EMBEDDER
    np.testing.assert_allclose([d["embedding"] for d in a["body"]["data"]],
                               engine.embed(["hello", "world"], kind="passage"), atol=1e-5)
    b64 = output["b"]["response"]["body"]["data"][0]["embedding"]
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(b64), dtype="<f4"), a["body"]["data"][0]["embedding"],
                               atol=1e-6)
    assert output["c"]["response"]["body"]["data"][0]["embedding"] == pytest.approx(fake_model.embedding("hi"))
    assert errors["e"]["response"]["status_code"] == 400
    assert errors["e"]["response"]["body"]["error"]["param"] == "dimensions"
    assert errors["d"]["error"]["code"] == "invalid_request" and errors["f"]["error"]["code"] == "invalid_url"
    assert [(e.line, e.param) for e in batch.errors.data] == [(4, "input"), (6, None)]
    tokens = sum(r["response"]["body"]["usage"]["prompt_tokens"] for r in output.values())
    assert batch.usage.input_tokens == tokens > 0


def test_a_chat_batch_line_asking_for_several_choices_is_an_error_line(api, demo_model, workers):
    ModelConfig.objects.filter(name="local_demo").update(max_new_tokens=4)
    several = request_line("two", "local_demo")
    several["body"]["n"] = 2
    upload = api.files.create(file=("chat.jsonl", jsonl([request_line("one", "local_demo"), several])),
                              purpose="batch")
    batch = wait_batch(api, api.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                               completion_window="24h").id)
    assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    assert [(e.line, e.code, e.param) for e in batch.errors.data] == [(2, "invalid_request", "n")]
    assert set(results(api, batch.error_file_id)) == {"two"}


def test_vectors_are_little_endian_float32_in_base64():
    """What the client decodes: OpenAI's base64 is the float32 bytes, little-endian."""
    from chat.embeddings import Vectors

    values = [0.5, -1.25, 3.0]
    vectors = Vectors(data=struct.pack("<3f", *values), count=1, dimension=3, prompt_tokens=1, total_tokens=1,
                      embedded_by="test")
    assert base64.b64decode(vectors.rows("base64")[0]) == struct.pack("<3f", *values)
    assert vectors.rows("float") == [values] and not any(math.isnan(v) for v in vectors.rows("float")[0])
