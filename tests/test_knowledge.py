"""Knowledge bases and knowledge-assisted replies (CONTRACT §8, issue 15)
through the real stack: the web API, the knowledge worker's ingestion and
retrieval, the GPU and CPU workers, and the fake Ollama."""
import io
import json

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import Client

from chat.models import KnowledgeBase, KnowledgeChunk, Message
from gpu_manager.state import GpuStateStore
from tests.support import ROOT
from tests.support.sockets import communicator, frames_until, send_and_finish
from tests.support.users import user_create
from tests.support.waiting import wait_for

DOCUMENTS = json.loads((ROOT / "tests" / "data" / "knowledge_set.json").read_text())["documents"]
INGEST_TIMEOUT = 120.0


def store() -> GpuStateStore:
    return GpuStateStore(slot=settings.GPU_SLOT)


def upload(name: str, text: str | bytes) -> io.BytesIO:
    data = io.BytesIO(text.encode() if isinstance(text, str) else text)
    data.name = name
    return data


def client_of(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def base_create(client: Client, name: str, files: list) -> dict:
    response = client.post("/api/knowledge/", {"name": name, "files": files})
    assert response.status_code == 201, response.content
    return response.json()


def base_wait(client: Client, base_id: int) -> dict:
    def settled():
        base = client.get(f"/api/knowledge/{base_id}/").json()
        return base if base["status"] != "indexing" else None
    return wait_for(settled, timeout=INGEST_TIMEOUT, interval=0.1, what=f"knowledge base {base_id} indexed")


def ready_base(user, keys=("en-volcano", "zh-tea", "en-sourdough")) -> dict:
    client = client_of(user)
    created = base_create(client, "facts", [upload(f"{k}.txt", DOCUMENTS[k]) for k in keys if k in DOCUMENTS])
    base = base_wait(client, created["id"])
    assert base["status"] == "ready", base
    return base


# --- the API and ingestion ------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_upload_indexes_each_file_and_a_bad_file_gets_its_own_error(user, demo_engines, workers):
    client = client_of(user)
    created = base_create(client, "mixed", [
        upload("volcano.txt", DOCUMENTS["en-volcano"]),
        upload("notes.md", "# Notes\n\n" + DOCUMENTS["en-sourdough"]),
        upload("broken.pdf", b"%PDF-1.4 this is not really a PDF"),
    ])
    assert created["status"] == "indexing" and created["documents"] == 3
    base = base_wait(client, created["id"])
    files = {f["name"]: f for f in base["files"]}
    assert base["status"] == "ready", base
    assert files["volcano.txt"]["status"] == "ready" and files["volcano.txt"]["chunks"] >= 1
    assert files["notes.md"]["status"] == "ready"
    assert files["broken.pdf"]["status"] == "error" and files["broken.pdf"]["error_code"].startswith("document_")
    assert "broken.pdf" in files["broken.pdf"]["error"]
    assert base["chunks"] == files["volcano.txt"]["chunks"] + files["notes.md"]["chunks"]
    assert KnowledgeChunk.objects.filter(base_id=base["id"]).count() == base["chunks"]
    assert base["embedding_model"] == "embed_demo" and base["progress"] == 1.0

    # More files: one new index holding the old chunks and the new ones.
    response = client.post(f"/api/knowledge/{base['id']}/files", {"files": [upload("bread.txt", DOCUMENTS["en-sourdough"])]})
    assert response.status_code == 201 and response.json()["status"] == "indexing"
    more = base_wait(client, base["id"])
    assert more["status"] == "ready" and more["documents"] == 4
    assert more["chunks"] > base["chunks"]
    positions = sorted(KnowledgeChunk.objects.filter(base_id=base["id"]).values_list("position", flat=True))
    assert positions == list(range(more["chunks"]))
    indexes = list((settings.KNOWLEDGE_DIR / f"base-{base['id']}").iterdir())
    assert len(indexes) == 1, indexes  # the old index went once the new one was in place

    # Deleted: the rows and the index on disk.
    assert client.delete(f"/api/knowledge/{base['id']}/").status_code == 204
    assert not KnowledgeBase.objects.filter(pk=base["id"]).exists()
    assert not (settings.KNOWLEDGE_DIR / f"base-{base['id']}").exists()


@pytest.mark.django_db(transaction=True)
def test_a_base_with_no_readable_file_is_an_error_and_bad_requests_change_nothing(user, demo_engines, workers):
    client = client_of(user)
    created = base_create(client, "bad", [upload("empty.txt", "   \n"), upload("binary.txt", b"\x00\x01\x02")])
    base = base_wait(client, created["id"])
    assert base["status"] == "error" and base["chunks"] == 0
    assert {f["error_code"] for f in base["files"]} == {"document_no_text", "document_unreadable"}
    before = KnowledgeBase.objects.count()
    for data, code in (({"name": "x"}, "no_files"), ({"name": "", "files": [upload("a.txt", "hi")]}, "empty_name"),
                       ({"name": "x", "files": [upload("a.exe", "hi")]}, "document_unsupported")):
        response = client.post("/api/knowledge/", data)
        assert response.status_code == 400 and response.json()["error"]["code"] == code, response.content
    assert KnowledgeBase.objects.count() == before


@pytest.mark.django_db(transaction=True)
def test_another_users_base_is_refused_everywhere(user, demo_engines, workers):
    base = ready_base(user)
    mallory = client_of(user_create("mallory", "pw-mallory-123"))
    assert mallory.get(f"/api/knowledge/{base['id']}/").status_code == 404
    assert mallory.delete(f"/api/knowledge/{base['id']}/").status_code == 404
    assert mallory.post(f"/api/knowledge/{base['id']}/files", {"files": [upload("a.txt", "x")]}).status_code == 404
    assert mallory.get("/api/knowledge/").json() == {"knowledge": []}
    assert KnowledgeBase.objects.get(pk=base["id"]).documents.count() == 3
    anonymous = Client()
    assert anonymous.get("/api/knowledge/").status_code == 401
    # CSRF: the page's session may not be used cross-site without the token.
    csrf_checked = Client(enforce_csrf_checks=True)
    csrf_checked.force_login(user)
    assert csrf_checked.post("/api/knowledge/", {"name": "x", "files": [upload("a.txt", "x")]}).status_code == 403


# --- replies ---------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_unknown_or_unready_knowledge_is_refused_and_nothing_is_queued(user, ws_headers, demo_model,
                                                                          demo_engines, workers):
    other = await sync_to_async(user_create)("bob", "pw-bob-12345")
    theirs = await sync_to_async(KnowledgeBase.objects.create)(user=other, name="bob's", status="ready")
    mine = await sync_to_async(KnowledgeBase.objects.create)(user=user, name="mine", status="indexing")
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    for knowledge, code in (([theirs.pk], "unknown_knowledge"), ([mine.pk], "knowledge_not_ready"),
                            ("1", "bad_frame"), ([True], "bad_frame")):
        await comm.send_json_to({"type": "chat.send", "model": "local_demo", "content": "hi",
                                 "conversation": None, "knowledge": knowledge})
        frame = (await frames_until(comm, lambda f: f["type"] in ("chat.error", "chat.accepted"), timeout=10))[-1]
        assert frame == {"type": "chat.error", "message": None, "code": code, "detail": frame["detail"]}, frame
    assert await sync_to_async(Message.objects.count)() == 0


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_an_ollama_reply_gets_sources_first_and_loads_nothing_local(user, ws_headers, demo_engines,
                                                                        workers, stack):
    base = await sync_to_async(ready_base)(user)
    loads_before = [e for e in store().events(1000) if e["kind"] == "local_load"]
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    accepted, frames = await send_and_finish(comm, model="ollama_qwen:7b",
                                             content="Which active volcano is on the east coast of Sicily?",
                                             knowledge=[base["id"]])
    assert frames[-1]["type"] == "chat.done", frames
    types = [f["type"] for f in frames]
    assert "chat.sources" in types and types.index("chat.sources") < types.index("chat.delta"), types
    sources = next(f for f in frames if f["type"] == "chat.sources")
    assert sources["message"] == accepted["message"]
    assert [s["n"] for s in sources["sources"]] == list(range(1, len(sources["sources"]) + 1))
    assert sources["sources"][0]["document"] == "en-volcano.txt", sources
    assert {"n", "document", "text", "score", "knowledge"} <= set(sources["sources"][0])
    # The passages reached Ollama's prompt, tagged [n].
    prompt = stack.ollama.requests_to("/api/chat")[-1].body["messages"][-1]["content"]
    assert "[1] (en-volcano.txt)" in prompt and "Sicily" in prompt and prompt.endswith(
        "Question: Which active volcano is on the east coast of Sicily?")
    # Nothing local was loaded for it: the query was embedded on the CPU.
    assert [e for e in store().events(1000) if e["kind"] == "local_load"] == loads_before
    assert store().read().local_models == []
    # Stored with the message: history shows them again.
    reply = await sync_to_async(Message.objects.get)(pk=accepted["message"])
    assert reply.sources == sources["sources"] and reply.knowledge == [base["id"]]


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_engines_resident_together_unloaded_together_and_back(user, ws_headers, demo_model, demo_engines,
                                                                   workers, stack):
    """Chat, embedding and translation engines are resident together while
    the local models hold the GPU, unloaded together (each with its report)
    when Ollama takes it, and loaded again on the way back."""
    engines = ["embed_demo", "local_demo", "translate_demo"]
    base = await sync_to_async(ready_base)(user)
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    _, frames = await send_and_finish(comm, model="local_demo", content="Where is Etna?", knowledge=[base["id"]])
    assert frames[-1]["type"] == "chat.done", frames
    types = [f["type"] for f in frames]
    assert types.index("chat.sources") < types.index("chat.delta"), types
    state = store().read()
    assert state.owner == "local" and state.local_models == engines, state

    mark = len(store().events(1000))
    _, frames = await send_and_finish(comm, model="ollama_qwen:7b", content="hello")
    assert frames[-1]["type"] == "chat.done", frames
    unloads = [e for e in store().events(1000)[mark:] if e["kind"] == "local_unload"]
    assert sorted(e["model"] for e in unloads) == engines
    for event in unloads:
        assert event["survivors"] == {} and "freed_bytes" in event and event["before"]["allocated"] > 0, event
    assert store().read().local_models == []

    mark = len(store().events(1000))
    _, frames = await send_and_finish(comm, model="local_demo", content="back")
    assert frames[-1]["type"] == "chat.done", frames
    loads = [e["model"] for e in store().events(1000)[mark:] if e["kind"] == "local_load"]
    assert sorted(loads) == engines
    assert store().read().local_models == engines


@pytest.mark.django_db(transaction=True)
def test_v1_chat_completions_takes_knowledge_as_an_extra_body_field(user, api, demo_engines, workers, stack):
    """The same retrieval for an OpenAI-compatible upstream, asked through
    the official client's `extra_body`, streaming and not."""
    import openai

    base = ready_base(user)
    question = "Which active volcano is on the east coast of Sicily?"
    completion = api.chat.completions.create(model="openai_gpt-4o-mini",
                                             messages=[{"role": "user", "content": question}],
                                             extra_body={"knowledge": [base["id"]]})
    sources = completion.model_extra["sources"]
    assert sources and sources[0]["document"] == "en-volcano.txt" and sources[0]["n"] == 1
    sent = stack.openai.requests_to("/v1/chat/completions")[-1].body["messages"][-1]["content"]
    assert "[1] (en-volcano.txt)" in sent and sent.endswith(f"Question: {question}")

    chunks = list(api.chat.completions.create(model="openai_gpt-4o-mini", stream=True,
                                              messages=[{"role": "user", "content": question}],
                                              extra_body={"knowledge": [base["id"]]}))
    assert chunks[0].model_extra["sources"] == sources
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == stack.openai.reply

    with pytest.raises(openai.NotFoundError) as caught:
        api.chat.completions.create(model="openai_gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                    extra_body={"knowledge": [base["id"] + 1000]})
    assert caught.value.code == "unknown_knowledge" and caught.value.body["param"] == "knowledge"


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_ingestion_uses_the_gpu_engine_while_local_models_hold_it_and_the_cpu_under_ollama(
        user, ws_headers, demo_model, demo_engines, workers, stack):
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    _, frames = await send_and_finish(comm, model="local_demo", content="hi")
    assert frames[-1]["type"] == "chat.done" and store().read().owner == "local"
    base = await sync_to_async(ready_base)(user)
    assert base["indexed_by"].startswith("gpu worker on "), base
    assert "embed_demo" in store().read().local_models

    _, frames = await send_and_finish(comm, model="ollama_qwen:7b", content="hello")
    assert frames[-1]["type"] == "chat.done" and store().read().owner == "ollama"
    loads = len([e for e in store().events(1000) if e["kind"] == "local_load"])
    client = await sync_to_async(client_of)(user)
    response = await sync_to_async(client.post)(f"/api/knowledge/{base['id']}/files",
                                                {"files": [upload("bread.txt", DOCUMENTS["en-sourdough"])]})
    assert response.status_code == 201
    more = await sync_to_async(base_wait)(client, base["id"])
    assert more["status"] == "ready" and more["indexed_by"] == "knowledge worker on cpu", more
    assert more["chunks"] > base["chunks"]
    state = store().read()
    assert (state.owner, state.local_models) == ("ollama", [])
    assert len([e for e in store().events(1000) if e["kind"] == "local_load"]) == loads


@pytest.mark.django_db(transaction=True)
def test_an_embedding_model_that_cannot_load_fails_the_files_with_its_reason(user, demo_engines, workers, tmp_path):
    from chat.models import ModelConfig

    ModelConfig.objects.create(kind="embedding", name="broken-embedder", path=str(tmp_path / "missing"),
                               is_default=True)
    client = client_of(user)
    created = base_create(client, "doomed", [upload("a.txt", DOCUMENTS["en-volcano"])])
    assert created["embedding_model"] == "broken-embedder"
    base = base_wait(client, created["id"])
    assert base["status"] == "error" and "broken-embedder" in base["error"], base
    assert base["files"][0]["status"] == "error" and base["files"][0]["error_code"] == "model_load_failed"
