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

The layer also carries the sends of synchronous worker code
(`group_send_blocking`) and packs of several frames (FRAMES_TYPE): see the
class.
"""
import asyncio
import collections
import contextlib
import functools
import logging
import time

import redis
from channels_redis import core

from chatsite.redis_client import blocking_pool
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

#: A group message whose "frames" are several messages, handed to the
#: receiver one by one in order (chat/relay.py sends a reply's last text
#: and its end together).
FRAMES_TYPE = "chat.frames"

# How long to wait for the receive to end before cancelling it again: a
# dropped cancellation is noticed within this, a kept one ends at once.
RECANCEL_AFTER_SECONDS = 0.05


class RedisChannelLayer(core.RedisChannelLayer):
    """channels_redis's layer with three changes, each for a measured cost
    (docs/BENCHMARKS.md, "Redis commands per message"):

    - `receive()` always ends on a disconnect (above);
    - a group message of type FRAMES_TYPE carries several frames, handed to
      the receiver one by one, so that a reply's last text and its end cost
      one group send instead of two (chat/relay.py);
    - a receive skips the clean-up script while this process knows the
      channel's backup queue to be empty (3 of the 6 commands per frame).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: Frames of a FRAMES_TYPE message not yet handed out, per channel.
        self._unpacked: dict[str, collections.deque] = {}
        #: Channel keys whose backup queue this process emptied itself.
        self._backup_empty: set[str] = set()

    async def receive(self, channel):
        pending = self._unpacked.get(channel)
        if pending:
            message = pending.popleft()
            if not pending:
                del self._unpacked[channel]
            return message
        inner = asyncio.ensure_future(super().receive(channel))
        try:
            message = await asyncio.shield(inner)
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
        if message.get("type") != FRAMES_TYPE:
            return message
        frames = collections.deque(message["frames"])
        first = frames.popleft()
        if frames:
            self._unpacked[channel] = frames
        return first

    # --- the receive's backup queue -------------------------------------------------
    # channels_redis moves each popped message to a backup queue until it has
    # been handed out, and before every pop runs a script that puts back
    # whatever a cancelled receive left there. Only this process uses its
    # channels' backups: once its own clean-up has emptied one, and until a
    # pop is cancelled or fails, the script has nothing to do.

    async def _brpop_with_clean(self, index, channel, timeout):
        if channel not in self._backup_empty:
            member = await super()._brpop_with_clean(index, channel, timeout)
        else:
            self._backup_empty.discard(channel)  # until this pop has come through
            connection = self.connection(index)
            result = await connection.bzpopmin(channel, timeout=timeout)
            if result is None:
                member = None
            else:
                _, member, timestamp = result
                await connection.zadd(self._backup_channel_name(channel), {member: float(timestamp)})
        if member is None:  # nothing popped, nothing backed up
            self._backup_empty.add(channel)
        return member

    async def _clean_receive_backup(self, index, channel):
        await super()._clean_receive_backup(index, channel)
        self._backup_empty.add(channel)

    # --- sends from synchronous code --------------------------------------------------

    @functools.cached_property
    def _blocking(self) -> "BlockingSender":
        return BlockingSender(self)

    def group_send_blocking(self, group: str, message: dict, *, past_capacity: bool = False) -> None:
        """`group_send` for synchronous code (the workers, under threads or
        gevent): the same keys and wire format, over a blocking redis-py
        client, in two round trips and five commands for a group of one
        socket (channels_redis's takes nine, and an event loop).
        `past_capacity`: added even to a channel at its capacity (a reply's
        end: dropped, its socket would wait for it forever)."""
        self._blocking.send(group, message, past_capacity=past_capacity)

    def group_add_blocking(self, group: str, channel: str) -> None:
        """`group_add` for synchronous code (a subscription made in the
        enqueueing thread, chat/consumers.py): no hop back to the event loop."""
        self._blocking.add(group, channel)


class BlockingSender:
    """channels_redis's group_send, blocking: the group's members are read
    (ZRANGE, expired ones removed only when there are any), the message is
    built for each channel key by channels_redis's own code
    (`_map_channel_keys_to_connection`: serializer, `__asgi_channel__`,
    capacity) and added by one script. One Redis host only (the layer's
    sharding across hosts is not used here)."""

    # Per channel key: add the message unless the channel is at capacity
    # (expired messages are removed first, only then), and push its expiry.
    # A capacity of 0: added whatever the channel holds (no count taken).
    SCRIPT = """
        local n = #KEYS
        local now, expiry, stale = ARGV[2 * n + 1], ARGV[2 * n + 2], ARGV[2 * n + 3]
        local over = 0
        for i = 1, n do
            local capacity = tonumber(ARGV[n + i])
            local count = 0
            if capacity > 0 then
                count = redis.call('ZCARD', KEYS[i])
                if count >= capacity then
                    redis.call('ZREMRANGEBYSCORE', KEYS[i], 0, stale)
                    count = redis.call('ZCARD', KEYS[i])
                end
            end
            if capacity == 0 or count < capacity then
                redis.call('ZADD', KEYS[i], now, ARGV[i])
                redis.call('EXPIRE', KEYS[i], expiry)
            else
                over = over + 1
            end
        end
        return over
    """

    def __init__(self, layer: RedisChannelLayer):
        if layer.ring_size != 1:
            raise ValueError("blocking group sends support one Redis host")
        host = dict(layer.hosts[0])
        address = host.pop("address")
        host.pop("retry", None)  # an asyncio Retry; the blocking one is below
        host.pop("max_connections", None)  # the blocking pool's own (REDIS_POOL_MAX)
        self.layer = layer
        self.client = redis.Redis(connection_pool=blocking_pool(
            address, **host, retry=Retry(NoBackoff(), 1), retry_on_error=[redis.ConnectionError]))
        self.script = self.client.register_script(self.SCRIPT)

    def add(self, group: str, channel: str) -> None:
        """channels_redis's group_add: the member, scored by when it joined,
        and the group's expiry, in one round trip."""
        layer = self.layer
        assert layer.require_valid_group_name(group), "Group name not valid"
        assert layer.require_valid_channel_name(channel), "Channel name not valid"
        key = layer._group_key(group)
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(key, {channel: time.time()})
        pipe.expire(key, layer.group_expiry)
        pipe.execute()

    def send(self, group: str, message: dict, *, past_capacity: bool = False) -> None:
        layer = self.layer
        assert layer.require_valid_group_name(group), "Group name not valid"
        key = layer._group_key(group)
        now = time.time()
        members = self.client.zrange(key, 0, -1, withscores=True)
        cutoff = int(now) - layer.group_expiry
        channels = [name.decode() for name, joined in members if joined > cutoff]
        if len(channels) < len(members):
            self.client.zremrangebyscore(key, min=0, max=cutoff)
        if not channels:
            return
        by_connection, messages, capacities = layer._map_channel_keys_to_connection(channels, message)
        keys = by_connection[0]
        if past_capacity:
            capacities = {k: 0 for k in keys}  # no limit (SCRIPT)
        over = self.script(keys=keys, args=[*(messages[k] for k in keys), *(capacities[k] for k in keys),
                                            now, layer.expiry, int(now) - int(layer.expiry)])
        if over:
            log.info("%s of %s channels over capacity in group %s", over, len(channels), group)
