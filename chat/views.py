"""HTTP views: the chat page, the conversation, GPU status and model APIs,
health checks. The session APIs answer a refused request as
`{"error": {"code", "detail"}}` (`_error`), and an anonymous caller as
`{"error": "authentication required"}`."""
from __future__ import annotations

import logging

from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import get_token
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods

from chat import conversations, selectors
from chat.dispatch import workers_alive
from chat.jsonbody import json_object
from chat.models import Conversation, Message, MessageStatus
from chatsite import queues
from chatsite.errors import CodedError
from chatsite.redis_client import redis_client

log = logging.getLogger(__name__)


def api_login_required(view):
    """An API answers 401 JSON to an anonymous caller instead of a redirect
    to the login page, which a script (or the page's fetch) cannot use."""
    def wrapped(request: HttpRequest, *args, **kwargs):
        if not request.user.is_authenticated:
            return JsonResponse({"error": "authentication required"}, status=401)
        return view(request, *args, **kwargs)
    wrapped.__name__ = view.__name__
    return wrapped


@login_required
def index(request: HttpRequest, conversation_id: int | None = None) -> HttpResponse:
    """The chat page; /c/<id>/ opens one of the user's conversations, so that
    a reload or a bookmark comes back to it."""
    if conversation_id is not None and not Conversation.objects.filter(pk=conversation_id, user=request.user).exists():
        raise Http404("No such conversation.")
    page_config = {
        "ws_url": "/ws/chat/",
        "models_url": reverse("api-models"),
        "gpu_url": reverse("api-gpu"),
        "conversations_url": reverse("api-conversations"),
        "messages_url": reverse("api-message", args=[0]).removesuffix("0/"),
        # CONTRACT §8: the user's knowledge bases (knowledge.js).
        "knowledge_url": reverse("api-knowledge"),
        "page_url": reverse("index"),
        "conversation": conversation_id,
        # The APIs that change things are POST/PATCH/DELETE behind Django's CSRF check.
        "csrf_token": get_token(request),
    }
    return render(request, "chat/index.html", {"page_config": page_config})


def _error(status: int, code: str, detail: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "detail": detail}}, status=status)


@require_GET
@api_login_required
def api_conversations(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"conversations": selectors.conversations_list(user=request.user)})


@require_http_methods(["GET", "PATCH", "DELETE"])
@api_login_required
def api_conversation(request: HttpRequest, conversation_id: int) -> HttpResponse:
    """GET: the conversation with its messages; PATCH {"title"}: rename; DELETE."""
    try:
        conversation = selectors.conversation_get(user=request.user, conversation_id=conversation_id)
    except Conversation.DoesNotExist:
        return _error(404, "not_found", f"No conversation {conversation_id} of yours.")
    if request.method == "DELETE":
        conversations.conversation_delete(conversation=conversation)
        return HttpResponse(status=204)
    if request.method == "PATCH":
        try:
            body = json_object(request.body or b"{}")  # BadJson: code bad_json
            conversations.conversation_rename(conversation=conversation, title=body.get("title", ""))
        except CodedError as exc:
            return _error(400, exc.code, exc.detail)
    return JsonResponse({
        "conversation": {"id": conversation.pk, "title": conversation.title},
        "messages": selectors.conversation_messages(conversation=conversation),
    })


@require_http_methods(["GET", "DELETE"])
@api_login_required
def api_message(request: HttpRequest, message_id: int) -> HttpResponse:
    """GET: one message (the page polls a queued reply for its place in the
    queue, and reads a finished one's figures); DELETE: take back the last
    exchange for Regenerate, answering the question to send again."""
    try:
        message = selectors.message_get(user=request.user, message_id=message_id)
    except Message.DoesNotExist:
        return _error(404, "not_found", f"No message {message_id} of yours.")
    if request.method == "DELETE":
        try:
            return JsonResponse(conversations.exchange_retract(reply=message))
        except CodedError as exc:
            return _error(409, exc.code, exc.detail)
    position = selectors.queue_positions(message_ids=[message.pk]).get(message.pk) \
        if message.status == MessageStatus.QUEUED else None
    return JsonResponse(selectors.message_public(message, queue_position=position))


@require_GET
@api_login_required
def api_gpu(request: HttpRequest) -> JsonResponse:
    return JsonResponse(selectors.gpu_status())


@require_GET
@api_login_required
def api_models(request: HttpRequest) -> JsonResponse:
    return JsonResponse(selectors.models_available())


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """200 only when the database, Redis and a GPU and a CPU worker answer
    (CONTRACT §7); otherwise 503 naming what is missing."""
    missing = []
    try:
        connection.ensure_connection()
    except Exception as exc:  # any driver error means "not ready"
        missing.append(f"database: {exc}")
    try:
        redis_client().ping()
    except Exception as exc:
        missing.append(f"redis: {exc}")
    else:
        alive = workers_alive()
        if not any(queue.startswith(queues.GPU_QUEUE_PREFIX) for queue in alive):
            missing.append("gpu worker: none answered")
        if not alive.get(queues.CPU_QUEUE):
            missing.append("cpu worker: none answered")
    _readiness.note(missing)
    status = 503 if missing else 200
    return JsonResponse({"status": "ready" if not missing else "not ready", "missing": missing}, status=status)


class ReadinessLog:
    """Logs /readyz's answer when it changes, once per process: not ready
    (WARNING, naming what is missing) and ready again (INFO). A probe every
    few seconds answering the same 503 adds no line (django.request's own
    ERROR for it is filtered: chatsite.logs.ProbeFilter)."""

    def __init__(self) -> None:
        self.last: tuple[str, ...] | None = None

    def note(self, missing: list[str]) -> None:
        # What is missing, not why: a driver's message can differ per probe.
        parts = tuple(item.split(":", 1)[0] for item in missing)
        if parts == self.last:
            return
        # Two probes at once may both log the change: harmless, and no lock
        # on every probe.
        self.last = parts
        if parts:
            log.warning("not ready: %s", "; ".join(missing))
        else:
            log.info("ready: the database, Redis, a GPU worker and a CPU worker answer")


_readiness = ReadinessLog()
