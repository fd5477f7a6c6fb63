"""Several GPUs: one GPU worker per slot, each on its own queue, tested with
two workers on cpu devices (issue 8)."""
import pytest
from asgiref.sync import sync_to_async

from chat.models import Message, ModelConfig
from gpu_manager.state import GpuStateStore
from tests.support.sockets import communicator, send_and_finish

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


async def test_two_local_models_are_served_in_parallel_by_two_slots(ws_headers, demo_model, workers,
                                                                     async_client, user):
    await ModelConfig.objects.filter(pk=demo_model.pk).aupdate(max_new_tokens=600)
    await ModelConfig.objects.acreate(kind="local", name="local_demo_b", path=demo_model.path, temperature=0,
                                      max_new_tokens=600)
    await sync_to_async(workers.start)("gpu1")
    try:
        marks = {slot: len(GpuStateStore(slot=slot).events(1000)) for slot in ("0", "1")}
        first, second = communicator(ws_headers), communicator(ws_headers)
        await first.connect()
        await second.connect()
        # The first reply is streaming before the second is sent: the second
        # must go to the idle slot, not queue behind it or evict its model.
        await first.send_json_to({"type": "chat.send", "model": "local_demo", "content": "a", "client_id": "a"})
        a = await first.receive_json_from(timeout=30)
        while (await first.receive_json_from(timeout=60))["type"] != "chat.delta":
            pass
        _, frames = await send_and_finish(second, model="local_demo_b", content="b", timeout=120)
        assert frames[-1]["type"] == "chat.done"
        while (frame := await first.receive_json_from(timeout=120))["type"] not in ("chat.done", "chat.error"):
            pass
        assert frame["type"] == "chat.done"
        reply_a = await Message.objects.aget(pk=a["message"])
        reply_b = await Message.objects.aget(pk=frames[-1]["message"])
        assert reply_b.started_at < reply_a.finished_at, "the second reply waited for the first"

        states = {slot: GpuStateStore(slot=slot).read() for slot in ("0", "1")}
        assert {tuple(s.local_models) for s in states.values()} == {("local_demo",), ("local_demo_b",)}
        for slot, mark in marks.items():
            unloads = [e for e in GpuStateStore(slot=slot).events(1000)[mark:] if e["kind"] == "local_unload"]
            assert unloads == [], (slot, unloads)

        await sync_to_async(async_client.force_login)(user)
        status = (await async_client.get("/api/gpu/")).json()
        listed = {s["slot"]: s for s in status["slots"]}
        assert listed["0"]["local_models"] and listed["1"]["local_models"]
        await first.disconnect()
        await second.disconnect()
    finally:
        await sync_to_async(workers.stop)("gpu1")
    # A worker that stops cleanly leaves a state that holds nothing.
    assert GpuStateStore(slot="1").read().local_models == []
