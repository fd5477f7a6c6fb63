"""The websocket consumer through WebsocketCommunicator, on the real ASGI
application (session auth, origin check), the Redis channel layer and real
workers."""
import asyncio
import json

import pytest

from chat.models import Message
from tests.support.sockets import communicator, send_and_finish

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


async def test_anonymous_socket_is_closed_with_4401(transactional_db):
    comm = communicator([(b"origin", b"http://localhost")])
    connected, _ = await comm.connect()
    assert connected
    closed = await comm.receive_output(timeout=5)
    assert closed == {"type": "websocket.close", "code": 4401}


async def test_foreign_origin_is_refused(ws_headers):
    headers = [h for h in ws_headers if h[0] != b"origin"] + [(b"origin", b"http://evil.example")]
    connected, _ = await communicator(headers).connect()
    assert not connected


@pytest.mark.parametrize(
    "raw, code",
    [
        ("not json", "bad_frame"),
        ("[1, 2]", "bad_frame"),
        ('{"type": "chat.fly"}', "unknown_type"),
        ('{"type": "chat.send", "model": "local_demo", "content": 5}', "bad_frame"),
        ('{"type": "chat.send", "model": "local_demo", "content": "   "}', "empty_content"),
        ('{"type": "chat.send", "model": "no_such_model", "content": "hi"}', "unknown_model"),
        ('{"type": "chat.send", "model": "ollama_missing:1b", "content": "hi"}', "unknown_model"),
        ('{"type": "chat.send", "model": "local_demo", "content": "hi", "conversation": "x"}', "bad_frame"),
        ('{"type": "chat.send", "model": "local_demo", "content": "hi", "conversation": 999}', "unknown_conversation"),
        ('{"type": "chat.cancel", "message": "7"}', "bad_frame"),
        ('{"type": "chat.cancel", "message": 424242}', "unknown_message"),
    ],
)
async def test_bad_frames_get_chat_error_and_store_nothing(ws_headers, demo_model, raw, code):
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    await comm.send_to(text_data=raw)
    frame = json.loads(await comm.receive_from(timeout=10))
    assert frame["type"] == "chat.error" and frame["code"] == code and frame["message"] is None
    assert frame["detail"]
    # The socket stays open and usable: a second bad frame gets its answer too.
    await comm.send_to(text_data="{}")
    assert json.loads(await comm.receive_from(timeout=10))["code"] == "unknown_type"
    assert await Message.objects.acount() == 0
    await comm.disconnect()


async def test_too_long_message_is_refused(ws_headers, demo_model, settings):
    settings.CHAT_MAX_CONTENT_CHARS = 10
    comm = communicator(ws_headers)
    await comm.connect()
    await comm.send_json_to({"type": "chat.send", "model": "local_demo", "content": "x" * 11, "client_id": "a"})
    frame = await comm.receive_json_from(timeout=10)
    assert frame["code"] == "content_too_long"
    await comm.disconnect()


async def test_local_demo_streams_to_done(ws_headers, demo_model, workers):
    comm = communicator(ws_headers)
    await comm.connect()
    accepted, frames = await send_and_finish(comm, model="local_demo", content="Tell me a story")
    deltas = [f for f in frames if f["type"] == "chat.delta"]
    done = frames[-1]
    assert done["type"] == "chat.done", frames
    assert done["finish_reason"] in ("stop", "length")
    assert [d["seq"] for d in deltas] == list(range(len(deltas)))
    assert deltas, "the reply streamed no text"
    assert done["usage"]["completion_tokens"] > 0
    reply = await Message.objects.aget(pk=accepted["message"])
    assert reply.status == "done"
    assert reply.content == "".join(d["text"] for d in deltas)
    assert reply.started_at and reply.first_token_at and reply.finished_at
    assert reply.queued_at <= reply.started_at <= reply.first_token_at <= reply.finished_at
    await comm.disconnect()


async def test_cancel_stops_a_long_generation(ws_headers, demo_model, workers, stack):
    stack.ollama.reply = " ".join(["word"] * 400)
    stack.ollama.token_delay = 0.01
    comm = communicator(ws_headers)
    await comm.connect()
    await comm.send_json_to({"type": "chat.send", "model": "ollama_qwen:7b", "content": "long please",
                             "client_id": "x"})
    accepted = await comm.receive_json_from(timeout=10)
    while (frame := await comm.receive_json_from(timeout=30))["type"] != "chat.delta":
        pass
    await comm.send_json_to({"type": "chat.cancel", "message": accepted["message"]})
    while (frame := await comm.receive_json_from(timeout=30))["type"] not in ("chat.done", "chat.error"):
        pass
    assert frame["type"] == "chat.done" and frame["finish_reason"] == "cancelled"
    reply = await Message.objects.aget(pk=accepted["message"])
    assert reply.status == "cancelled"
    assert len(reply.content) < len(stack.ollama.reply)
    await comm.disconnect()


async def test_idle_socket_outlives_the_channel_layer_blocking_read(ws_headers, demo_model, workers):
    """Regression: redis-py 8's default 5 s socket timeout equals
    channels_redis's 5 s BZPOPMIN, and killed every socket idle for ~5 s.
    Idling is the behaviour under test, so this waits on purpose."""
    comm = communicator(ws_headers)
    await comm.connect()
    await asyncio.sleep(12)
    _, frames = await send_and_finish(comm, model="ollama_qwen:7b", content="still there?")
    assert frames[-1]["type"] == "chat.done"
    await comm.disconnect()
