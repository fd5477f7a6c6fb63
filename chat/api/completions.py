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
    RequestError, chat_request_parse, completion_enqueue, completion_id, completion_object, error_body,
    finish_reason,
)
from chat.models import Message, MessageStatus
from chat.relay import message_group

END_EVENTS = ("chat.done", "chat.error")


def _model_object(name: str, kind: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": kind}


@api_view("GET")
def models_list(request: HttpRequest) -> JsonResponse:
    choices, _errors = catalog_list()
    created = int(time.time())
    return JsonResponse({"object": "list", "data": [_model_object(c.name, c.kind, created) for c in choices]})


@api_view("GET")
def model_retrieve(request: HttpRequest, model_id: str) -> JsonResponse:
    choices, _errors = catalog_list()
    for choice in choices:
        if choice.name == model_id:
            return JsonResponse(_model_object(choice.name, choice.kind, int(time.time())))
    raise RequestError("model_not_found", f"The model '{model_id}' does not exist", param="model")


class ReplyListener:
    """One reply's frames, read from the channel layer in an async view.

    A reader task moves frames from the layer into a local queue, so that
    waiting with a timeout never cancels the layer's own receive (which
    would drop what it had buffered for this channel).
    """

    def __init__(self) -> None:
        self.layer = get_channel_layer()
        self.channel = ""
        self.message_id: int | None = None
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
        self.message_id = message_id
        self.layer.group_add_blocking(message_group(message_id), self.channel)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.message_id is not None:
            await self.layer.group_discard(message_group(self.message_id), self.channel)

    async def frames(self) -> AsyncIterator[dict]:
        """Frames of the reply up to and including its end. When nothing has
        come for a while, the database is asked: an end frame lost on the
        way (the layer drops silently at capacity) must not hang the
        request. After API_REPLY_TIMEOUT a `timeout` error ends it."""
        deadline = time.monotonic() + settings.API_REPLY_TIMEOUT
        while True:
            wait = min(settings.API_IDLE_CHECK_SECONDS, deadline - time.monotonic())
            try:
                frame = await asyncio.wait_for(self._frames.get(), timeout=max(wait, 0))
            except asyncio.TimeoutError:
                frame = await sync_to_async(_end_from_database)(self.message_id)
                if frame is None and time.monotonic() >= deadline:
                    frame = {"type": "chat.error", "message": self.message_id, "code": "timeout",
                             "detail": f"No reply within {settings.API_REPLY_TIMEOUT:.0f} seconds."}
                if frame is None:
                    continue
            yield frame
            if frame["type"] in END_EVENTS:
                return


def _end_from_database(message_id: int) -> dict | None:
    reply = Message.objects.filter(pk=message_id).first()
    if reply is None or not reply.is_finished:
        return None
    if reply.status == MessageStatus.ERROR:
        return {"type": "chat.error", "message": message_id, "code": reply.error_code, "detail": reply.error_detail,
                "from_database": True}
    return {"type": "chat.done", "message": message_id, "finish_reason": reply.finish_reason,
            "usage": reply.usage(), "from_database": True}


def _cancel_unfinished(user, message_id: int | None) -> None:
    """The client went away: stop generating what nobody will read."""
    if message_id is None:
        return
    try:
        services.message_cancel(user=user, message_id=message_id)
    except services.ChatInputError:
        pass  # it has ended already


async def _failed(user, message_id: int, frame: dict) -> JsonResponse:
    """The HTTP error for a reply's `chat.error`. A timeout is ours, not the
    reply's: that reply is still running, and nobody will read it."""
    if frame["code"] == "timeout":
        await sync_to_async(_cancel_unfinished)(user, message_id)
    code, detail = frame.get("code") or "internal_error", frame.get("detail") or "The reply failed."
    return error_response(RequestError(code, detail))


@api_view("POST")
async def chat_completions(request: HttpRequest):
    chat = chat_request_parse(json_body(request))
    listener = ReplyListener()
    await listener.open()
    handed_over = False
    try:
        reply = await sync_to_async(completion_enqueue)(user=request.user, request=chat,
                                                        subscribe=listener.subscribe)
        frames = listener.frames()
        if chat.stream:
            # Wait for the first frame with text (or the end) before answering:
            # a reply that fails before its first token gets a real HTTP status.
            first, sources = await _first_content_frame(frames)
            if first["type"] == "chat.error":
                return await _failed(request.user, reply.pk, first)
            handed_over = True
            response = StreamingHttpResponse(
                _sse(request.user, listener, frames, first, reply, include_usage=chat.include_usage,
                     sources=sources),
                content_type="text/event-stream")
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"  # nginx: pass events through at once
            return response
        end = None
        async for frame in frames:
            end = frame
        if end["type"] == "chat.error":
            return await _failed(request.user, reply.pk, end)
        finished = await Message.objects.aget(pk=reply.pk)
        return JsonResponse(completion_object(finished))
    except asyncio.CancelledError:
        await sync_to_async(_cancel_unfinished)(request.user, listener.message_id)
        raise
    finally:
        if not handed_over:
            await listener.close()


async def _first_content_frame(frames: AsyncIterator[dict]) -> tuple[dict, list | None]:
    """The first frame with text (or the end), and the reply's sources when
    a `chat.sources` frame came before it."""
    sources = None
    async for frame in frames:
        if frame["type"] == "chat.sources":
            sources = frame["sources"]
        elif frame["type"] == "chat.delta" or frame["type"] in END_EVENTS:
            return frame, sources
    raise RuntimeError("the frames ended without an end frame")  # frames() always ends with one


async def _sse(user, listener: ReplyListener, frames: AsyncIterator[dict], first: dict, reply: Message, *,
               include_usage: bool, sources: list | None = None) -> AsyncIterator[str]:
    """`chat.completion.chunk` events in OpenAI's order: the role, the text,
    the finish reason, the usage (when asked for), then `[DONE]`. A
    knowledge-assisted reply's sources ride on the first chunk (`sources`,
    an extra field that clients ignore unless they look for it)."""
    base = {"id": completion_id(reply.pk), "object": "chat.completion.chunk",
            "created": int(reply.queued_at.timestamp()), "model": reply.model_name, "system_fingerprint": None}

    def event(choices: list, **extra) -> str:
        return f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n"

    def delta(content: dict, reason: str | None = None) -> list:
        return [{"index": 0, "delta": content, "logprobs": None, "finish_reason": reason}]

    sent = ""
    finished = False
    try:
        extra = {"sources": sources} if sources is not None else {}
        yield event(delta({"role": "assistant", "content": ""}), **extra)
        frame = first
        while True:
            if frame["type"] == "chat.delta":
                sent += frame["text"]
                yield event(delta({"content": frame["text"]}))
            elif frame["type"] == "chat.error":
                finished = frame.get("code") != "timeout"  # a reply still running is stopped below
                error = error_body(frame.get("code") or "internal_error", frame.get("detail", ""))
                yield f"data: {json.dumps(error)}\n\n"
                break
            elif frame["type"] == "chat.done":
                finished = True
                if frame.get("from_database"):
                    # Frames were lost on the way: send what the database has beyond them.
                    content = (await Message.objects.aget(pk=reply.pk)).content
                    if content.startswith(sent) and len(content) > len(sent):
                        yield event(delta({"content": content[len(sent):]}))
                usage = frame.get("usage")
                if include_usage:
                    yield event(delta({}, finish_reason(frame.get("finish_reason", ""))))
                    yield event([], usage=usage)
                else:
                    yield event(delta({}, finish_reason(frame.get("finish_reason", ""))), usage=usage)
                break
            frame = await anext(frames)
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            await sync_to_async(_cancel_unfinished)(user, listener.message_id)
        await listener.close()
