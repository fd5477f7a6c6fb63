"""The chat page's conversation endpoints (list, open, rename, delete, one
message, take back the last exchange), always scoped to the logged-in user,
and the page's languages, through Django's test client on the real database
and Redis."""
import json
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from chat.models import Conversation, Message
from chat.dispatch import cancel_key, cancel_requested
from chatsite.redis_client import redis_client
from tests.support.users import user_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def logged_in(client, user):
    client.force_login(user)
    return client


@pytest.fixture
def other():
    return user_create("mallory", "pw-mallory-123")


def exchange(conversation, *, question="Hi", answer="Hello", status="done", model="local_demo", **reply_fields):
    """A question and its reply, as message_enqueue and a worker leave them."""
    now = timezone.now()
    Message.objects.create(conversation=conversation, role="user", content=question, model_name=model,
                           queued_at=now, finished_at=now)
    finished = now + timedelta(seconds=2) if status in ("done", "cancelled", "error") else None
    return Message.objects.create(conversation=conversation, role="assistant", content=answer, model_name=model,
                                  status=status, queued_at=now, finished_at=finished, **reply_fields)


def patch(client, url, body, **extra):
    return client.patch(url, json.dumps(body), content_type="application/json", **extra)


# --- list and open ---------------------------------------------------------------

def test_list_is_the_users_own_most_recent_first_with_busy_marks(logged_in, user, other):
    old = Conversation.objects.create(user=user, title="old")
    new = Conversation.objects.create(user=user, title="new")
    Conversation.objects.create(user=other, title="not mine")
    exchange(old)
    exchange(new, status="running")
    Conversation.objects.filter(pk=old.pk).update(updated_at=timezone.now() - timedelta(days=1))

    body = logged_in.get("/api/conversations/").json()
    assert [(c["id"], c["title"], c["busy"]) for c in body["conversations"]] == [
        (new.pk, "new", True), (old.pk, "old", False)]


def test_batch_lines_are_not_listed_as_conversations(logged_in, user):
    from chat.models import Batch, BatchFile, BatchLine

    chat = Conversation.objects.create(user=user, title="a chat")
    exchange(chat)
    line = Conversation.objects.create(user=user, title="batch_1 #1 a")
    reply = exchange(line)
    upload = BatchFile.objects.create(user=user, purpose="batch", filename="in.jsonl", bytes=1, content="{}")
    batch = Batch.objects.create(user=user, input_file=upload, endpoint="/v1/chat/completions")
    BatchLine.objects.create(batch=batch, line=1, custom_id="a", state="dispatched", message=reply)

    body = logged_in.get("/api/conversations/").json()
    assert [c["id"] for c in body["conversations"]] == [chat.pk]


def test_conversation_messages_with_figures(logged_in, user):
    conversation = Conversation.objects.create(user=user, title="figures")
    reply = exchange(conversation, answer="**bold**", completion_tokens=40, prompt_tokens=5)
    Message.objects.filter(pk=reply.pk).update(first_token_at=reply.queued_at + timedelta(seconds=0.5),
                                               finished_at=reply.queued_at + timedelta(seconds=2.5))

    body = logged_in.get(f"/api/conversations/{conversation.pk}/").json()
    assert body["conversation"] == {"id": conversation.pk, "title": "figures"}
    question, answer = body["messages"]
    assert (question["role"], question["content"]) == ("user", "Hi")
    assert (answer["role"], answer["content"], answer["model"], answer["status"]) == (
        "assistant", "**bold**", "local_demo", "done")
    assert answer["ttft_seconds"] == 0.5
    assert answer["tokens_per_second"] == 20.0  # 40 tokens in the 2 s after the first
    assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": 40, "total_tokens": 45}
    assert answer["queue_position"] is None


def test_queued_reply_knows_its_place(logged_in, user, other):
    mine = Conversation.objects.create(user=user)
    theirs = Conversation.objects.create(user=other)
    exchange(theirs, status="running")  # another user's reply ahead, being written
    exchange(theirs, status="queued")   # and one waiting
    exchange(mine, status="done")       # finished: not in the way
    waiting = exchange(mine, status="queued", answer="")

    assert logged_in.get(f"/api/messages/{waiting.pk}/").json()["queue_position"] == 2
    listed = logged_in.get(f"/api/conversations/{mine.pk}/").json()["messages"]
    assert [m["queue_position"] for m in listed] == [None, None, None, 2]


def test_other_users_conversations_and_messages_are_404(logged_in, other):
    theirs = Conversation.objects.create(user=other, title="private")
    reply = exchange(theirs)
    for method, url in [("get", f"/api/conversations/{theirs.pk}/"), ("delete", f"/api/conversations/{theirs.pk}/"),
                        ("get", f"/api/messages/{reply.pk}/"), ("delete", f"/api/messages/{reply.pk}/")]:
        response = getattr(logged_in, method)(url)
        assert response.status_code == 404, (method, url)
        assert response.json()["error"]["code"] == "not_found"
    assert patch(logged_in, f"/api/conversations/{theirs.pk}/", {"title": "mine now"}).status_code == 404
    theirs.refresh_from_db()
    assert theirs.title == "private" and Message.objects.filter(pk=reply.pk).exists()
    assert logged_in.get(f"/c/{theirs.pk}/").status_code == 404


def test_anonymous_gets_401_json_and_the_page_redirects(client, user):
    conversation = Conversation.objects.create(user=user)
    for url in ("/api/conversations/", f"/api/conversations/{conversation.pk}/", "/api/messages/1/"):
        response = client.get(url)
        assert response.status_code == 401 and response.json() == {"error": "authentication required"}
    response = client.get(f"/c/{conversation.pk}/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


# --- rename and delete --------------------------------------------------------

def test_rename_keeps_one_line_and_does_not_reorder(logged_in, user):
    conversation = Conversation.objects.create(user=user, title="before")
    updated = Conversation.objects.get(pk=conversation.pk).updated_at

    response = patch(logged_in, f"/api/conversations/{conversation.pk}/", {"title": "  Plans\n for  May "})
    assert response.status_code == 200
    assert response.json()["conversation"]["title"] == "Plans for May"
    conversation.refresh_from_db()
    assert (conversation.title, conversation.updated_at) == ("Plans for May", updated)

    for bad in ({"title": "   "}, {"title": ""}):
        response = patch(logged_in, f"/api/conversations/{conversation.pk}/", bad)
        assert response.status_code == 400 and response.json()["error"]["code"] == "empty_title"
    response = logged_in.patch(f"/api/conversations/{conversation.pk}/", "[1]", content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_json"


def test_writes_need_the_csrf_token(user):
    conversation = Conversation.objects.create(user=user, title="csrf")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert patch(client, f"/api/conversations/{conversation.pk}/", {"title": "x"}).status_code == 403
    assert client.delete(f"/api/conversations/{conversation.pk}/").status_code == 403

    page = client.get(f"/c/{conversation.pk}/")
    config = json.loads(page.content.decode().split('id="page-config" type="application/json">')[1]
                        .split("</script>")[0])
    assert config["conversation"] == conversation.pk
    response = patch(client, f"/api/conversations/{conversation.pk}/", {"title": "x"},
                     HTTP_X_CSRFTOKEN=config["csrf_token"])
    assert response.status_code == 200


def test_delete_cancels_unfinished_replies_first(logged_in, user):
    conversation = Conversation.objects.create(user=user)
    done = exchange(conversation)
    running = exchange(conversation, status="running")
    try:
        assert logged_in.delete(f"/api/conversations/{conversation.pk}/").status_code == 204
        assert not Conversation.objects.filter(pk=conversation.pk).exists()
        assert not Message.objects.filter(conversation_id=conversation.pk).exists()
        # The worker writing the reply sees the flag and stops.
        assert cancel_requested(running.pk) and not cancel_requested(done.pk)
    finally:
        redis_client().delete(cancel_key(running.pk))


# --- take back the last exchange (Regenerate) ----------------------------------

def test_retract_removes_the_last_exchange_and_returns_the_question(logged_in, user):
    conversation = Conversation.objects.create(user=user)
    first = exchange(conversation, question="one", answer="1")
    last = exchange(conversation, question="two", answer="2", model="ollama_qwen:7b")

    response = logged_in.delete(f"/api/messages/{first.pk}/")
    assert response.status_code == 409 and response.json()["error"]["code"] == "not_last"

    response = logged_in.delete(f"/api/messages/{last.pk}/")
    assert response.status_code == 200
    assert response.json() == {"content": "two", "model": "ollama_qwen:7b"}
    assert list(conversation.messages.values_list("content", flat=True)) == ["one", "1"]


def test_retract_refuses_an_unfinished_reply_and_a_question(logged_in, user):
    conversation = Conversation.objects.create(user=user)
    running = exchange(conversation, status="running")
    response = logged_in.delete(f"/api/messages/{running.pk}/")
    assert response.status_code == 409 and response.json()["error"]["code"] == "not_finished"
    question = conversation.messages.get(role="user")
    response = logged_in.delete(f"/api/messages/{question.pk}/")
    assert response.status_code == 409 and response.json()["error"]["code"] == "not_a_reply"
    assert conversation.messages.count() == 2


# --- languages ---------------------------------------------------------------------

def test_page_language_follows_the_browser_and_the_switch(logged_in):
    english = logged_in.get("/", HTTP_ACCEPT_LANGUAGE="en-US,en;q=0.9").content.decode()
    assert '<html lang="en">' in english and "New chat" in english

    chinese = logged_in.get("/", HTTP_ACCEPT_LANGUAGE="zh-CN,zh;q=0.9").content.decode()
    assert '<html lang="zh-hans">' in chinese and "新对话" in chinese and "New chat" not in chinese
    catalog = logged_in.get("/jsi18n/", HTTP_ACCEPT_LANGUAGE="zh-CN").content.decode()
    assert "\\u6b63\\u5728\\u961f\\u5217\\u4e2d\\u7b49\\u5f85" in catalog or "正在队列中等待" in catalog

    response = logged_in.post("/i18n/setlang/", {"language": "en", "next": "/"}, HTTP_ACCEPT_LANGUAGE="zh-CN")
    assert response.status_code == 302 and response["Location"] == "/"
    chosen = logged_in.get("/", HTTP_ACCEPT_LANGUAGE="zh-CN").content.decode()
    assert '<html lang="en">' in chosen and "New chat" in chosen


def test_login_page_in_chinese(client):
    page = client.get("/accounts/login/", HTTP_ACCEPT_LANGUAGE="zh-CN").content.decode()
    assert "登录" in page and "用户名" in page
