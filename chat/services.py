"""Chat operations on a user's behalf: the only code that creates and
cancels messages. The websocket consumer, the HTTP views and the batches
call these; a reply's way from the queue to its end is chat/dispatch.py."""
from __future__ import annotations

import logging
from typing import Callable

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from chat.catalog import CatalogError, ModelChoice, model_resolve
from chat.dispatch import cancel_request, message_cancel_queued, message_dispatch
from chat.knowledge.bases import KnowledgeInputError, bases_usable
from chat.models import FINISHED_STATUSES, Conversation, Message, MessageStatus
from chat.ratelimit import RateLimited, message_rate_check
from chatsite.errors import CodedError

log = logging.getLogger(__name__)


class ChatInputError(CodedError):
    """A request that cannot be accepted; nothing was stored."""


def message_admissible(*, user, model: str, content: str, priority: int | None = None) -> ModelChoice:
    """Check a message before anything is stored, and resolve its model:
    the rate limit (interactive messages only), the content, the model.
    Raises ChatInputError. Everything here talks to Redis or an endpoint,
    so a caller with its own transaction runs it first: a transaction holds
    SQLite's write lock from its start (chatsite/settings.py)."""
    if priority is None:
        # Interactive messages (socket, /v1/chat/completions) count against
        # the user's rate limit; batch lines, queued with a priority, are
        # paced by BATCH_MAX_IN_FLIGHT instead.
        try:
            message_rate_check(user=user)
        except RateLimited as exc:
            raise ChatInputError("rate_limited", str(exc)) from exc
    if not isinstance(content, str) or not content.strip():
        raise ChatInputError("empty_content", "The message is empty.")
    if len(content) > settings.CHAT_MAX_CONTENT_CHARS:
        raise ChatInputError(
            "content_too_long", f"The message is longer than {settings.CHAT_MAX_CONTENT_CHARS} characters."
        )
    try:
        return model_resolve(model)
    except CatalogError as exc:
        raise ChatInputError(exc.code, str(exc)) from exc


def message_enqueue(
    *, user, model: str, content: str, conversation_id: int | None, client_id: str = "",
    subscribe: Callable[[int], None] | None = None, priority: int | None = None,
    choice: ModelChoice | None = None, knowledge: list[int] | None = None, params: dict | None = None,
) -> Message:
    """Store a user turn and its pending reply, and queue the work after the
    transaction commits (a worker must find the rows it is given).

    `subscribe(message_id)` runs after the commit and before the dispatch, so
    that the caller listens on the reply's group before any frame is sent.
    `priority`: see `message_dispatch`. `choice`: the caller ran
    `message_admissible` already. The reply returned carries the GPU
    scheduler's answer as `reply.admission` (None: no GPU involved, or the
    commit is not over yet, inside an outer transaction). `knowledge`: the
    ids of the user's knowledge bases the reply draws on (CONTRACT §8):
    each must be the user's and ready, or nothing is stored. `params`: a
    `/v1` request's checked options (chat/params.py), kept on the reply.
    """
    if choice is None:
        choice = message_admissible(user=user, model=model, content=content, priority=priority)
    try:
        knowledge = bases_usable(user=user, ids=knowledge)
    except KnowledgeInputError as exc:
        raise ChatInputError(exc.code, exc.detail) from exc
    with transaction.atomic():
        if conversation_id is not None:
            conversation = Conversation.objects.filter(pk=conversation_id, user=user).first()
            if conversation is None:
                raise ChatInputError("unknown_conversation", f"No conversation {conversation_id} of yours.")
        if "\x00" in content or "\x00" in client_id:
            # PostgreSQL text cannot hold NUL; refused on every database alike.
            raise ChatInputError("bad_content", "The message contains a NUL character (\\u0000).")
        if conversation_id is None:
            conversation = Conversation.objects.create(user=user, title=content.strip()[:60])
        else:
            conversation.save(update_fields=["updated_at"])
        now = timezone.now()
        Message.objects.create(conversation=conversation, role=Message.Role.USER, content=content,
                               model_name=choice.name, client_id=client_id, queued_at=now, finished_at=now)
        reply = Message.objects.create(conversation=conversation, role=Message.Role.ASSISTANT,
                                       model_name=choice.name, client_id=client_id,
                                       status=MessageStatus.QUEUED, queued_at=now, knowledge=knowledge or None,
                                       params=params)
        reply.admission = None

        def after_commit() -> None:
            try:
                if subscribe:
                    subscribe(reply.pk)
            finally:
                reply.admission = message_dispatch(message_id=reply.pk, choice=choice, priority=priority,
                                                   retrieve=bool(knowledge))

        transaction.on_commit(after_commit)
    return reply


def message_cancel(*, user, message_id: int) -> None:
    """Stop a reply: one that no run has started ends at once (cancelled);
    a running one is flagged, and its generation loop checks the flag (a
    solo GPU worker cannot be interrupted)."""
    reply = Message.objects.filter(pk=message_id, conversation__user=user, role=Message.Role.ASSISTANT).first()
    if reply is None:
        raise ChatInputError("unknown_message", f"No message {message_id} of yours.")
    if reply.is_finished:
        raise ChatInputError("already_finished", f"Message {message_id} has already finished.")
    cancel_request(message_id)  # first: a run may start it while this ends it
    if reply.status == MessageStatus.QUEUED:
        message_cancel_queued(message_id)


def messages_unfinished(*, user) -> list[int]:
    return list(
        Message.objects.filter(conversation__user=user, role=Message.Role.ASSISTANT)
        .exclude(status__in=FINISHED_STATUSES)
        .values_list("pk", flat=True)
    )
