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

from chat import params, services
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
    "not_a_chat_model": (400, "invalid_request_error"),
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
    content: str  # the last turn's text (a user's, or a tool's result)
    history: list[dict] = field(default_factory=list)  # the turns before it, as text
    stream: bool = False
    include_usage: bool = False
    #: Our extra body field (CONTRACT §8): the user's knowledge bases to draw on.
    knowledge: list | None = None
    #: The generation's options, checked (chat/params.py `options_parse`).
    options: dict = field(default_factory=dict)
    #: The messages as sent, when they carry more than text (images, tool
    #: calls, tool results): the backend is given these rather than `history`.
    messages: list[dict] | None = None
    #: Choices asked for: each is a reply of its own.
    n: int = 1

    def params(self) -> dict:
        """What the reply keeps (`Message.params`) for the worker."""
        return {"options": self.options, **({"messages": self.messages} if self.messages else {})}


def chat_request_parse(body) -> ChatRequest:
    """Validate a `/v1/chat/completions` body: the messages, and every
    option against OpenAI's reference (chat/params.py; what a model's
    backend cannot do is refused once the model is resolved, in
    `completion_admissible`). `knowledge` (an extra body field, as the
    openai client sends with `extra_body`): ids of the caller's knowledge
    bases, as in the websocket's chat.send."""
    if not isinstance(body, dict):
        raise RequestError("invalid_request", "The body must be a JSON object.")
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not model:
        raise RequestError("invalid_request", "you must provide a model parameter", param="model")
    if not isinstance(messages, list) or not messages:
        raise RequestError("invalid_request", "'messages' must be a non-empty list.", param="messages")
    try:
        options = params.options_parse(body)
        n = params.choices_count(body)
        checked = [_message(message, index) for index, message in enumerate(messages)]
    except params.ParamError as exc:
        raise RequestError(exc.code, exc.detail, param=exc.param) from exc
    rich = any(_rich(m) for m in checked)
    turns = [{"role": m["role"], "content": _shown(m)} for m in checked]
    if turns[-1]["role"] not in ("user", "tool"):
        raise RequestError("invalid_request", "The last message must be the user's (or a tool's result).",
                           param="messages")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("invalid_request", "'stream' must be a boolean.", param="stream")
    stream_options = body.get("stream_options") or {}
    return ChatRequest(model=model, content=turns[-1]["content"], history=turns[:-1], stream=stream,
                       include_usage=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
                       knowledge=body.get("knowledge"), options=options,
                       messages=[_plain_roles(m) for m in checked] if rich else None, n=n)


def _message(message, index: int) -> dict:
    """One message, checked: its role, and content as the role allows
    (text parts for all; image parts for the user's; tool calls for the
    assistant's, whose content may then be null; a tool's result needs the
    id of the call it answers)."""
    at = f"messages[{index}]"
    role = message.get("role") if isinstance(message, dict) else None
    if role not in ROLES and role != "tool":
        raise params.ParamError(f"{at}.role must be one of {sorted([*ROLES, 'tool'])}.", param=f"{at}.role")
    content = message.get("content")
    checked = {"role": role}
    if role == "assistant" and message.get("tool_calls") is not None:
        checked["tool_calls"] = _tool_calls(message["tool_calls"], at)
        if content is None:
            content = ""
    if role == "tool":
        if not isinstance(message.get("tool_call_id"), str) or not message["tool_call_id"]:
            raise params.ParamError(f"{at}.tool_call_id is required for a tool's message.",
                                    param=f"{at}.tool_call_id")
        checked["tool_call_id"] = message["tool_call_id"]
    if isinstance(message.get("name"), str) and message["name"]:
        checked["name"] = message["name"]
    if isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            image = kind == "image_url" and role == "user" and isinstance(part.get("image_url"), dict) \
                and isinstance(part["image_url"].get("url"), str)
            if not (kind == "text" and isinstance(part.get("text"), str)) and not image:
                raise params.ParamError(f"{at}.content: parts must be text (or, in a user's message, "
                                        "image_url).", param=f"{at}.content")
        if all(p["type"] == "text" for p in content):
            content = "".join(p["text"] for p in content)
    elif not isinstance(content, str):
        raise params.ParamError(f"{at}.content must be text.", param=f"{at}.content")
    texts = [content] if isinstance(content, str) else [p.get("text") or p["image_url"]["url"] for p in content]
    if any("\x00" in text for text in texts):  # as chat.services.message_enqueue: no database stores it alike
        raise RequestError("bad_content", f"{at}.content contains a NUL character (\\u0000).",
                           param=f"{at}.content")
    checked["content"] = content
    return checked


def _tool_calls(calls, at: str) -> list[dict]:
    if not isinstance(calls, list):
        raise params.ParamError(f"{at}.tool_calls must be a list.", param=f"{at}.tool_calls")
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments", ""), (str, dict)):
            raise params.ParamError(f"{at}.tool_calls: each needs a function with a name and arguments.",
                                    param=f"{at}.tool_calls")
    return calls


def _rich(message: dict) -> bool:
    return bool(message.get("tool_calls") or message["role"] == "tool" or "name" in message
                or isinstance(message["content"], list))


def _shown(message: dict) -> str:
    """The text kept in the conversation for a message (its images and tool
    calls are in the reply's params)."""
    text = params.text_of(message["content"])
    if isinstance(message["content"], list) and any(p["type"] == "image_url" for p in message["content"]):
        text = (text + " [image]").strip()
    return text or ("[tool call]" if message.get("tool_calls") else "")


def _plain_roles(message: dict) -> dict:
    return {**message, "role": ROLES.get(message["role"], message["role"])}


def completion_admissible(*, user, request: ChatRequest, priority: int | None = None) -> ModelChoice:
    """Check a request before anything is stored, and resolve its model
    (`services.message_admissible`); RequestError names what is wrong."""
    try:
        choice = services.message_admissible(user=user, model=request.model, content=request.content,
                                             priority=priority)
        params.options_check(request.options, kind=choice.kind, messages=request.messages)
    except services.ChatInputError as exc:
        raise _request_error(exc) from exc
    except params.ParamError as exc:
        raise RequestError(exc.code, exc.detail, param=exc.param) from exc
    return choice


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
                                            priority=priority, choice=choice, knowledge=request.knowledge,
                                            params=request.params())
    except services.ChatInputError as exc:
        raise _request_error(exc) from exc


def _request_error(exc: "services.ChatInputError") -> RequestError:
    param = {"unknown_model": "model", "model_disabled": "model", "not_a_chat_model": "model",
             "unknown_knowledge": "knowledge",
             "knowledge_not_ready": "knowledge", "bad_frame": "knowledge"}.get(exc.code, "messages")
    return RequestError(exc.code, exc.detail, param=param)


def completions_enqueue(*, user, request: ChatRequest, subscribe: Callable[[int], None]) -> list[Message]:
    """`completion_enqueue` once per choice asked for (`n`): each choice is
    a reply of its own, in a conversation of its own (a choice must not see
    its siblings as history), generated as any reply is; the answer gathers
    them (`completion_object`). The model is resolved and checked once."""
    choice = completion_admissible(user=user, request=request)
    replies = [completion_enqueue(user=user, request=request, subscribe=subscribe, choice=choice)]
    for _ in range(request.n - 1):
        # Each further choice counts against the rate limit like a message.
        completion_admissible(user=user, request=request)
        replies.append(completion_enqueue(user=user, request=request, subscribe=subscribe, choice=choice))
    return replies


def completion_object(replies: Message | list[Message]) -> dict:
    """Finished replies (the choices of one request) as OpenAI's `chat.completion`."""
    replies = replies if isinstance(replies, list) else [replies]
    first = replies[0]
    usages = [reply.usage() for reply in replies]
    return {
        "id": completion_id(first.pk),
        "object": "chat.completion",
        "created": int((first.queued_at or first.finished_at).timestamp()),
        "model": first.model_name,
        "choices": [{
            "index": index,
            "message": reply_message(reply),
            "logprobs": None,
            "finish_reason": finish_reason(reply.finish_reason),
        } for index, reply in enumerate(replies)],
        "usage": {key: sum(u[key] for u in usages) for key in usages[0]},
        # Ours, with `knowledge`: the passages given to the model (CONTRACT §8's chat.sources).
        **({"sources": first.sources or []} if first.knowledge else {}),
    }


def reply_message(reply: Message) -> dict:
    """A reply as OpenAI's assistant message: its text, or its tool calls
    (and null content when it has no text beside them)."""
    if reply.tool_calls:
        return {"role": "assistant", "content": reply.content or None, "refusal": None,
                "tool_calls": reply.tool_calls}
    return {"role": "assistant", "content": reply.content, "refusal": None}


def completion_id(message_id: int) -> str:
    return f"chatcmpl-{message_id}"


def finish_reason(reason: str) -> str:
    # "cancelled" is ours (Stop); OpenAI's clients know stop, length,
    # tool_calls and content_filter (an upstream's).
    return reason if reason in ("length", "tool_calls", "content_filter") else "stop"
