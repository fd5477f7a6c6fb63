"""Who may do what (issue 7): the socket's login and origin check, one user
against another's conversations and messages over the websocket and HTTP,
the staff-only admin, secrets kept out of logs, events, pages and API
answers, CSRF, per-user rate limits, and model output kept inert.

Covered elsewhere and not repeated here:
- an anonymous socket is closed with 4401, a foreign Origin refused:
  tests/test_consumer.py (test_anonymous_socket_is_closed_with_4401,
  test_foreign_origin_is_refused);
- another user's conversation or message over HTTP (read, rename, delete,
  take back for Regenerate, the /c/<id>/ page) is 404:
  tests/test_conversations.py (test_other_users_conversations_and_messages_are_404),
  and writes need the CSRF token (test_writes_need_the_csrf_token);
- the admin refuses anonymous and non-staff users, and the ModelConfig API
  key is write-only: tests/test_admin.py;
- API keys are stored hashed: tests/test_api_openai.py
  (test_create_api_key_prints_a_key_that_is_stored_hashed);
- model output is shown as text and runs nothing in the browser, live and
  after a reload: tests/test_ui_chat.py (test_model_output_is_shown_as_text_and_runs_nothing).
"""
from __future__ import annotations

import contextlib
import json
import logging

import pytest
import yaml
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.test import Client

from chat.catalog import catalog_forget
from chat.models import Batch, BatchFile, Conversation, Message, ModelConfig
from chat.ratelimit import RateLimited, message_rate_check, rate_key
from chat.selectors import gpu_status
from chat.dispatch import cancel_key, cancel_requested
from chatsite.redis_client import redis_client
from tests.support import ROOT
from tests.support.sockets import communicator, ends, frames_until, send_and_finish, session_cookie
from tests.support.users import superuser_create, user_create
from tests.support.waiting import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

#: A key no other test uses, so that finding it anywhere is a leak.
SECRET = "sk-vault-7f3c9e1d2b4a6081"


@pytest.fixture
def mallory():
    return user_create("mallory", "pw-mallory-123")


@pytest.fixture
def mallory_headers(mallory) -> list[tuple[bytes, bytes]]:
    return [(b"cookie", f"sessionid={session_cookie(mallory)}".encode()), (b"origin", b"http://localhost")]


def exchange(conversation, *, status="done", content="Hello"):
    """A question and its reply, as message_enqueue and a worker leave them."""
    Message.objects.create(conversation=conversation, role="user", content="Hi", model_name="local_demo")
    return Message.objects.create(conversation=conversation, role="assistant", content=content,
                                  model_name="local_demo", status=status)


async def first_frame(headers, frame: dict) -> dict:
    comm = communicator(headers)
    assert (await comm.connect())[0]
    await comm.send_json_to(frame)
    answer = await comm.receive_json_from(timeout=10)
    await comm.disconnect()
    return answer


# --- the socket's door ----------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize("cookie", ["sessionid=not-a-session", "sessionid=", "csrftoken=abc"])
async def test_a_socket_without_a_live_session_is_closed_with_4401(transactional_db, cookie):
    comm = communicator([(b"cookie", cookie.encode()), (b"origin", b"http://localhost")])
    assert (await comm.connect())[0]
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}


def _logged_out_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    cookie = client.cookies["sessionid"].value
    client.post("/accounts/logout/")  # the session is gone from the database
    return cookie


@pytest.mark.asyncio
async def test_a_socket_of_a_user_who_logged_out_is_closed_with_4401(user):
    cookie = await sync_to_async(_logged_out_cookie)(user)
    comm = communicator([(b"cookie", f"sessionid={cookie}".encode()), (b"origin", b"http://localhost")])
    assert (await comm.connect())[0]
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}


@pytest.mark.asyncio
@pytest.mark.parametrize("origin", [None, b"null", b"http://localhost.evil.example", b"http://evil.example:8000",
                                    b"file://", b"http://127.0.0.1.nip.io"])
async def test_a_socket_from_any_other_origin_is_refused(ws_headers, origin):
    """Cross-site websocket hijacking: a page elsewhere could open the socket
    with the user's cookie; only the site's own hosts may."""
    headers = [h for h in ws_headers if h[0] != b"origin"] + ([(b"origin", origin)] if origin else [])
    connected, _ = await communicator(headers).connect()
    assert not connected


# --- one user against another's conversations and messages ---------------------------

@pytest.mark.asyncio
async def test_a_user_cannot_send_into_another_users_conversation(mallory_headers, user, demo_model):
    theirs = await Conversation.objects.acreate(user=user, title="alice's")
    await sync_to_async(exchange)(theirs)
    before = await Message.objects.acount()
    answer = await first_frame(mallory_headers, {"type": "chat.send", "model": "local_demo", "content": "me too",
                                                 "conversation": theirs.pk, "client_id": "x"})
    assert (answer["type"], answer["code"], answer["message"]) == ("chat.error", "unknown_conversation", None)
    assert str(theirs.pk) in answer["detail"] and "alice" not in answer["detail"]
    assert await Message.objects.acount() == before
    assert await Conversation.objects.filter(user__username="mallory").acount() == 0


@pytest.mark.asyncio
async def test_a_user_cannot_cancel_another_users_reply(mallory_headers, user, demo_model):
    theirs = await Conversation.objects.acreate(user=user)
    running = await sync_to_async(exchange)(theirs, status="running", content="")
    try:
        answer = await first_frame(mallory_headers, {"type": "chat.cancel", "message": running.pk})
        # The same answer as for a message that does not exist: no way to probe ids.
        assert (answer["code"], answer["detail"]) == ("unknown_message", f"No message {running.pk} of yours.")
        assert not await sync_to_async(cancel_requested)(running.pk)
        # The question (a user message) cannot be cancelled either.
        question = await Message.objects.filter(conversation=theirs, role="user").afirst()
        answer = await first_frame(mallory_headers, {"type": "chat.cancel", "message": question.pk})
        assert answer["code"] == "unknown_message"
    finally:
        await sync_to_async(redis_client().delete)(cancel_key(running.pk))


@pytest.mark.asyncio
async def test_a_socket_gets_no_frame_of_another_users_reply(ws_headers, mallory_headers, demo_model, workers,
                                                            stack):
    """Alice's reply streams while Mallory's socket is open, and Mallory's
    socket connects while it streams (a socket subscribes to its user's
    unfinished replies on connect): no frame of it reaches her."""
    stack.ollama.reply = " ".join(f"w{i}" for i in range(150))
    stack.ollama.token_delay = 0.01
    early = communicator(mallory_headers)
    assert (await early.connect())[0]
    alice = communicator(ws_headers)
    assert (await alice.connect())[0]
    await alice.send_json_to({"type": "chat.send", "model": "ollama_qwen:7b", "content": "private",
                              "client_id": "a"})
    accepted = (await frames_until(alice, lambda f: f["type"] == "chat.accepted"))[-1]
    await frames_until(alice, lambda f: f["type"] == "chat.delta")
    late = communicator(mallory_headers)
    assert (await late.connect())[0]
    await frames_until(alice, ends(accepted["message"]))
    for comm in (early, late):
        # Everything either socket got, up to the end of one of Mallory's own replies.
        _, frames = await send_and_finish(comm, model="openai_gpt-4o-mini", content="mine")
        assert frames[-1]["type"] == "chat.done"
        assert not [f for f in frames if f.get("message") == accepted["message"]], frames
        await comm.disconnect()
    await alice.disconnect()


def test_a_user_cannot_reach_another_users_files_or_batches(user, mallory):
    """/v1/ scopes files and batches to the key's user: another user's ids
    answer 404, as ids that do not exist (tests/test_batches.py has the
    user's own)."""
    from chat.api.keys import api_key_create
    from chat.batches import file_create

    upload = file_create(user=user, filename="alice.jsonl", data=b'{"custom_id": "a"}\n', purpose="batch")
    batch = Batch.objects.create(user=user, endpoint="/v1/chat/completions", input_file=upload,
                                 status="completed", output_file=upload)
    client = Client(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=mallory)[1]}")
    for method, url in [("get", f"/v1/files/{upload.pk}"), ("get", f"/v1/files/{upload.pk}/content"),
                        ("get", f"/v1/batches/{batch.pk}"), ("post", f"/v1/batches/{batch.pk}/cancel")]:
        response = getattr(client, method)(url)
        assert response.status_code == 404, (method, url, response.status_code)
        assert "alice" not in response.content.decode()
    response = client.post("/v1/batches", json.dumps({"input_file_id": upload.pk, "endpoint": "/v1/chat/completions",
                                                      "completion_window": "24h"}), content_type="application/json")
    assert response.status_code == 404
    assert client.get("/v1/files").json()["data"] == [] and client.get("/v1/batches").json()["data"] == []
    assert Batch.objects.get(pk=batch.pk).status == "completed" and Batch.objects.count() == 1
    assert BatchFile.objects.count() == 1


# --- the admin ---------------------------------------------------------------------------

def test_the_gpu_page_and_its_buttons_are_staff_only(client, user):
    """/admin/gpu/ sits outside the model admins (chat/admin_gpu.py); a
    non-staff user can neither see it nor press "unload now"."""
    from chatsite.celery import app

    for logged_in in (False, True):
        if logged_in:
            client.force_login(user)
        assert client.get("/admin/gpu/").status_code == 302
        with app.connection_for_write() as conn:
            queued = conn.default_channel.client.llen(f"gpu.{django_settings.GPU_SLOT}")
        response = client.post("/admin/gpu/", {"action": "unload"})
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
        with app.connection_for_write() as conn:
            assert conn.default_channel.client.llen(f"gpu.{django_settings.GPU_SLOT}") == queued


@pytest.mark.parametrize("url", ["/admin/chat/modelconfig/", "/admin/chat/message/", "/admin/chat/apikey/",
                                 "/admin/chat/batch/"])
def test_every_admin_page_sends_non_staff_to_the_login(client, user, url):
    client.force_login(user)
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


# --- secrets -------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_secrets_never_appear_in_events_pages_or_answers(ws_headers, user, demo_model, workers, stack,
                                                                caplog):
    """An endpoint's key (a ModelConfig row) and OPENAI_API_KEY are used, and
    refused by the upstream (401), and then looked for everywhere a user or
    an operator can read: the socket's frames, the stored replies, the web
    process's log, the GPU events, the status and model APIs, /v1/models,
    /metrics, the chat page and the admin pages. (The workers' logs:
    test_secrets_never_appear_in_the_worker_logs.)"""
    caplog.set_level(logging.DEBUG)
    frames = []
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    try:
        # OPENAI_API_KEY (the workers' environment): once accepted, once refused.
        for key in (django_settings.OPENAI_API_KEY, "sk-not-this-one"):
            stack.openai.api_key = key
            frames += (await send_and_finish(comm, model="openai_gpt-4o-mini", content="env key"))[1]
        # A row's key replaces it for the same URL: accepted, then refused.
        await ModelConfig.objects.acreate(kind="openai", name="vault", base_url=stack.openai.url + "/v1",
                                          api_key=SECRET, frees_gpu=False)
        await sync_to_async(catalog_forget)()
        for key in (SECRET, "sk-not-this-one"):
            stack.openai.api_key = key
            frames += (await send_and_finish(comm, model="openai_gpt-4o-mini", content="row key"))[1]
    finally:
        stack.openai.api_key = django_settings.OPENAI_API_KEY
        await comm.disconnect()
    assert [f["type"] for f in frames if f["type"] in ("chat.done", "chat.error")] == [
        "chat.done", "chat.error", "chat.done", "chat.error"], frames
    # The fake really saw both keys: they were in use, so finding none below means something.
    seen = {r.headers.get("authorization") for r in stack.openai.requests_to("/v1/chat/completions")}
    assert {f"Bearer {django_settings.OPENAI_API_KEY}", f"Bearer {SECRET}"} <= seen

    texts = {"frames": json.dumps(frames), "web log": caplog.text,
             "stored replies": json.dumps([m async for m in Message.objects.values()], default=str),
             "gpu events": json.dumps(await sync_to_async(gpu_status)(), default=str)}
    texts.update(await sync_to_async(_pages)(user))
    for secret in (SECRET, django_settings.OPENAI_API_KEY):
        found = [where for where, text in texts.items() if secret in text]
        assert not found, f"{secret} appears in {found}"


@pytest.mark.asyncio
async def test_secrets_never_appear_in_the_worker_logs(ws_headers, demo_model, workers, stack):
    marks = {name: (stack.var / f"{name}.log").stat().st_size for name in ("gpu", "cpu")}
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    try:
        _, frames = await send_and_finish(comm, model="openai_gpt-4o-mini", content="env key")
        assert frames[-1]["type"] == "chat.done"
        stack.openai.api_key = "sk-not-this-one"  # the upstream now refuses OPENAI_API_KEY, quoting it
        _, frames = await send_and_finish(comm, model="openai_gpt-4o-mini", content="env key")
        assert frames[-1]["code"] == "upstream_auth"
    finally:
        stack.openai.api_key = django_settings.OPENAI_API_KEY
        await comm.disconnect()
    for name, mark in marks.items():
        with open(stack.var / f"{name}.log", "rb") as log:
            log.seek(mark)
            assert django_settings.OPENAI_API_KEY not in log.read().decode(errors="replace"), f"{name} worker log"


def _pages(user) -> dict[str, str]:
    from chat.api.keys import api_key_create

    staff = Client()
    staff.force_login(superuser_create("root", "pw-root-123", email="root@example.com"))
    member = Client()
    member.force_login(user)
    vault = ModelConfig.objects.get(name="vault")
    reply = Message.objects.filter(role="assistant").last()
    api = Client(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=user)[1]}")
    pages = {
        "/": member.get("/"), "/api/gpu/": member.get("/api/gpu/"), "/api/models/": member.get("/api/models/"),
        "/api/conversations/": member.get("/api/conversations/"),
        f"/api/messages/{reply.pk}/": member.get(f"/api/messages/{reply.pk}/"),
        "/v1/models": api.get("/v1/models"), "/metrics": member.get("/metrics"), "/readyz": member.get("/readyz"),
        "admin model list": staff.get("/admin/chat/modelconfig/"),
        "admin model page": staff.get(f"/admin/chat/modelconfig/{vault.pk}/change/"),
        "admin test connection": staff.post("/admin/chat/modelconfig/", {
            "action": "test_connection", "_selected_action": [vault.pk]}, follow=True),
        "admin message page": staff.get(f"/admin/chat/message/{reply.pk}/change/"),
        "admin GPU page": staff.get("/admin/gpu/"),
    }
    for where, response in pages.items():
        assert response.status_code in (200, 503), (where, response.status_code)
    return {where: response.content.decode(errors="replace") for where, response in pages.items()}


def test_the_compose_deployment_runs_without_debug_and_with_its_own_secret_key():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    env = services["web"].get("environment") or {}
    assert str(env.get("DJANGO_DEBUG", "")).lower() in ("0", "false", "no", "off"), env
    assert env.get("DJANGO_SECRET_KEY") and "dev-only" not in str(env["DJANGO_SECRET_KEY"]), env


# --- CSRF ---------------------------------------------------------------------------------

def test_every_form_needs_the_csrf_token(user):
    """Django's CSRF middleware guards the login, logout and language forms
    and the admin's forms (the GPU page's buttons included)."""
    staff = superuser_create("root", "pw-root-123", email="root@example.com")
    anonymous = Client(enforce_csrf_checks=True)
    assert anonymous.post("/accounts/login/", {"username": "alice", "password": "pw-alice-123"}).status_code == 403
    assert "_auth_user_id" not in anonymous.session
    member = Client(enforce_csrf_checks=True)
    member.force_login(user)
    assert member.post("/accounts/logout/").status_code == 403
    assert member.post("/i18n/setlang/", {"language": "zh-hans"}).status_code == 403
    admin = Client(enforce_csrf_checks=True)
    admin.force_login(staff)
    assert admin.post("/admin/gpu/", {"action": "unload"}).status_code == 403
    assert admin.post("/admin/chat/modelconfig/add/", {"kind": "openai", "name": "x"}).status_code == 403
    assert not ModelConfig.objects.filter(name="x").exists()


def test_the_api_takes_no_session_cookie_so_needs_no_csrf_token(user):
    """/v1/ is exempt from CSRF because it reads only a Bearer key: a browser
    that carries the user's session cookie to it (a forged cross-site POST)
    gets 401 and starts nothing."""
    member = Client(enforce_csrf_checks=True)
    member.force_login(user)
    response = member.post("/v1/chat/completions", json.dumps({
        "model": "local_demo", "messages": [{"role": "user", "content": "forged"}]}), content_type="application/json")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert not Message.objects.exists()


# --- rate limits ---------------------------------------------------------------------------

@pytest.fixture
def rate_limit(settings, user, mallory):
    settings.CHAT_RATE_LIMIT_MESSAGES, settings.CHAT_RATE_LIMIT_WINDOW = 3, 60.0
    redis_client().delete(rate_key(user.pk), rate_key(mallory.pk))  # a window left by an earlier test
    yield settings
    redis_client().delete(rate_key(user.pk), rate_key(mallory.pk))


@pytest.mark.asyncio
async def test_a_user_over_the_rate_limit_gets_a_clear_error_and_nothing_is_stored(
        rate_limit, ws_headers, mallory_headers, demo_model, workers):
    sockets = [communicator(ws_headers), communicator(ws_headers)]  # two tabs share one limit
    theirs = communicator(mallory_headers)
    try:
        for comm in sockets:
            assert (await comm.connect())[0]
        for i in range(3):
            _, frames = await send_and_finish(sockets[i % 2], model="openai_gpt-4o-mini", content=f"message {i}")
            assert frames[-1]["type"] == "chat.done"
        stored = await Message.objects.acount()
        await sockets[1].send_json_to({"type": "chat.send", "model": "openai_gpt-4o-mini", "content": "one more",
                                       "client_id": "over"})
        refused = await sockets[1].receive_json_from(timeout=10)
        assert (refused["type"], refused["code"], refused["message"]) == ("chat.error", "rate_limited", None)
        assert "at most 3 in 60 seconds" in refused["detail"] and "Try again in" in refused["detail"], refused
        assert await Message.objects.acount() == stored
        # The socket stays open, and another user is not held back.
        await sockets[1].send_json_to({"type": "nope"})
        assert (await sockets[1].receive_json_from(timeout=10))["code"] == "unknown_type"
        assert (await theirs.connect())[0]
        _, frames = await send_and_finish(theirs, model="openai_gpt-4o-mini", content="mine")
        assert frames[-1]["type"] == "chat.done"
    finally:  # a socket left open would hold the process-wide channel layer for the tests after this one
        for comm in (*sockets, theirs):
            with contextlib.suppress(Exception):  # the failure worth reporting is the test's own
                await comm.disconnect()


def test_the_window_slides(rate_limit, user):
    """Sends leave the window one by one as they age: after the oldest is
    older than the window, one more may go (a 1 s window: the test waits
    for time to pass, which is the behaviour under test)."""
    rate_limit.CHAT_RATE_LIMIT_WINDOW = 1.0
    for _ in range(3):
        message_rate_check(user=user)
    with pytest.raises(RateLimited) as refused:
        message_rate_check(user=user)
    assert 0 < refused.value.retry_after <= 1.0

    def admitted() -> bool:
        try:
            message_rate_check(user=user)
        except RateLimited:
            return False
        return True

    wait_for(admitted, timeout=3, interval=0.05, what="a slot to free up")
    # One more went in: of the next three, at most two fit.
    assert False in [admitted() for _ in range(3)]


def test_a_redis_outage_does_not_turn_into_rate_limit_errors(rate_limit, user, monkeypatch):
    """The limit fails open: the dispatch that follows reports the outage."""
    import redis

    from chat import ratelimit

    def down(*args, **kwargs):
        raise redis.ConnectionError("Redis is down")

    monkeypatch.setattr(ratelimit, "_admit", lambda: down)
    for _ in range(10):
        message_rate_check(user=user)


def test_the_api_answers_a_user_over_the_rate_limit_with_429(rate_limit, user, demo_model):
    from chat.api.keys import api_key_create

    for _ in range(3):
        message_rate_check(user=user)  # the window is full
    api = Client(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=user)[1]}")
    response = api.post("/v1/chat/completions", json.dumps({
        "model": "local_demo", "messages": [{"role": "user", "content": "hi"}]}), content_type="application/json")
    error = response.json()["error"]
    assert "at most 3 in 60 seconds" in error["message"]
    assert not Message.objects.exists()
    assert (response.status_code, error["type"]) == (429, "rate_limit_exceeded"), (response.status_code, error)


# --- model output is inert where the server renders it ----------------------------------

def test_model_output_is_escaped_in_the_admin(client, user):
    """The chat page renders replies in the browser (tests/test_ui_chat.py);
    the admin renders them on the server, escaped."""
    evil = '<script>window.__pwned=1</script><img src=x onerror="alert(1)">'
    conversation = Conversation.objects.create(user=user, title=evil)
    reply = exchange(conversation, content=evil)
    client.force_login(superuser_create("root", "pw-root-123", email="root@example.com"))
    for url in ("/admin/chat/conversation/", f"/admin/chat/conversation/{conversation.pk}/change/",
                "/admin/chat/message/", f"/admin/chat/message/{reply.pk}/change/"):
        html = client.get(url).content.decode()
        assert "<script>window.__pwned" not in html and '<img src=x onerror="alert(1)">' not in html, url
    assert client.get(f"/admin/chat/message/{reply.pk}/change/").content.decode().count("&lt;script&gt;") >= 1
