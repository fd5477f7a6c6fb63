"""`/v1/models` and `/v1/chat/completions`.

A completion is a chat message like any other: `completion_enqueue` stores
it and queues the same Celery tasks as the websocket, and the view listens
on the reply's channel-layer group (`msg.<id>`), subscribed after the commit
and before the dispatch, exactly as the websocket consumer does. Streaming
turns `chat.delta` frames into `chat.completion.chunk` events; without
streaming the view waits for the reply's one `chat.done` or `chat.error`.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse

from chat import services
from chat.api.http import api_view, error_response, json_body
from chat.catalog import catalog_list
from chat.completions import (
    RequestError, chat_request_parse, completion_id, completion_object, completions_enqueue, error_body,
    finish_reason,
)
from chat.embeddings import embedding_models
from chat.models import Message, MessageStatus
from chat.relay import message_group

END_EVENTS = ("chat.done", "chat.error")


def _model_object(name: str, kind: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": kind}


@api_view("GET")
def models_list(request: HttpRequest) -> JsonResponse:
    choices, _errors = catalog_list()
    created = int(time.time())
    # The local embedding engines too (/v1/embeddings), though the chat's catalog leaves them out.
    models = [(c.name, c.kind) for c in choices] + [(name, "local") for name in embedding_models()]
    return JsonResponse({"object": "list", "data": [_model_object(name, kind, created) for name, kind in models]})


@api_view("GET")
def model_retrieve(request: HttpRequest, model_id: str) -> JsonResponse:
    choices, _errors = catalog_list()
    for choice in choices:
        if choice.name == model_id:
            return JsonResponse(_model_object(choice.name, choice.kind, int(time.time())))
    if model_id in embedding_models():
        return JsonResponse(_model_object(model_id, "local", int(time.time())))
    raise RequestError("model_not_found", f"The model '{model_id}' does not exist", param="model")


class ReplyListener:
    """The frames of one request's replies (one per choice), read from the
    channel layer in an async view.

    A reader task moves frames from the layer into a local queue, so that
    waiting with a timeout never cancels the layer's own receive (which
    would drop what it had buffered for this channel).
    """

    def __init__(self) -> None:
        self.layer = get_channel_layer()
        self.channel = ""
        self.message_ids: list[int] = []
        self._frames: asyncio.Queue = asyncio.Queue()
        self._reader: asyncio.Task | None = None

    async def open(self) -> None:
        self.channel = await self.layer.new_channel()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            self._frames.put_nowait(await self.layer.receive(self.channel))

    def subscribe(self, message_id: int) -> None:
        """message_enqueue's `subscribe`: runs in the enqueueing thread after
        the commit, before the task is queued."""
        self.message_ids.append(message_id)
        self.layer.group_add_blocking(message_group(message_id), self.channel)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        for message_id in self.message_ids:
            await self.layer.group_discard(message_group(message_id), self.channel)

    async def frames(self) -> AsyncIterator[dict]:
        """Frames of the replies until each has ended (or one failed). When
        nothing has come for a while, the database is asked: an end frame
        lost on the way (the layer drops silently at capacity) must not hang
        the request. After API_REPLY_TIMEOUT a `timeout` error ends it."""
        deadline = time.monotonic() + settings.API_REPLY_TIMEOUT
        ended: set[int] = set()
        while True:
            wait = min(settings.API_IDLE_CHECK_SECONDS, deadline - time.monotonic())
            try:
                found = [await asyncio.wait_for(self._frames.get(), timeout=max(wait, 0))]
            except asyncio.TimeoutError:
                waiting = [m for m in self.message_ids if m not in ended]
                found = await sync_to_async(_ends_from_database)(waiting)
                if not found and time.monotonic() >= deadline:
                    found = [{"type": "chat.error", "message": waiting[0], "code": "timeout",
                              "detail": f"No reply within {settings.API_REPLY_TIMEOUT:.0f} seconds."}]
            for frame in found:
                if frame.get("message") in ended:
                    continue  # its end came from the database already
                yield frame
                if frame["type"] == "chat.error":
                    return
                if frame["type"] in END_EVENTS:
                    ended.add(frame["message"])
                    if len(ended) == len(self.message_ids):
                        return


def _ends_from_database(message_ids: list[int]) -> list[dict]:
    frames = []
    for reply in Message.objects.filter(pk__in=message_ids):
        if not reply.is_finished:
            continue
        if reply.status == MessageStatus.ERROR:
            frames.append({"type": "chat.error", "message": reply.pk, "code": reply.error_code,
                           "detail": reply.error_detail, "from_database": True})
        else:
            frames.append({"type": "chat.done", "message": reply.pk, "finish_reason": reply.finish_reason,
                           "usage": reply.usage(), "tool_calls": reply.tool_calls, "from_database": True})
    return frames


def _cancel_unfinished(user, message_ids: list[int]) -> None:
    """The client went away, or a sibling choice failed: stop generating
    what nobody will read."""
    for message_id in message_ids:
        try:
            services.message_cancel(user=user, message_id=message_id)
        except services.ChatInputError:
            pass  # it has ended already


async def _failed(user, message_ids: list[int], frame: dict) -> JsonResponse:
    """The HTTP error for a reply's `chat.error`. The request's other
    choices, and a reply that timed out (ours, not the reply's: it still
    runs), are stopped: nobody will read them."""
    await sync_to_async(_cancel_unfinished)(user, message_ids)
    code, detail = frame.get("code") or "internal_error", frame.get("detail") or "The reply failed."
    return error_response(RequestError(code, detail))


@api_view("POST")
async def chat_completions(request: HttpRequest):
    chat = chat_request_parse(json_body(request))
    listener = ReplyListener()
    await listener.open()
    handed_over = False
    try:
        try:
            replies = await sync_to_async(completions_enqueue)(user=request.user, request=chat,
                                                               subscribe=listener.subscribe)
        except RequestError:
            # A later choice was refused (the rate limit): the earlier ones go too.
            await sync_to_async(_cancel_unfinished)(request.user, listener.message_ids)
            raise
        frames = listener.frames()
        if chat.stream:
            # Wait for the first frame with text (or an end) before answering:
            # a reply that fails before its first token gets a real HTTP status.
            first, sources = await _first_content_frame(frames)
            if first["type"] == "chat.error":
                return await _failed(request.user, listener.message_ids, first)
            handed_over = True
            response = StreamingHttpResponse(
                _sse(request.user, listener, frames, first, replies, include_usage=chat.include_usage,
                     sources=sources),
                content_type="text/event-stream")
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"  # nginx: pass events through at once
            return response
        async for frame in frames:
            if frame["type"] == "chat.error":
                return await _failed(request.user, listener.message_ids, frame)
        finished = [await Message.objects.aget(pk=reply.pk) for reply in replies]
        return JsonResponse(completion_object(finished))
    except asyncio.CancelledError:
        await sync_to_async(_cancel_unfinished)(request.user, listener.message_ids)
        raise
    finally:
        if not handed_over:
            await listener.close()


async def _first_content_frame(frames: AsyncIterator[dict]) -> tuple[dict, list | None]:
    """The first frame with text (or an end), and the reply's sources when
    a `chat.sources` frame came before it."""
    sources = None
    async for frame in frames:
        if frame["type"] == "chat.sources":
            sources = sources if sources is not None else frame["sources"]
        elif frame["type"] == "chat.delta" or frame["type"] in END_EVENTS:
            return frame, sources
    raise RuntimeError("the frames ended without an end frame")  # frames() always ends with one


async def _sse(user, listener: ReplyListener, frames: AsyncIterator[dict], first: dict, replies: list[Message], *,
               include_usage: bool, sources: list | None = None) -> AsyncIterator[str]:
    """`chat.completion.chunk` events in OpenAI's order: each choice's role,
    its text (tagged with the choice's index), its tool calls, its finish
    reason; then the usage (when asked for) and `[DONE]`. A
    knowledge-assisted reply's sources ride on the first chunk (`sources`,
    an extra field that clients ignore unless they look for it)."""
    head = replies[0]
    base = {"id": completion_id(head.pk), "object": "chat.completion.chunk",
            "created": int(head.queued_at.timestamp()), "model": head.model_name, "system_fingerprint": None}
    index = {reply.pk: i for i, reply in enumerate(replies)}

    def event(choices: list, **extra) -> str:
        return f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n"

    def delta(message_id: int, content: dict, reason: str | None = None) -> list:
        return [{"index": index[message_id], "delta": content, "logprobs": None, "finish_reason": reason}]

    sent = {reply.pk: "" for reply in replies}
    usages: list[dict] = []
    try:
        for reply in replies:
            extra = {"sources": sources} if sources is not None and reply is head else {}
            yield event(delta(reply.pk, {"role": "assistant", "content": ""}), **extra)
        pending = [first]
        while pending or len(usages) < len(replies):
            frame = pending.pop() if pending else await anext(frames)
            message_id = frame.get("message")
            if frame["type"] == "chat.delta":
                sent[message_id] += frame["text"]
                yield event(delta(message_id, {"content": frame["text"]}))
            elif frame["type"] == "chat.error":
                error = error_body(frame.get("code") or "internal_error", frame.get("detail", ""))
                yield f"data: {json.dumps(error)}\n\n"
                break
            elif frame["type"] == "chat.done":
                if frame.get("from_database"):
                    # Frames were lost on the way: send what the database has beyond them.
                    content = (await Message.objects.aget(pk=message_id)).content
                    if content.startswith(sent[message_id]) and len(content) > len(sent[message_id]):
                        yield event(delta(message_id, {"content": content[len(sent[message_id]):]}))
                if frame.get("tool_calls"):
                    calls = [{"index": i, **call} for i, call in enumerate(frame["tool_calls"])]
                    yield event(delta(message_id, {"tool_calls": calls}))
                usages.append(frame.get("usage") or {})
                reason = finish_reason(frame.get("finish_reason", ""))
                last = len(usages) == len(replies)
                usage = {key: sum(u.get(key, 0) for u in usages) for key in usages[0]} if last else None
                if include_usage or not last:
                    yield event(delta(message_id, {}, reason))
                    if last:
                        yield event([], usage=usage)
                else:
                    yield event(delta(message_id, {}, reason), usage=usage)
        yield "data: [DONE]\n\n"
    finally:
        if len(usages) < len(replies):
            # Ended early (an error, or the client went away): stop the rest.
            await sync_to_async(_cancel_unfinished)(user, listener.message_ids)
        await listener.close()
