"""The full path local -> Ollama -> local through a real GPU worker and a real
CPU worker, against a fake Ollama that records what it was asked and when.

Times compared here come from two processes on one machine: the worker's
events (`at`, the end of a transition; `at - seconds`, its start) and the
fake's request log (`at`, when a request arrived), both `time.time()`.
"""
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings

from chat.catalog import catalog_list
from gpu_manager.state import GpuStateStore
from tests.support.sockets import communicator, send_and_finish

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


def store() -> GpuStateStore:
    return GpuStateStore(slot=settings.GPU_SLOT)


def kinds(events: list[dict]) -> list[str]:
    return [e["kind"] for e in events]


async def test_local_then_ollama_then_local(ws_headers, demo_model, workers, stack):
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]

    # 1. The local model answers and is resident.
    _, frames = await send_and_finish(comm, model="local_demo", content="hi")
    assert frames[-1]["type"] == "chat.done", frames
    state = store().read()
    assert state.owner == "local" and state.local_models == ["local_demo"]

    # 2. An Ollama model: the local model is unloaded (its weakref dead)
    #    before Ollama is asked to chat.
    mark = len(store().events(1000))
    _, frames = await send_and_finish(comm, model="ollama_qwen:7b", content="hello")
    assert frames[-1]["type"] == "chat.done", frames
    assert "".join(f["text"] for f in frames if f["type"] == "chat.delta") == stack.ollama.reply
    events = store().events(1000)[mark:]
    assert kinds(events) == ["local_unload", "owner_change"], events
    unload = events[0]
    assert unload["model"] == "local_demo" and unload["survivors"] == {}
    assert unload["before"]["allocated"] > 0 and "freed_bytes" in unload
    first_chat = stack.ollama.requests_to("/api/chat")[0]
    assert unload["at"] < first_chat.at
    phases = [f["phase"] for f in frames if f["type"] == "gpu.switch"]
    # First its place in the scheduler's queue: the GPU was the local model's.
    assert phases[0] == "queued" and next(f for f in frames if f["type"] == "gpu.switch")["owner"] == "local"
    assert phases[1:3] == ["unloading_local", "unloaded_local"] and "owner" in phases
    state = store().read()
    assert (state.owner, state.local_models, state.ollama_models) == ("ollama", [], ["qwen:7b"])

    # 3. Back to the local model: Ollama is told to unload, /api/ps is seen
    #    empty, and only then does the local model load. Ollama keeps the
    #    model listed for a while after the unload, as the real server does.
    stack.ollama.unload_delay = 0.3
    stack.ollama.clear()
    mark = len(store().events(1000))
    _, frames = await send_and_finish(comm, model="local_demo", content="and again")
    assert frames[-1]["type"] == "chat.done", frames
    events = store().events(1000)[mark:]
    assert kinds(events) == ["ollama_unload", "local_load", "owner_change"], events
    load_started = events[1]["at"] - events[1]["seconds"]
    unloads = [r for r in stack.ollama.requests if r.path in ("/api/generate", "/api/chat")
               and r.body and r.body.get("keep_alive") in (0, "0", "0s")]
    assert [r.body["model"] for r in unloads] == ["qwen:7b"]
    assert unloads[0].at < load_started
    empty_ps = [a for a in stack.ollama.ps_answers if a.at > unloads[0].at and a.models == []]
    assert empty_ps and empty_ps[0].at < load_started
    assert events[0]["freed_bytes"] == stack.ollama.size_vram
    assert stack.ollama.loaded_models() == []
    state = store().read()
    assert (state.owner, state.local_models, state.ollama_models) == ("local", ["local_demo"], [])

    # 4. The same model again: nothing is unloaded or loaded, the state is
    #    not even rewritten.
    epoch, mark = state.epoch, len(store().events(1000))
    _, frames = await send_and_finish(comm, model="local_demo", content="once more")
    assert frames[-1]["type"] == "chat.done"
    assert store().read().epoch == epoch and len(store().events(1000)) == mark
    assert not [f for f in frames if f["type"] == "gpu.switch"]

    # 5. Ollama twice in a row: one switch, then none.
    await send_and_finish(comm, model="ollama_qwen:7b", content="one")
    epoch, mark = store().read().epoch, len(store().events(1000))
    _, frames = await send_and_finish(comm, model="ollama_qwen:7b", content="two")
    assert frames[-1]["type"] == "chat.done"
    assert store().read().epoch == epoch and len(store().events(1000)) == mark
    await comm.disconnect()


async def test_openai_endpoint_streams_through_the_openai_client(ws_headers, demo_model, workers, stack):
    comm = communicator(ws_headers)
    await comm.connect()
    _, frames = await send_and_finish(comm, model="openai_gpt-4o-mini", content="hi there")
    done = frames[-1]
    assert done["type"] == "chat.done", frames
    assert "".join(f["text"] for f in frames if f["type"] == "chat.delta") == stack.openai.reply
    assert done["usage"]["completion_tokens"] > 0
    request = stack.openai.requests_to("/v1/chat/completions")[-1]
    assert request.headers["authorization"] == f"Bearer {stack.openai.api_key}"
    assert request.body["stream"] is True
    assert request.body["messages"][-1] == {"role": "user", "content": "hi there"}
    # An endpoint that frees the GPU (the default) owns it while it answers.
    assert store().read().owner == "openai"
    await comm.disconnect()


async def test_ollama_missing_model_fails_clearly_and_keeps_the_local_model(ws_headers, demo_model, workers, stack):
    comm = communicator(ws_headers)
    await comm.connect()
    await send_and_finish(comm, model="local_demo", content="load it")
    epoch = store().read().epoch
    # The catalog still offers the tag (cached), but the server lost it.
    await sync_to_async(catalog_list)()
    stack.ollama.models = ()
    _, frames = await send_and_finish(comm, model="ollama_qwen:7b", content="hello")
    assert frames[-1]["type"] == "chat.error" and frames[-1]["code"] == "model_not_found", frames
    state = store().read()
    assert state.owner == "local" and state.local_models == ["local_demo"] and state.epoch == epoch
    assert stack.ollama.requests_to("/api/chat") == []
    await comm.disconnect()


async def test_ollama_is_asked_for_its_models_only_when_it_takes_the_gpu(ws_headers, demo_model, workers, stack):
    comm = communicator(ws_headers)
    await comm.connect()
    await send_and_finish(comm, model="local_demo", content="load it")
    _, frames = await send_and_finish(comm, model="ollama_qwen:7b", content="first")
    assert frames[-1]["type"] == "chat.done" and store().read().ollama_models == ["qwen:7b"]
    await sync_to_async(catalog_list)()  # the catalog's own discovery, cached for MODEL_DISCOVERY_TTL
    stack.ollama.clear()
    _, frames = await send_and_finish(comm, model="ollama_qwen:7b", content="second")
    assert frames[-1]["type"] == "chat.done", frames
    assert stack.ollama.requests_to("/api/tags") == [] and len(stack.ollama.requests_to("/api/chat")) == 1
    await comm.disconnect()


async def test_restarted_gpu_worker_repairs_a_stale_state(ws_headers, demo_model, workers):
    comm = communicator(ws_headers)
    await comm.connect()
    await send_and_finish(comm, model="local_demo", content="load it")
    assert store().read().local_models == ["local_demo"]
    # The worker dies; its models go with its process, but the state in
    # Redis still says they are resident (a clean stop would have said so).
    await sync_to_async(workers.kill)("gpu")
    assert store().read().local_models == ["local_demo"]
    await sync_to_async(workers.start)("gpu")
    # start() returns once the worker answers a ping, which comes after its
    # repair: the state now tells the truth.
    state = store().read()
    assert state.local_models == [] and state.owner == "none"
    assert store().events(1)[-1]["kind"] == "owner_change"
    _, frames = await send_and_finish(comm, model="local_demo", content="works again")
    assert frames[-1]["type"] == "chat.done"
    assert store().read().local_models == ["local_demo"]
    await comm.disconnect()
