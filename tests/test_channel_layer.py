"""The channel layer's receive() ends when it is cancelled, wherever in its
Redis round trip the cancellation lands (chatsite/channel_layer.py), on the
project's layer and the test session's Redis."""
import asyncio

import pytest
from channels.layers import get_channel_layer

from tests.support.sockets import communicator

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

# Loop iterations after which receive() is cancelled: from before its first
# Redis command to well into its blocking BZPOPMIN (on this machine, its
# BZPOPMIN is being sent around the 9th).
CANCEL_POINTS = range(40)


async def test_a_cancelled_receive_ends_wherever_it_is_cancelled():
    layer = get_channel_layer()
    stuck = []
    for steps in CANCEL_POINTS:
        receive = asyncio.ensure_future(layer.receive(await layer.new_channel()))
        for _ in range(steps):
            await asyncio.sleep(0)
        receive.cancel()
        done, _ = await asyncio.wait({receive}, timeout=3)
        if not done:
            stuck.append(steps)
    assert not stuck, f"receive() went on after being cancelled {len(stuck)} steps in: {stuck}"
    assert layer.receive_count == 0


async def test_a_socket_closed_at_once_and_disconnected_ends_its_application():
    """A socket without a session is closed (4401) as it connects; the
    server's disconnect then ends the application, whose channel-layer
    receive was just starting."""
    for _ in range(10):
        comm = communicator([(b"origin", b"http://localhost")])
        assert (await comm.connect())[0]
        assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}
        await comm.send_input({"type": "websocket.disconnect", "code": 1000})
        done, _ = await asyncio.wait({comm.future}, timeout=3)
        assert done, "the application went on after its socket was disconnected"
    assert get_channel_layer().receive_count == 0


# --- blocking sends, frame packs and the backup queue (issue 14) -----------------

async def _received(layer, channel: str, count: int) -> list[dict]:
    return [await asyncio.wait_for(layer.receive(channel), timeout=5) for _ in range(count)]


async def test_a_blocking_group_send_reaches_every_member_as_channels_own_does():
    """Members added either way, on one process-specific key (one socket
    process), each get the message once, with channels_redis's own format."""
    from asgiref.sync import sync_to_async

    layer = get_channel_layer()
    first, second = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("blocking.test", first)
    await sync_to_async(layer.group_add_blocking)("blocking.test", second)
    await sync_to_async(layer.group_send_blocking)("blocking.test", {"type": "chat.delta", "text": "å", "seq": 0})
    await layer.group_send("blocking.test", {"type": "chat.delta", "text": "b", "seq": 1})
    for channel in (first, second):
        assert await _received(layer, channel, 2) == [{"type": "chat.delta", "text": "å", "seq": 0},
                                                      {"type": "chat.delta", "text": "b", "seq": 1}]
    await layer.group_discard("blocking.test", first)
    await sync_to_async(layer.group_send_blocking)("blocking.test", {"type": "chat.done"})
    assert await _received(layer, second, 1) == [{"type": "chat.done"}]
    with pytest.raises(asyncio.TimeoutError):  # the member that left gets nothing
        await asyncio.wait_for(layer.receive(first), timeout=0.3)
    await layer.group_discard("blocking.test", second)


async def test_a_frame_pack_is_received_as_its_frames_in_order():
    from asgiref.sync import sync_to_async

    from chat.relay import group_send

    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add("pack.test", channel)
    frames = [{"type": "chat.delta", "seq": 0, "text": "a"}, {"type": "chat.delta", "seq": 1, "text": "b"},
              {"type": "chat.done"}]
    await sync_to_async(group_send)("pack.test", *frames)
    await sync_to_async(group_send)("pack.test", {"type": "chat.delta", "seq": 2})
    assert await _received(layer, channel, 4) == [*frames, {"type": "chat.delta", "seq": 2}]
    await layer.group_discard("pack.test", channel)


async def test_a_receive_cancelled_after_the_backup_shortcut_still_gets_what_the_backup_holds():
    """While this process knows a channel's backup queue is empty, a
    receive skips channels_redis's clean-up script; a cancelled receive
    ends that knowledge, so what a cancelled pop left in the backup is put
    back and received by the next receive, not lost."""
    import time

    layer = get_channel_layer()
    key = layer.prefix + "backup.test"
    await layer.send("backup.test", {"type": "chat.delta", "seq": 0})
    assert await _received(layer, "backup.test", 1) == [{"type": "chat.delta", "seq": 0}]
    await asyncio.wait_for(asyncio.gather(*layer.receive_cleaners), timeout=5)
    assert key in layer._backup_empty, "the shortcut is not in use: this test would show nothing"

    pending = asyncio.ensure_future(layer.receive("backup.test"))
    async with asyncio.timeout(5):  # the pop has begun: the mark is dropped until it comes through
        while key in layer._backup_empty:
            await asyncio.sleep(0.001)
    pending.cancel()
    await asyncio.wait({pending}, timeout=5)
    assert key not in layer._backup_empty
    # What a pop cancelled between BZPOPMIN and its hand-out leaves behind.
    await layer.connection(0).zadd(layer._backup_channel_name(key),
                                   {layer.serialize({"type": "chat.delta", "seq": 1}): time.time()})
    assert await _received(layer, "backup.test", 1) == [{"type": "chat.delta", "seq": 1}]


async def test_a_replys_end_is_delivered_past_the_channels_capacity():
    """A web process far behind (its channel key at capacity) loses deltas
    to the capacity, never the end its socket waits for."""
    from asgiref.sync import sync_to_async

    from chat.relay import group_send

    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add("full.test", channel)
    capacity, layer.capacity = layer.capacity, 3
    try:
        for seq in range(5):
            await sync_to_async(group_send)("full.test", {"type": "chat.delta", "seq": seq})
        await sync_to_async(group_send)("full.test", {"type": "chat.delta", "seq": 5}, {"type": "chat.done"})
    finally:
        layer.capacity = capacity
    assert await _received(layer, channel, 4) == [
        {"type": "chat.delta", "seq": 0}, {"type": "chat.delta", "seq": 1}, {"type": "chat.delta", "seq": 2},
        {"type": "chat.delta", "seq": 5}]
    assert await _received(layer, channel, 1) == [{"type": "chat.done"}]
    await layer.group_discard("full.test", channel)
