"""Frames from worker code to the sockets, through the channel layer.

Workers are synchronous (the GPU worker's solo pool, the CPU workers'
gevent pool): they send with the layer's blocking group send
(chatsite/channel_layer.py `group_send_blocking`), which needs no event
loop and cooperates with gevent's sockets.
"""
from __future__ import annotations

import time
import weakref

from channels.layers import get_channel_layer
from django.conf import settings
from redis.exceptions import ConnectionError as RedisConnectionError

from chatsite.channel_layer import FRAMES_TYPE

#: Frames that end a reply: never dropped at the channel layer's capacity
#: (chatsite/channel_layer.py `group_send_blocking`), whatever the backlog.
END_TYPES = frozenset({"chat.done", "chat.error"})
#: Tries of one send when the connection fails (see `group_send`), and the
#: pause before the second (doubled before the third): a private Redis
#: restarts in ~0.1 s.
SEND_ATTEMPTS = 3
SEND_RETRY_PAUSE = 0.1


def message_group(message_id: int) -> str:
    return f"msg.{message_id}"


def group_send(group: str, *events: dict) -> None:
    """Send events to a group, in order, as one message (several go as one
    FRAMES_TYPE pack, handed to each receiver one by one), and return once
    Redis has them, so frames of one sender arrive in the order they were sent.

    A reply's end is added past the channel's capacity: a web process far
    behind may drop deltas (the page then shows a gap in `seq`), but never
    the end a socket waits for.

    A connection error is retried: after Redis restarts, the first command
    on a connection pooled before the restart fails ("Connection closed by
    server"); redis-py reconnects it (docs/reliability.md). A command that
    failed on a dead connection never reached the new server, so the retry
    does not send the frame twice.
    """
    event = events[0] if len(events) == 1 else {"type": FRAMES_TYPE, "frames": list(events)}
    ends = any(e["type"] in END_TYPES for e in events)
    layer = get_channel_layer()
    for attempt in range(1, SEND_ATTEMPTS + 1):
        try:
            layer.group_send_blocking(group, event, past_capacity=ends)
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

    #: The relays of this process still in use (a CPU worker's streams).
    _open: "weakref.WeakSet[DeltaRelay]" = weakref.WeakSet()

    def __init__(self, message_id: int, *, on_flush=None):
        self.message_id = message_id
        self.group = message_group(message_id)
        self.seq = 0
        self.text = ""  # everything flushed so far
        self._buffer: list[str] = []
        self._next_flush = 0.0  # time.monotonic(); the first piece goes at once
        self._on_flush = on_flush
        DeltaRelay._open.add(self)

    @staticmethod
    def interval() -> float:
        """Seconds between two flushes of one stream: CHAT_DELTA_FLUSH_SECONDS,
        stretched so that all the streams of this process together send at
        most its share of CHAT_FRAMES_PER_SECOND (one of
        CPU_WORKER_PROCESSES): hundreds of streams, each a frame per
        token, would flood the channel layer and the sockets' web process
        (docs/BENCHMARKS.md, "Concurrent streams"). The text is the same;
        it comes in fewer, larger pieces."""
        share = settings.CHAT_FRAMES_PER_SECOND / settings.CPU_WORKER_PROCESSES
        return max(settings.CHAT_DELTA_FLUSH_SECONDS, len(DeltaRelay._open) / share)

    def push(self, text: str) -> None:
        if not text:
            return
        self._buffer.append(text)
        if time.monotonic() >= self._next_flush:
            self.flush()

    def take(self) -> list[dict]:
        """The pending text as a `chat.delta` frame (none when nothing is
        pending), counted as flushed: the caller sends it, before anything
        else for this message."""
        if not self._buffer:
            return []
        piece = "".join(self._buffer)
        self._buffer.clear()
        frame = {"type": "chat.delta", "message": self.message_id, "seq": self.seq, "text": piece}
        self.seq += 1
        self.text += piece
        # The interval is taken per flush, not per token: counting the
        # process's open relays for every token showed in the profile.
        self._next_flush = time.monotonic() + self.interval()
        if self._on_flush:
            self._on_flush(self)
        return [frame]

    def flush(self) -> None:
        frames = self.take()
        if frames:
            group_send(self.group, *frames)

    def send(self, event_type: str, **payload) -> None:
        """Any other frame for this message, after the pending text (in the
        same group send)."""
        group_send(self.group, *self.take(), {"type": event_type, "message": self.message_id, **payload})
