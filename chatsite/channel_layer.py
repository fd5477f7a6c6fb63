"""The Redis channel layer, with a `receive()` that a disconnect always ends.

On Python 3.11, `asyncio.wait_for` drops a cancellation that arrives just as
the call it waits for completes (CPython gh-86296, fixed in 3.12), and
redis-py sends every command inside one (`Connection.send_packed_command`).
A consumer that disconnects while channels_redis's `receive()` is sending its
BZPOPMIN therefore loses the cancellation (redis-py #2028): the receive goes
on blocking 5 s at a time for ever, holding a pooled connection, the ASGI
application never returns, and the layer keeps counting a receiver. A socket
closed at once (no session, a foreign Origin) hits that window nearly every
time: `tests/test_channel_layer.py`.

So the receive runs as its own task, and a cancellation is passed on to it
until it has ended.
"""
import asyncio
import contextlib

from channels_redis import core

# How long to wait for the receive to end before cancelling it again: a
# dropped cancellation is noticed within this, a kept one ends at once.
RECANCEL_AFTER_SECONDS = 0.05


class RedisChannelLayer(core.RedisChannelLayer):
    async def receive(self, channel):
        inner = asyncio.ensure_future(super().receive(channel))
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            while not inner.done():
                inner.cancel()
                # Our own cancellation is raised below, once the receive has ended.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({inner}, timeout=RECANCEL_AFTER_SECONDS)
            if not inner.cancelled():
                # Ended another way as we cancelled: a message the consumer,
                # leaving, would not have read, or an error; retrieved, so
                # that asyncio does not log it as never retrieved.
                inner.exception()
            raise
