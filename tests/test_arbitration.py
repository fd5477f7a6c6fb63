"""GPU arbitration under concurrency, crashes and failures, through the real
workers (issue 3). Residency is recorded on both sides with time.time(): the
GPU manager's events (a local model is resident from the start of its
local_load to the end of its local_unload) and the fake Ollama's own log
(from the request that loaded a model until /api/ps stopped listing it, and
each generation from request to last byte)."""
import asyncio
import math
import time

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings

from chat.catalog import catalog_list
from chat.models import Message, MessageStatus, ModelConfig
from gpu_manager.state import GpuStateStore
from tests.support.sockets import communicator, ends, frames_until, send_and_finish
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


def store() -> GpuStateStore:
    return GpuStateStore(slot=settings.GPU_SLOT)


def local_intervals(events: list[dict], *, resident_at_start: bool) -> list[tuple[float, float]]:
    intervals, start = [], (-math.inf if resident_at_start else None)
    for event in events:
        if event["kind"] == "local_load" and start is None:
            start = event["at"] - event["seconds"]
        elif event["kind"] == "local_unload" and start is not None:
            intervals.append((start, event["at"]))
            start = None
    if start is not None:
        intervals.append((start, math.inf))
    return intervals


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


async def test_twenty_clients_interleaving_never_overlap_local_and_ollama(ws_headers, demo_model, workers, stack):
    await ModelConfig.objects.filter(pk=demo_model.pk).aupdate(max_new_tokens=8)
    stack.ollama.token_delay = 0.002
    stack.ollama.reply = "A short answer from Ollama, in a few tokens."
    resident_at_start = "local_demo" in store().read().local_models
    mark = len(store().events(1000))
    stack.ollama.clear()
    ends_seen: list[str] = []

    async def client(i: int) -> None:
        comm = communicator(ws_headers)
        assert (await comm.connect())[0]
        for j in range(10):
            model = "local_demo" if (i + j) % 2 else "ollama_qwen:7b"
            _, frames = await send_and_finish(comm, model=model, content=f"client {i} message {j}", timeout=300)
            ends_seen.append(frames[-1]["type"])
        await comm.disconnect()

    await asyncio.gather(*(client(i) for i in range(20)))

    # None lost: 200 accepted messages, 200 ends, all of them replies.
    assert len(ends_seen) == 200 and set(ends_seen) == {"chat.done"}, ends_seen
    assert await Message.objects.filter(role="assistant").exclude(status=MessageStatus.DONE).acount() == 0
    # I1: no local residency overlaps an Ollama residency or generation.
    events = store().events(1000)[mark:]
    local = local_intervals(events, resident_at_start=resident_at_start)
    ollama = [(r[1], r[2] if r[2] is not None else math.inf) for r in stack.ollama.residency]
    generations = stack.ollama.generations
    assert local and ollama and len(generations) == 100
    clashes = [(a, b) for a in local for b in ollama + generations if overlaps(a, b)]
    assert not clashes, clashes[:5]


async def test_killed_cpu_worker_stops_holding_the_gpu_when_its_lease_expires(ws_headers, demo_model, workers,
                                                                             stack):
    await ModelConfig.objects.filter(pk=demo_model.pk).aupdate(max_new_tokens=8)
    stack.ollama.reply = " ".join(["slow"] * 2000)
    stack.ollama.token_delay = 0.01
    comm = communicator(ws_headers)
    await comm.connect()
    await comm.send_json_to({"type": "chat.send", "model": "ollama_qwen:7b", "content": "talk a lot",
                             "client_id": "ollama"})
    streaming = (await frames_until(comm, lambda f: f["type"] == "chat.accepted"))[-1]["message"]
    await frames_until(comm, lambda f: f["type"] == "chat.delta" and f["message"] == streaming)
    try:
        await sync_to_async(workers.kill)("cpu")
        started = time.monotonic()
        _, frames = await send_and_finish(comm, model="local_demo", content="my turn", timeout=60)
        waited = time.monotonic() - started
        assert frames[-1]["type"] == "chat.done", frames
        # Served within the lease time plus a margin (reaping is polled, the
        # switch itself takes a fraction of a second).
        assert waited < settings.GPU_LEASE_TTL + 5, waited
        # The reply whose worker died ended with a clear error, not silence.
        lost = await Message.objects.aget(pk=streaming)
        assert lost.status == MessageStatus.ERROR and lost.error_code == "worker_lost"
    finally:
        await sync_to_async(workers.start)("cpu")
    await comm.disconnect()


async def test_killed_gpu_worker_is_repaired_and_its_reply_ends(ws_headers, demo_model, workers):
    await ModelConfig.objects.filter(pk=demo_model.pk).aupdate(max_new_tokens=4000)
    comm = communicator(ws_headers)
    await comm.connect()
    await comm.send_json_to({"type": "chat.send", "model": "local_demo", "content": "a long one",
                             "client_id": "long"})
    message = (await frames_until(comm, lambda f: f["type"] == "chat.accepted"))[-1]["message"]
    await frames_until(comm, lambda f: f["type"] == "chat.delta" and f["message"] == message)
    await sync_to_async(workers.kill)("gpu")
    assert store().read().local_models == ["local_demo"]  # stale: its process is gone
    await sync_to_async(workers.start)("gpu")
    final = (await frames_until(comm, ends(message), timeout=30))[-1]
    assert final["type"] == "chat.error" and final["code"] == "worker_restarted", final
    state = store().read()
    assert state.local_models == [] and state.owner == "none"
    await ModelConfig.objects.filter(pk=demo_model.pk).aupdate(max_new_tokens=8)
    _, frames = await send_and_finish(comm, model="local_demo", content="again")
    assert frames[-1]["type"] == "chat.done"
    await comm.disconnect()


async def test_ollama_down_keeps_the_local_model_and_says_so(ws_headers, demo_model, workers, stack):
    await ModelConfig.objects.filter(pk=demo_model.pk).aupdate(max_new_tokens=8)
    comm = communicator(ws_headers)
    await comm.connect()
    await send_and_finish(comm, model="local_demo", content="load it")
    state = store().read()
    await sync_to_async(catalog_list)()  # the picker still offers the Ollama model (cached)
    stack.ollama.stop()
    try:
        _, frames = await send_and_finish(comm, model="ollama_qwen:7b", content="hello?")
    finally:
        stack.ollama.start()
    assert frames[-1]["type"] == "chat.error" and frames[-1]["code"] == "endpoint_unavailable", frames
    assert "does not answer" in frames[-1]["detail"]
    after = store().read()
    assert after.local_models == ["local_demo"] and after.owner == "local" and after.epoch == state.epoch
    await comm.disconnect()


async def test_an_idle_model_is_unloaded_by_the_gpu_worker(ws_headers, demo_model, workers):
    await ModelConfig.objects.filter(pk=demo_model.pk).aupdate(max_new_tokens=8, keep_alive=1)
    comm = communicator(ws_headers)
    await comm.connect()
    await send_and_finish(comm, model="local_demo", content="use it once")
    await comm.disconnect()
    await sync_to_async(wait_for)(lambda: store().read().local_models == [], timeout=20, what="idle unload")
    unload = [e for e in store().events(20) if e["kind"] == "local_unload"][-1]
    assert unload["model"] == "local_demo" and unload["reason"] == "idle" and unload["survivors"] == {}
    assert store().read().owner == "none"

