"""OpenAI-style chat requests (a model and a list of messages) on top of the
chat services, for `/v1/chat/completions` and for batch lines alike: the
request becomes a conversation whose last user turn goes through
`chat.services.message_enqueue`, and a finished reply reads back as a
`chat.completion` object. Errors use OpenAI's envelope and statuses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from django.db import transaction

from chat import services
from chat.catalog import ModelChoice
from chat.models import Conversation, Message, MessageStatus
from chatsite.errors import CodedError

#: Roles a request may carry. `developer` is OpenAI's newer name for
#: `system`; the models here know only the older one.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

#: chat.error codes (and ChatInputError codes) -> HTTP status and OpenAI
#: error type. Anything else is a 500 server_error.
_ERRORS = {
    "invalid_request": (400, "invalid_request_error"),
    "invalid_api_key": (401, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "empty_content": (400, "invalid_request_error"),
    "content_too_long": (400, "invalid_request_error"),
    "bad_content": (400, "invalid_request_error"),
    "unknown_conversation": (404, "invalid_request_error"),
    "unknown_model": (404, "invalid_request_error"),
    "model_not_found": (404, "invalid_request_error"),
    "model_disabled": (404, "invalid_request_error"),
    "unknown_knowledge": (404, "invalid_request_error"),
    "knowledge_not_ready": (409, "invalid_request_error"),
    "bad_frame": (400, "invalid_request_error"),
    "rate_limited": (429, "rate_limit_exceeded"),
    "upstream_rate_limited": (429, "rate_limit_exceeded"),
    "upstream_error": (502, "server_error"),
    "upstream_auth": (502, "server_error"),
    "endpoint_unavailable": (503, "server_error"),
    "queue_unavailable": (503, "server_error"),
    "gpu_busy": (503, "server_error"),
    "timeout": (504, "server_error"),
}
#: Our codes that OpenAI clients know under another name.
_OPENAI_CODES = {"unknown_model": "model_not_found", "model_disabled": "model_not_found"}


class RequestError(CodedError):
    """A request that cannot be answered, as OpenAI reports it: the code and
    detail, the parameter at fault, the HTTP status (by default the code's)."""

    def __init__(self, code: str, detail: str, *, param: str | None = None, status: int | None = None):
        super().__init__(code, detail)
        self.param = param
        self.status = status or error_status(code)

    def body(self) -> dict:
        return error_body(self.code, self.detail, param=self.param)


def error_status(code: str) -> int:
    return _ERRORS.get(code, (500, ""))[0]


def error_body(code: str, message: str, *, param: str | None = None) -> dict:
    """OpenAI's error envelope (the official client reads `error.message`)."""
    kind = _ERRORS.get(code, (500, "server_error"))[1]
    return {"error": {"message": message, "type": kind, "param": param, "code": _OPENAI_CODES.get(code, code)}}


@dataclass(frozen=True)
class ChatRequest:
    model: str
    content: str  # the last user turn
    history: list[dict] = field(default_factory=list)  # the turns before it
    stream: bool = False
    include_usage: bool = False
    #: Our extra body field (CONTRACT §8): the user's knowledge bases to draw on.
    knowledge: list | None = None


def chat_request_parse(body) -> ChatRequest:
    """Validate a `/v1/chat/completions` body. Sampling options (max_tokens,
    temperature, top_p) are accepted and not applied: a model's defaults
    are set per model in the admin. `knowledge` (an extra body field, as
    the openai client sends with `extra_body`): ids of the caller's
    knowledge bases, as in the websocket's chat.send."""
    if not isinstance(body, dict):
        raise RequestError("invalid_request", "The body must be a JSON object.")
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not model:
        raise RequestError("invalid_request", "you must provide a model parameter", param="model")
    if not isinstance(messages, list) or not messages:
        raise RequestError("invalid_request", "'messages' must be a non-empty list.", param="messages")
    turns = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise RequestError("invalid_request", f"messages[{index}].role must be one of {sorted(ROLES)}.",
                               param=f"messages[{index}].role")
        turns.append({"role": ROLES[role], "content": _text(message.get("content"), index)})
    if turns[-1]["role"] != "user":
        raise RequestError("invalid_request", "The last message must be the user's.", param="messages")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("invalid_request", "'stream' must be a boolean.", param="stream")
    options = body.get("stream_options") or {}
    return ChatRequest(model=model, content=turns[-1]["content"], history=turns[:-1], stream=stream,
                       include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
                       knowledge=body.get("knowledge"))


def _text(content, index: int) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise RequestError("invalid_request", f"messages[{index}].content must be text.",
                           param=f"messages[{index}].content")
    if "\x00" in content:  # as chat.services.message_enqueue: no database stores it alike
        raise RequestError("bad_content", f"messages[{index}].content contains a NUL character (\\u0000).",
                           param=f"messages[{index}].content")
    return content


def completion_admissible(*, user, request: ChatRequest, priority: int | None = None) -> ModelChoice:
    """Check a request before anything is stored, and resolve its model
    (`services.message_admissible`); RequestError names what is wrong."""
    try:
        return services.message_admissible(user=user, model=request.model, content=request.content,
                                           priority=priority)
    except services.ChatInputError as exc:
        raise _request_error(exc) from exc


def completion_enqueue(*, user, request: ChatRequest, title: str = "", priority: int | None = None,
                       subscribe: Callable[[int], None] | None = None,
                       choice: ModelChoice | None = None) -> Message:
    """Store the request as a new conversation and queue its reply.

    A request carries its whole history, so each gets its own conversation:
    the earlier turns are stored as finished messages, the last one goes
    through `message_enqueue` like a message from the chat page. `choice`:
    the caller ran `completion_admissible` already.
    """
    if choice is None:
        # Before the transaction: it would hold SQLite's write lock across
        # the rate limit's and the catalog's Redis round trips.
        choice = completion_admissible(user=user, request=request, priority=priority)
    try:
        with transaction.atomic():
            conversation_id = None
            if request.history or title:
                conversation = Conversation.objects.create(user=user, title=(title or request.content.strip())[:60])
                Message.objects.bulk_create(
                    Message(conversation=conversation, role=turn["role"], content=turn["content"],
                            model_name=request.model, status=MessageStatus.DONE)
                    for turn in request.history
                )
                conversation_id = conversation.pk
            return services.message_enqueue(user=user, model=request.model, content=request.content,
                                            conversation_id=conversation_id, subscribe=subscribe,
                                            priority=priority, choice=choice, knowledge=request.knowledge)
    except services.ChatInputError as exc:
        raise _request_error(exc) from exc


def _request_error(exc: "services.ChatInputError") -> RequestError:
    param = {"unknown_model": "model", "model_disabled": "model", "unknown_knowledge": "knowledge",
             "knowledge_not_ready": "knowledge", "bad_frame": "knowledge"}.get(exc.code, "messages")
    return RequestError(exc.code, exc.detail, param=param)


def completion_object(reply: Message) -> dict:
    """A finished reply as OpenAI's `chat.completion`."""
    return {
        "id": completion_id(reply.pk),
        "object": "chat.completion",
        "created": int((reply.queued_at or reply.finished_at).timestamp()),
        "model": reply.model_name,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": reply.content, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason(reply.finish_reason),
        }],
        "usage": reply.usage(),
        # Ours, with `knowledge`: the passages given to the model (CONTRACT §8's chat.sources).
        **({"sources": reply.sources or []} if reply.knowledge else {}),
    }


def completion_id(message_id: int) -> str:
    return f"chatcmpl-{message_id}"


def finish_reason(reason: str) -> str:
    # "cancelled" is ours (Stop); OpenAI's clients know stop and length.
    return "length" if reason == "length" else "stop"
