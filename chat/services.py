"""Chat operations: the only code that creates, dispatches, cancels and ends
messages. The websocket consumer, the HTTP views and the tasks call these."""
from __future__ import annotations

import logging
import time
from typing import Callable

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from chat.catalog import PREFIXES, CatalogError, ModelChoice, model_resolve
from chat.metrics import STAGES, message_observe
from chat.placement import gpu_queue, slot_for_external, slot_for_local
from chat.models import FINISHED_STATUSES, Conversation, Message, MessageStatus
from chat.ratelimit import RateLimited, message_rate_check
from chat.relay import group_send, message_group
from chatsite.celery import app
from chatsite.redis_client import redis_client

log = logging.getLogger(__name__)


class ChatInputError(Exception):
    """A request that cannot be accepted; nothing was stored."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


def message_enqueue(
    *, user, model: str, content: str, conversation_id: int | None, client_id: str = "",
    subscribe: Callable[[int], None] | None = None, priority: int | None = None,
) -> Message:
    """Store a user turn and its pending reply, and queue the work after the
    transaction commits (a worker must find the rows it is given).

    `subscribe(message_id)` runs after the commit and before the dispatch, so
    that the caller listens on the reply's group before any frame is sent.
    `priority`: see `message_dispatch`.
    """
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
        choice = model_resolve(model)
    except CatalogError as exc:
        raise ChatInputError(exc.code, str(exc)) from exc
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
                                       status=MessageStatus.QUEUED, queued_at=now)

        def after_commit() -> None:
            try:
                if subscribe:
                    subscribe(reply.pk)
            finally:
                message_dispatch(message_id=reply.pk, choice=choice, priority=priority)

        transaction.on_commit(after_commit)
    return reply


def message_dispatch(*, message_id: int, choice: ModelChoice, priority: int | None = None) -> None:
    """Queue the work for a reply. A local model runs on a GPU worker (the
    slot chat/placement.py picks), whose prelude makes the GPU ready. An
    external model that needs the GPU freed first gets a short acquire step
    on the queue of the GPU it shares, in line with every other request for
    that GPU, chained to the streaming call on the `cpu` queue.

    `priority` (batch lines: settings.BATCH_PRIORITY) goes on every step:
    Redis hands a worker priority-0 messages (all interactive ones) first.
    """
    options = {} if priority is None else {"priority": priority}
    try:
        redis_client().hset(DISPATCHED_KEY, str(message_id), f"{time.time():.3f}")
        if choice.kind == "local":
            queue = gpu_queue(slot_for_local(choice.name))
            app.signature("workers.tasks.gpu_generate", args=(message_id,), queue=queue, **options).apply_async()
        elif choice.needs_gpu_owner:
            queue = gpu_queue(slot_for_external())
            (
                app.signature("workers.tasks.gpu_acquire", args=(message_id,), immutable=True, queue=queue,
                              **options)
                | app.signature("workers.tasks.cpu_generate", args=(message_id,), immutable=True, **options)
            ).apply_async()
        else:
            app.signature("workers.tasks.cpu_generate", args=(message_id,), **options).apply_async()
    except Exception as exc:  # the broker refused: the message must not sit queued forever
        log.exception("could not queue message %s", message_id)
        message_fail(message_id=message_id, code="queue_unavailable", detail=f"Could not queue the message: {exc}")


#: The dispatch ledger: a hash of the replies whose work is queued or under
#: way, from message_dispatch until the reply ends. It lives in the same
#: Redis as the queues, so when Redis comes back empty both are gone, and an
#: unfinished reply missing from it, which no run claims, is one whose task
#: was lost (chat.generation.replies_redispatch_lost).
DISPATCHED_KEY = "chat:dispatched"
REDISPATCH_LOCK_KEY = "chat:redispatch-lock"


def dispatch_forget(message_id: int) -> None:
    """The reply ended. Best effort: an entry left behind is harmless (the
    ledger is only read for unfinished replies)."""
    try:
        redis_client().hdel(DISPATCHED_KEY, str(message_id))
    except Exception:
        log.warning("message %s: could not remove it from the dispatch ledger", message_id, exc_info=True)


def message_cancel(*, user, message_id: int) -> None:
    """Ask a reply to stop. A solo GPU worker cannot be interrupted, so this
    is a flag that the generation loop (and a task not yet started) checks."""
    reply = Message.objects.filter(pk=message_id, conversation__user=user, role=Message.Role.ASSISTANT).first()
    if reply is None:
        raise ChatInputError("unknown_message", f"No message {message_id} of yours.")
    if reply.is_finished:
        raise ChatInputError("already_finished", f"Message {message_id} has already finished.")
    redis_client().set(cancel_key(message_id), "1", ex=settings.CHAT_CANCEL_TTL)


def cancel_key(message_id: int) -> str:
    return f"chat:cancel:{message_id}"


def cancel_requested(message_id: int) -> bool:
    return bool(redis_client().exists(cancel_key(message_id)))


def messages_unfinished(*, user) -> list[int]:
    return list(
        Message.objects.filter(conversation__user=user, role=Message.Role.ASSISTANT)
        .exclude(status__in=FINISHED_STATUSES)
        .values_list("pk", flat=True)
    )


def message_finish(*, message_id: int, content: str, finish_reason: str, prompt_tokens: int,
                   completion_tokens: int) -> bool:
    """End a reply and send `chat.done`, once: a conditional update makes a
    second caller (a re-delivered task, a racing cancel) a no-op."""
    status = MessageStatus.CANCELLED if finish_reason == "cancelled" else MessageStatus.DONE
    ended = _end(message_id, status=status, content=content, finish_reason=finish_reason,
                 prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    if ended:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        group_send(message_group(message_id),
                   {"type": "chat.done", "message": message_id, "finish_reason": finish_reason, "usage": usage})
    return ended


def message_fail(*, message_id: int, code: str, detail: str, content: str | None = None) -> bool:
    """End a reply with an error and send `chat.error`, once."""
    fields = {"status": MessageStatus.ERROR, "error_code": code, "error_detail": detail}
    if content is not None:
        fields["content"] = content
    ended = _end(message_id, **fields)
    if ended:
        group_send(message_group(message_id), {"type": "chat.error", "message": message_id, "code": code,
                                               "detail": detail})
    return ended


def _end(message_id: int, **fields) -> bool:
    updated = (
        Message.objects.filter(pk=message_id)
        .exclude(status__in=FINISHED_STATUSES)
        .update(finished_at=timezone.now(), **fields)
    )
    if updated == 1:
        dispatch_forget(message_id)
        _observe(message_id)
    return updated == 1


def _observe(message_id: int) -> None:
    """Feed the reply's timings to /metrics (seconds from queued)."""
    reply = Message.objects.filter(pk=message_id).values(
        "model_name", "status", "queued_at", "started_at", "first_token_at", "finished_at").first()
    if reply is None or reply["queued_at"] is None:
        return
    kind = next((k for k, prefix in PREFIXES.items() if reply["model_name"].startswith(prefix)), "local")
    seconds = {stage: (reply[f"{stage}_at"] - reply["queued_at"]).total_seconds()
               for stage in STAGES if reply[f"{stage}_at"] is not None}
    message_observe(kind=kind, status=reply["status"], seconds=seconds)
