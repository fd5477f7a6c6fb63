"""`POST /v1/embeddings` (issue 16) over the embedding service
(chat/embeddings.py): the request is checked here, run by a worker, and its
answer comes back on the channel layer, to a channel of this view's own
subscribed to the request's group; no thread waits for it."""
from __future__ import annotations

import asyncio

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.http import HttpRequest, JsonResponse

from chat.api.http import api_view, json_body
from chat.completions import RequestError
from chat.embeddings import embedding_answer, embedding_body, embedding_group, embedding_request_parse, embedding_submit


@api_view("POST")
async def embeddings(request: HttpRequest) -> JsonResponse:
    parsed = embedding_request_parse(json_body(request))
    layer = get_channel_layer()
    group, channel = embedding_group(), await layer.new_channel()
    # Subscribed before the task is queued: the answer can come at once.
    await layer.group_add(group, channel)
    try:
        await sync_to_async(embedding_submit)(user=request.user, request=parsed, reply_to={"group": group})
        try:
            # One message ends the wait, so a receive cancelled by the
            # timeout loses nothing anyone would read.
            event = await asyncio.wait_for(layer.receive(channel), timeout=settings.API_REPLY_TIMEOUT)
        except asyncio.TimeoutError:
            raise RequestError("timeout", f"No embeddings within {settings.API_REPLY_TIMEOUT:.0f} seconds.") from None
    finally:
        await layer.group_discard(group, channel)
    vectors = embedding_answer(event)
    # A large answer (2,048 vectors as JSON floats) takes a noticeable time
    # to encode: off the event loop, which serves every other request.
    return await sync_to_async(lambda: JsonResponse(embedding_body(parsed, vectors)), thread_sensitive=False)()
