"""The HTTP views (chat page, login, GPU and model APIs, health checks) through
Django's test client on the real Redis and the fake outside servers, and the
websocket's answer when an endpoint is down."""
import json
import re
import time

import pytest
import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import AsyncClient, Client
from redis.backoff import NoBackoff
from redis.retry import Retry

from chat.catalog import catalog_forget
from chat.models import Message
from chatsite.redis_client import redis_client
from gpu_manager.state import GpuStateStore
from tests.support.net import free_port
from tests.support.sockets import communicator, ends, frames_until, send_and_finish

TEST_SLOTS = ("test-slot", "test-slot-b")


@pytest.fixture
def logged_in(client, user):
    client.force_login(user)
    return client


@pytest.fixture
def ollama_down(stack):
    """The fake Ollama stopped and no discovery cached; restored afterwards."""
    url = stack.ollama.url
    stack.ollama.stop()
    catalog_forget()
    try:
        yield url
    finally:
        stack.ollama.start()
        # A cached "down" would leak into the next tests for the TTL.
        catalog_forget()


@pytest.fixture
def test_slots():
    """GPU slots of this module's own, removed afterwards: slot "0" belongs to
    the real GPU worker of other tests and is never touched here."""
    yield [GpuStateStore(slot=s) for s in TEST_SLOTS]
    r = redis_client()
    for slot in TEST_SLOTS:
        r.delete(f"gpu:slot:{slot}", f"gpu:slot:{slot}:events", f"gpu:slot:{slot}:memory")
        r.srem("gpu:slots", slot)


# --- health checks (CONTRACT §7) --------------------------------------------

def test_healthz_needs_no_login(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.django_db
def test_readyz_names_redis_when_redis_is_down(client, monkeypatch):
    # No retries: redis-py's default backoff (~4.7 s) is not what this checks.
    dead = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    monkeypatch.setattr("chat.views.redis_client", lambda: dead)
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready"
    assert len(body["missing"]) == 1 and body["missing"][0].startswith("redis:"), body


@pytest.fixture
def no_heartbeats(monkeypatch):
    """Point the liveness check at keys no worker writes, whether or not the
    session's workers are up."""
    monkeypatch.setattr("chat.dispatch.WORKER_ALIVE_PREFIX", "worker:alive-nobody")


@pytest.mark.django_db
def test_readyz_names_missing_gpu_and_cpu_workers(client, no_heartbeats):
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"status": "not ready",
                               "missing": ["gpu worker: none answered", "cpu worker: none answered"]}


@pytest.mark.django_db(transaction=True)
def test_readyz_is_200_with_workers(client, workers, request):
    response = client.get("/readyz")
    assert response.status_code == 200, response.content
    assert response.json() == {"status": "ready", "missing": []}
    # The check of the test above is blind to these very workers: its 503
    # is not an accident of timing.
    request.getfixturevalue("no_heartbeats")
    assert client.get("/readyz").status_code == 503


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_readyz_stays_200_while_the_gpu_worker_is_busy(ws_headers, demo_model, workers, stack):
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    _, frames = await send_and_finish(comm, model="ollama_qwen:7b", content="take the GPU")
    assert frames[-1]["type"] == "chat.done", frames
    # Switching back to the local model makes the GPU task wait until
    # Ollama's /api/ps is empty: the GPU worker is busy for these seconds.
    stack.ollama.unload_delay = 4.0
    await comm.send_json_to({"type": "chat.send", "model": "local_demo", "content": "back to local",
                             "conversation": None, "client_id": "busy"})
    accepted = await comm.receive_json_from(timeout=10)
    assert accepted["type"] == "chat.accepted", accepted
    await frames_until(comm, lambda f: f.get("phase") == "unloading_ollama", timeout=30)
    try:
        response = await AsyncClient().get("/readyz")
        assert response.json()["missing"] == [] and response.status_code == 200, response.json()
    finally:
        frames = await frames_until(comm, ends(accepted["message"]), timeout=60)
        await comm.disconnect()
    assert frames[-1]["type"] == "chat.done", frames


# --- GPU status (CONTRACT §5) -----------------------------------------------

@pytest.mark.django_db
def test_gpu_api_refuses_anonymous_with_401_json(client):
    response = client.get("/api/gpu/")
    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"error": "authentication required"}


def test_gpu_api_reflects_the_stored_state(logged_in, test_slots):
    store, other = test_slots
    # Later than any real event, so the API's most recent events include them.
    t = time.time() + 86_400
    memory = {"device": "cuda:0", "allocated": 1_000, "reserved": 2_000, "free": 70_000, "total": 80_000}
    state = store.write(store.read(), owner="local", local_models=["local_demo"])
    store.event_add({"at": t + 0.5, "slot": store.slot, "kind": "owner_change", "model": "",
                     "freed_bytes": 0, "seconds": 0.0})
    other.write(other.read(), owner="ollama", ollama_models=["qwen:7b"])
    other.event_add({"at": t + 1.0, "slot": other.slot, "kind": "local_unload", "model": "local_demo",
                     "freed_bytes": 123_456, "seconds": 0.25, "after": {**memory, "extra": 1}})
    store.event_add({"at": t + 2.0, "slot": store.slot, "kind": "local_load", "model": "local_demo",
                     "freed_bytes": 0, "seconds": 1.5, "before": {}, "after": memory})
    # The worker's last memory reading, as GpuManager records it.
    store.memory_write(memory)
    other.memory_write({**memory, "extra": 1})
    store.event_add({"at": t + 3.0, "slot": store.slot, "kind": "owner_change", "model": "",
                     "freed_bytes": 0, "seconds": 0.01})

    response = logged_in.get("/api/gpu/")
    assert response.status_code == 200
    body = response.json()
    slots = {s["slot"]: s for s in body["slots"]}
    assert set(TEST_SLOTS) <= set(slots)
    for slot in body["slots"]:
        # The contract's keys, and the scheduler's (tests/test_gpu_schedule_view.py).
        assert set(slot) == {"slot", "owner", "local_models", "ollama_models", "memory", "epoch", "scheduler"}
        assert set(slot["memory"]) == {"device", "allocated", "reserved", "free", "total"}
        assert slot["owner"] in ("local", "ollama", "openai", "none")
    assert slots["test-slot"].pop("scheduler")["policy"] == settings.GPU_SCHEDULE
    assert slots["test-slot"] == {"slot": "test-slot", "owner": "local", "local_models": ["local_demo"],
                                  "ollama_models": [], "memory": memory, "epoch": state.epoch}
    assert slots["test-slot-b"]["owner"] == "ollama"
    assert slots["test-slot-b"]["ollama_models"] == ["qwen:7b"]
    assert slots["test-slot-b"]["memory"] == memory  # the extra key is not part of the contract

    ours = [e for e in body["events"] if e["slot"] in TEST_SLOTS]
    # Newest last, across slots.
    assert [(e["slot"], e["kind"], e["at"]) for e in ours] == [
        ("test-slot", "owner_change", t + 0.5),
        ("test-slot-b", "local_unload", t + 1.0),
        ("test-slot", "local_load", t + 2.0),
        ("test-slot", "owner_change", t + 3.0),
    ]
    assert {k: ours[1][k] for k in ("at", "slot", "kind", "model", "freed_bytes", "seconds")} == {
        "at": t + 1.0, "slot": "test-slot-b", "kind": "local_unload", "model": "local_demo",
        "freed_bytes": 123_456, "seconds": 0.25}
    ats = [e["at"] for e in body["events"]]
    assert ats == sorted(ats)


def test_gpu_api_follows_a_later_write(logged_in, test_slots):
    store = test_slots[0]
    first = store.write(store.read(), owner="local", local_models=["local_demo"])
    assert _slot(logged_in, "test-slot")["epoch"] == first.epoch
    second = store.write(first, owner="none", local_models=[])
    slot = _slot(logged_in, "test-slot")
    assert (slot["owner"], slot["local_models"], slot["epoch"]) == ("none", [], second.epoch)
    assert second.epoch == first.epoch + 1
    # No transition has reported memory for this slot yet.
    assert {k: v for k, v in slot["memory"].items() if k != "device"} == {
        "allocated": 0, "reserved": 0, "free": 0, "total": 0}


def test_gpu_api_keeps_the_last_500_events_newest_last(logged_in, test_slots):
    store = test_slots[0]
    store.write(store.read(), owner="none")  # the API lists slots that have written
    base = time.time() + 86_400  # newer than any real event
    for i in range(600):
        store.event_add({"at": base + i / 1000, "slot": store.slot, "kind": "owner_change",
                         "model": f"m{i}", "freed_bytes": 0, "seconds": 0.0})
    events = logged_in.get("/api/gpu/").json()["events"]
    assert len(events) >= 500
    assert [e["model"] for e in events[-500:]] == [f"m{i}" for i in range(100, 600)]


def _slot(client, name: str) -> dict:
    return next(s for s in client.get("/api/gpu/").json()["slots"] if s["slot"] == name)


# --- model list -------------------------------------------------------------

@pytest.mark.django_db
def test_models_api_refuses_anonymous_with_401_json(client):
    response = client.get("/api/models/")
    assert response.status_code == 401
    assert response.json() == {"error": "authentication required"}


def test_models_api_lists_local_ollama_and_openai_models(logged_in, demo_model):
    response = logged_in.get("/api/models/")
    assert response.status_code == 200
    body = response.json()
    kinds = {m["name"]: m["kind"] for m in body["models"]}
    assert kinds == {"local_demo": "local", "ollama_qwen:7b": "ollama", "openai_gpt-4o-mini": "openai"}
    assert body["errors"] == []
    for model in body["models"]:
        assert model["available"] is True and isinstance(model["resident"], bool)


def test_models_api_marks_resident_models(logged_in, demo_model, stack, test_slots):
    # A tag only this test uses, so the real GPU worker's slot cannot make it resident.
    stack.ollama.models = ("qwen:7b", "phi3:mini")
    catalog_forget()
    try:
        store = test_slots[0]
        store.write(store.read(), owner="ollama", ollama_models=["phi3:mini"])
        models = {m["name"]: m for m in logged_in.get("/api/models/").json()["models"]}
        assert models["ollama_phi3:mini"]["resident"] is True
        assert models["openai_gpt-4o-mini"]["resident"] is False
    finally:
        stack.ollama.models = ("qwen:7b",)
        catalog_forget()


def test_models_api_survives_a_down_ollama(logged_in, demo_model, ollama_down):
    response = logged_in.get("/api/models/")
    assert response.status_code == 200
    body = response.json()
    kinds = {m["name"]: m["kind"] for m in body["models"]}
    assert kinds == {"local_demo": "local", "openai_gpt-4o-mini": "openai"}
    assert len(body["errors"]) == 1, body["errors"]
    error = body["errors"][0]
    assert error["endpoint"] == ollama_down and error["kind"] == "ollama"
    assert ollama_down in error["detail"] and "does not answer" in error["detail"]


# --- pages and login --------------------------------------------------------

@pytest.mark.django_db
def test_index_redirects_anonymous_to_login(client):
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/"


def test_index_carries_the_page_config(logged_in):
    response = logged_in.get("/")
    assert response.status_code == 200
    html = response.content.decode()
    match = re.search(r'<script id="page-config" type="application/json">(.*?)</script>', html, re.S)
    assert match, "no page-config script element"
    config = json.loads(match.group(1))
    assert {k: config[k] for k in ("ws_url", "models_url", "gpu_url")} == {
        "ws_url": "/ws/chat/", "models_url": "/api/models/", "gpu_url": "/api/gpu/"}
    # The conversation endpoints and the CSRF token are tested in tests/test_conversations.py.
    assert config["conversation"] is None and config["csrf_token"]


def csrf_token(html: str) -> str:
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html)
    assert match, "the form has no CSRF token"
    return match.group(1)


def test_login_form_logs_in_with_csrf(user):
    client = Client(enforce_csrf_checks=True)
    page = client.get("/accounts/login/?next=/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'name="username"' in html and 'name="password"' in html
    credentials = {"username": "alice", "password": "pw-alice-123", "next": "/"}

    # Without the token the form is refused.
    assert client.post("/accounts/login/", credentials).status_code == 403
    assert client.get("/").status_code == 302

    wrong = client.post("/accounts/login/", {**credentials, "password": "nope",
                                             "csrfmiddlewaretoken": csrf_token(html)})
    assert wrong.status_code == 200 and 'role="alert"' in wrong.content.decode()
    assert "_auth_user_id" not in client.session

    response = client.post("/accounts/login/", {**credentials, "csrfmiddlewaretoken": csrf_token(html)})
    assert response.status_code == 302 and response["Location"] == "/"
    assert client.session["_auth_user_id"] == str(user.pk)
    assert client.get("/").status_code == 200


# --- websocket with a down endpoint -----------------------------------------

@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_ws_ollama_down_gives_endpoint_unavailable(ws_headers, demo_model, stack):
    url = stack.ollama.url
    stack.ollama.stop()
    try:
        await sync_to_async(catalog_forget)()
        comm = communicator(ws_headers)
        assert (await comm.connect())[0]
        await comm.send_json_to({"type": "chat.send", "model": "ollama_qwen:7b", "content": "hi",
                                 "conversation": None, "client_id": "down-1"})
        frame = await comm.receive_json_from(timeout=10)
        assert frame["type"] == "chat.error" and frame["code"] == "endpoint_unavailable", frame
        assert frame["message"] is None
        assert url in frame["detail"]
        assert await Message.objects.acount() == 0
        # The socket stays open and answers the next frame.
        await comm.send_json_to({"type": "chat.send", "model": "nope", "content": "hi", "client_id": "x"})
        assert (await comm.receive_json_from(timeout=10))["code"] == "unknown_model"
        await comm.disconnect()
    finally:
        stack.ollama.start()
        await sync_to_async(catalog_forget)()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_ws_ollama_going_down_after_discovery_ends_in_chat_error(ws_headers, demo_model, workers, stack):
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    # Discovery is cached (the model resolves), then the server goes away:
    # the accepted message must still end, in a clear error.
    _, frames = await send_and_finish(comm, model="ollama_qwen:7b", content="warm up")
    assert frames[-1]["type"] == "chat.done", frames
    url = stack.ollama.url
    stack.ollama.stop()
    try:
        accepted, frames = await send_and_finish(comm, model="ollama_qwen:7b", content="hi")
        ends = [f for f in frames if f["type"] in ("chat.done", "chat.error")]
        assert len(ends) == 1 and ends[0]["type"] == "chat.error", frames
        assert ends[0]["code"] == "endpoint_unavailable" and url in ends[0]["detail"], ends[0]
        reply = await Message.objects.aget(pk=accepted["message"])
        assert (reply.status, reply.error_code) == ("error", "endpoint_unavailable")
        assert reply.finished_at is not None
    finally:
        stack.ollama.start()
        await sync_to_async(catalog_forget)()
    await comm.disconnect()
