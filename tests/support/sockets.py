"""Chat sockets: the in-process one (channels' WebsocketCommunicator against
the ASGI application) and, through the same `receive`/`frames_until`, a
`websockets` client of a real web process (tests/support/web.py).

Every communicator is registered here, so that the autouse fixture
`sockets_closed` (tests/conftest.py) disconnects, on the test's own event
loop, whatever its test left open (`sockets_disconnect`).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time

from channels.testing import WebsocketCommunicator

# Every socket an async test opens, so that its teardown closes what the test left open.
_SOCKETS: list[WebsocketCommunicator] = []


def session_cookie(user) -> str:
    """The value of a `sessionid` cookie of a logged-in session of `user`."""
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


def communicator(headers: list[tuple[bytes, bytes]]) -> WebsocketCommunicator:
    """An in-process chat socket with `headers` (cookie, Origin), registered
    for `sockets_disconnect`."""
    from chatsite.asgi import application

    comm = WebsocketCommunicator(application, "/ws/chat/", headers=headers)
    _SOCKETS.append(comm)
    return comm


def sockets_forget() -> None:
    _SOCKETS.clear()


async def sockets_disconnect() -> None:
    """Disconnect every registered socket still open, as a server would, and
    fail if a consumer goes on receiving after its disconnect."""
    from channels.layers import get_channel_layer

    while _SOCKETS:
        comm = _SOCKETS.pop()
        if not comm.future.done():
            # What the application raises as it ends is its test's business.
            with contextlib.suppress(Exception):
                await comm.disconnect(timeout=5)
    layer = get_channel_layer()
    if layer.receive_count:
        layer.receive_count, layer.receive_lock, layer.receive_event_loop = 0, None, None
        raise AssertionError("a consumer went on receiving after its socket was disconnected")


async def receive(conn, *, timeout: float) -> dict:
    """One JSON frame from a communicator or a `websockets` connection;
    asyncio.TimeoutError (TimeoutError) after `timeout` seconds."""
    if isinstance(conn, WebsocketCommunicator):
        return json.loads(await conn.receive_from(timeout=timeout))
    return json.loads(await asyncio.wait_for(conn.recv(), timeout))


async def frames_until(conn, done, *, timeout: float = 60.0) -> list[dict]:
    """Receive frames until `done(frame)` is true for one; return them all."""
    frames = []
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise AssertionError(f"no final frame within {timeout} s; got {frames}")
        frames.append(await receive(conn, timeout=remaining))
        if done(frames[-1]):
            return frames


def ends(message_id: int):
    """A `done` for frames_until: the reply's chat.done or chat.error."""
    return lambda f: f.get("type") in ("chat.done", "chat.error") and f.get("message") == message_id


async def send_and_finish(comm, *, model: str, content: str, conversation=None, timeout: float = 60.0,
                          **extra):
    """Send one chat message (with `extra` fields, e.g. knowledge=[…]);
    return (accepted frame, every later frame up to its end)."""
    await comm.send_json_to({"type": "chat.send", "model": model, "content": content,
                             "conversation": conversation, "client_id": f"c-{time.monotonic_ns()}", **extra})
    accepted = (await frames_until(comm, lambda f: f["type"] in ("chat.accepted", "chat.error"), timeout=timeout))[-1]
    assert accepted["type"] == "chat.accepted", accepted
    frames = await frames_until(comm, ends(accepted["message"]), timeout=timeout)
    return accepted, frames
