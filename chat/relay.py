"""Frames from worker code to the sockets, through the channel layer.

Workers are synchronous. `async_to_sync` per call would build an event loop
and Redis connections each time (channels_redis #125, #332); instead each
process keeps one event loop in a daemon thread and submits sends to it.
"""
from __future__ import annotations

import asyncio
import threading
import time

from channels.layers import get_channel_layer
from django.conf import settings
from redis.exceptions import ConnectionError as RedisConnectionError

#: Seconds to wait for Redis to take a frame before the task fails loudly.
SEND_TIMEOUT = 10.0
#: Tries of one send when the connection fails (see `group_send`), and the
#: pause before the second (doubled before the third): a private Redis
#: restarts in ~0.1 s.
SEND_ATTEMPTS = 3
SEND_RETRY_PAUSE = 0.1


def message_group(message_id: int) -> str:
    return f"msg.{message_id}"


_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _layer_loop() -> asyncio.AbstractEventLoop:
    # The CPU worker's threads race to the first send: the lock makes sure
    # they share one loop (and one set of Redis connections).
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="channel-layer", daemon=True).start()
        return _loop


def group_send(group: str, event: dict) -> None:
    """Send one event and wait until Redis has it, so frames of one sender
    arrive in the order they were sent.

    A connection error is retried: after Redis restarts, every connection
    pooled before the restart fails on its first use ("Connection closed by
    server": redis-py's asyncio pool hands it out unchecked and
    channels_redis sets no retry), which would fail the reply being
    streamed (docs/reliability.md). redis-py reconnects the failed connection
    and the pool hands it out again next (last in, first out). A command
    that failed on a dead connection never reached the new server, so the
    retry does not send the frame twice.
    """
    layer = get_channel_layer()
    for attempt in range(1, SEND_ATTEMPTS + 1):
        try:
            asyncio.run_coroutine_threadsafe(layer.group_send(group, event), _layer_loop()).result(SEND_TIMEOUT)
            return
        except RedisConnectionError:
            if attempt == SEND_ATTEMPTS:
                raise
            time.sleep(SEND_RETRY_PAUSE * attempt)


class DeltaRelay:
    """Coalesces generated text into `chat.delta` frames, one every
    CHAT_DELTA_FLUSH_SECONDS at most, numbered by `seq` from 0 without gaps.

    The first piece goes out at once (time to first token matters most);
    later pieces wait in a buffer until the interval has passed or the
    reply ends. Everything pushed is sent, in order: `flush()` before any
    other frame for the same message.
    """

    def __init__(self, message_id: int, *, on_flush=None):
        self.message_id = message_id
        self.group = message_group(message_id)
        self.seq = 0
        self.text = ""  # everything flushed so far
        self._buffer: list[str] = []
        self._last_flush = 0.0
        self._on_flush = on_flush
        self._interval = settings.CHAT_DELTA_FLUSH_SECONDS

    def push(self, text: str) -> None:
        if not text:
            return
        self._buffer.append(text)
        if time.monotonic() - self._last_flush >= self._interval:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        piece = "".join(self._buffer)
        self._buffer.clear()
        group_send(self.group, {"type": "chat.delta", "message": self.message_id, "seq": self.seq, "text": piece})
        self.seq += 1
        self.text += piece
        self._last_flush = time.monotonic()
        if self._on_flush:
            self._on_flush(self)

    def send(self, event_type: str, **payload) -> None:
        """Any other frame for this message, after the pending text."""
        self.flush()
        group_send(self.group, {"type": event_type, "message": self.message_id, **payload})
