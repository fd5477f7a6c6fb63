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
