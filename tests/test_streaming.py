"""Streaming through the real workers: deltas are coalesced, complete and in
order, and Stop ends a local generation on the solo GPU worker."""
import pytest

from chat.models import Message, ModelConfig
from tests.support.sockets import communicator, send_and_finish

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


async def test_deltas_are_coalesced_without_loss_or_reordering(ws_headers, demo_model, workers, stack):
    tokens = [f"t{i} " for i in range(300)]
    stack.ollama.reply = "".join(tokens)
    stack.ollama.token_delay = 0.002
    comm = communicator(ws_headers)
    await comm.connect()
    _, frames = await send_and_finish(comm, model="ollama_qwen:7b", content="count")
    deltas = [f for f in frames if f["type"] == "chat.delta"]
    assert frames[-1]["type"] == "chat.done"
    assert [d["seq"] for d in deltas] == list(range(len(deltas)))
    assert "".join(d["text"] for d in deltas) == stack.ollama.reply
    # 300 tokens over >= 0.6 s at one frame per ~40 ms: far fewer frames
    # than tokens (one group_send per token would be 300).
    assert 2 <= len(deltas) <= len(tokens) // 5, len(deltas)
    await comm.disconnect()


async def test_stop_ends_a_local_generation(ws_headers, demo_model, workers):
    await ModelConfig.objects.filter(pk=demo_model.pk).aupdate(max_new_tokens=4000)
    comm = communicator(ws_headers)
    await comm.connect()
    await comm.send_json_to({"type": "chat.send", "model": "local_demo", "content": "go on", "client_id": "x"})
    accepted = await comm.receive_json_from(timeout=10)
    while (await comm.receive_json_from(timeout=60))["type"] != "chat.delta":
        pass
    await comm.send_json_to({"type": "chat.cancel", "message": accepted["message"]})
    while (frame := await comm.receive_json_from(timeout=60))["type"] not in ("chat.done", "chat.error"):
        pass
    assert frame["type"] == "chat.done" and frame["finish_reason"] == "cancelled", frame
    assert 0 < frame["usage"]["completion_tokens"] < 4000
    reply = await Message.objects.aget(pk=accepted["message"])
    assert reply.status == "cancelled" and reply.content
    # The worker is free again at once: the next message is answered.
    await ModelConfig.objects.filter(pk=demo_model.pk).aupdate(max_new_tokens=8)
    _, frames = await send_and_finish(comm, model="local_demo", content="short")
    assert frames[-1]["type"] == "chat.done"
    await comm.disconnect()
