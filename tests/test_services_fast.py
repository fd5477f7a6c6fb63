"""The chat services' decisions on a user's request (chat/services.py), in
this process against the real database and Redis, with no worker: what is
refused, with which error class and code, and that a refused request stores
and queues nothing; what is accepted is stored, and its dispatch waits for
the commit (captured here, never run: no task reaches the queues)."""
from __future__ import annotations

import contextlib

import pytest
from django.conf import settings

from chat.catalog import catalog_forget
from chat.dispatch import cancel_key, cancel_requested
from chat.models import Conversation, Message, MessageStatus, ModelConfig
from chat.ratelimit import rate_key
from chat.services import ChatInputError, message_cancel, message_enqueue, messages_unfinished
from chatsite.redis_client import redis_client
from tests.support.users import user_create

pytestmark = pytest.mark.django_db

MODEL = "fast_local"


@pytest.fixture
def alice():
    user = user_create("alice", "pw-alice-123")
    yield user
    redis_client().delete(rate_key(user.pk))


@pytest.fixture
def local_model():
    """A local model row: resolving it reads the database only (nothing is loaded)."""
    config = ModelConfig.objects.create(kind="local", name=MODEL, path="/nonexistent/fast_local")
    catalog_forget()
    return config


@contextlib.contextmanager
def refused(code: str):
    """The block raises exactly ChatInputError with `code`, and leaves no
    row and no callback waiting for the commit behind."""
    stored = (Conversation.objects.count(), Message.objects.count())
    with pytest.raises(ChatInputError) as caught:
        yield caught
    assert type(caught.value) is ChatInputError, type(caught.value)
    assert caught.value.code == code and caught.value.detail, (caught.value.code, caught.value.detail)
    assert (Conversation.objects.count(), Message.objects.count()) == stored


def enqueue(user, **fields):
    return message_enqueue(user=user, **{"model": MODEL, "content": "hello", "conversation_id": None, **fields})


@pytest.mark.parametrize("content", ["", "   ", "\n\t\u3000", None, 5, ["hi"]])
def test_empty_or_not_text_content_is_empty_content(alice, local_model, content,
                                                    django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks, refused("empty_content"):
        enqueue(alice, content=content)
    assert callbacks == []


def test_content_longer_than_the_limit_is_refused_and_the_limit_itself_accepted(
        alice, local_model, django_capture_on_commit_callbacks):
    limit = settings.CHAT_MAX_CONTENT_CHARS
    with refused("content_too_long") as caught:
        enqueue(alice, content="x" * (limit + 1))
    assert str(limit) in caught.value.detail
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        reply = enqueue(alice, content="x" * limit)
    assert reply.status == MessageStatus.QUEUED and len(callbacks) == 1


@pytest.mark.parametrize("model", ["no_such_model", "FAST_LOCAL", "fast_local ", "fast\x00local"])
def test_an_unknown_model_is_unknown_model(alice, local_model, model):
    with refused("unknown_model") as caught:
        enqueue(alice, model=model)
    assert caught.value.detail.startswith("No model is named")


def test_a_model_on_no_endpoint_is_unknown_model(alice, stack):
    catalog_forget()  # discovered afresh from the fake Ollama, which offers qwen:7b only
    with refused("unknown_model") as caught:
        enqueue(alice, model="ollama_missing:1b")
    assert "missing:1b" in caught.value.detail


def test_a_disabled_model_is_model_disabled(alice, local_model):
    ModelConfig.objects.filter(pk=local_model.pk).update(enabled=False)
    with refused("model_disabled"):
        enqueue(alice)


@pytest.mark.parametrize("field", ["content", "client_id"])
def test_a_nul_character_is_bad_content(alice, local_model, field):
    with refused("bad_content") as caught:
        enqueue(alice, **{field: "a\x00b"})
    assert "NUL" in caught.value.detail


def test_another_users_or_a_missing_conversation_is_unknown_conversation(alice, local_model):
    mallory = user_create("mallory", "pw-mallory-123")
    theirs = Conversation.objects.create(user=mallory, title="not yours")
    for conversation_id in (theirs.pk, theirs.pk + 1000):
        with refused("unknown_conversation"):
            enqueue(alice, conversation_id=conversation_id)
    assert not Message.objects.filter(conversation=theirs).exists()


def test_an_accepted_message_stores_both_turns_and_dispatches_only_after_the_commit(
        alice, local_model, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        reply = enqueue(alice, content="  What is a GPU?  ", client_id="c-1")
    question, answer = Message.objects.filter(conversation=reply.conversation).order_by("pk")
    assert (question.role, question.content, question.finished_at is not None) == ("user", "  What is a GPU?  ", True)
    assert (answer.pk, answer.role, answer.status, answer.model_name) == (reply.pk, "assistant", "queued", MODEL)
    assert reply.conversation.title == "What is a GPU?" and reply.conversation.user == alice
    assert len(callbacks) == 1  # the dispatch: not before the rows are committed
    # A later message goes into the same conversation.
    with django_capture_on_commit_callbacks(execute=False):
        second = enqueue(alice, content="and a CPU?", conversation_id=reply.conversation_id)
    assert second.conversation_id == reply.conversation_id
    assert sorted(messages_unfinished(user=alice)) == [reply.pk, second.pk]


def test_the_rate_limit_refuses_interactive_messages_but_not_batch_lines(
        alice, local_model, settings, django_capture_on_commit_callbacks):
    settings.CHAT_RATE_LIMIT_MESSAGES, settings.CHAT_RATE_LIMIT_WINDOW = 1, 60.0
    with django_capture_on_commit_callbacks(execute=False):
        enqueue(alice)
        with refused("rate_limited") as caught:
            enqueue(alice)
        assert "Too many messages" in caught.value.detail
        # Batch lines come with a priority and are paced by the batch runner instead.
        enqueue(alice, priority=settings.BATCH_PRIORITY)


def test_cancel_refuses_what_is_not_the_users_or_has_ended_and_flags_the_rest(alice, local_model):
    mallory = user_create("mallory", "pw-mallory-123")
    theirs = Conversation.objects.create(user=mallory, title="not yours")
    their_reply = Message.objects.create(conversation=theirs, role="assistant", model_name=MODEL, status="running")
    mine = Conversation.objects.create(user=alice, title="mine")
    question = Message.objects.create(conversation=mine, role="user", content="hi", model_name=MODEL)
    ended = Message.objects.create(conversation=mine, role="assistant", model_name=MODEL, status="done")
    running = Message.objects.create(conversation=mine, role="assistant", model_name=MODEL, status="running")
    try:
        for message_id, code in ((their_reply.pk, "unknown_message"), (question.pk, "unknown_message"),
                                 (running.pk + 1000, "unknown_message"), (ended.pk, "already_finished")):
            with pytest.raises(ChatInputError) as caught:
                message_cancel(user=alice, message_id=message_id)
            assert type(caught.value) is ChatInputError and caught.value.code == code, (message_id, caught.value)
            assert not cancel_requested(message_id)
        message_cancel(user=alice, message_id=running.pk)
        assert cancel_requested(running.pk)
    finally:
        # Message ids come back after a rolled-back test: leave no flag for a later one.
        redis_client().delete(*(cancel_key(m.pk) for m in (their_reply, question, ended, running)))


def test_cancel_ends_a_reply_no_run_has_started_at_once(alice, local_model):
    """A queued reply is ended by the cancel itself (cancelled, its end sent
    once); a running one only gets the flag its generation loop reads."""
    from workers.replies import reply_start

    mine = Conversation.objects.create(user=alice, title="mine")
    queued = Message.objects.create(conversation=mine, role="assistant", model_name=MODEL, status="queued")
    running = Message.objects.create(conversation=mine, role="assistant", model_name=MODEL, status="running")
    try:
        message_cancel(user=alice, message_id=queued.pk)
        message_cancel(user=alice, message_id=running.pk)
        queued.refresh_from_db()
        running.refresh_from_db()
        assert queued.status == MessageStatus.CANCELLED and queued.finish_reason == "cancelled"
        assert queued.finished_at is not None
        assert running.status == MessageStatus.RUNNING and cancel_requested(running.pk)
        # A run that claims the cancelled reply afterwards does nothing.
        assert reply_start(queued.pk) is None
        with pytest.raises(ChatInputError) as caught:
            message_cancel(user=alice, message_id=queued.pk)
        assert caught.value.code == "already_finished"
    finally:
        redis_client().delete(cancel_key(queued.pk), cancel_key(running.pk))
