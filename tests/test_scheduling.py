"""The switch-aware GPU scheduler (issue 13) through the real workers: the
gate bounds how long one owner's stream can keep the GPU from the other,
each owner is served in arrival order, a killed GPU worker or a restarted
Redis loses and repeats nothing, `fifo` still keeps I1, `gpu_busy` refuses
at once, a mixed burst costs one switch, and an Ollama message while Ollama
owns the GPU takes no GPU-queue hop.

The workers run with the suite's settings (GPU_SCHEDULE=grouped, the
default gate); the gate age A is read from the scheduler's snapshot, as
/api/gpu/ shows it, since it grows with the switch cost measured so far.
Admission runs in this process (the consumers of the in-process sockets),
the picks in the GPU worker: where a test changes a scheduler setting it
changes both.

Times compared here come from several processes on one machine, all
`time.time()`: the replies' timestamps (queued in this process, started
by the worker that picks them), the GPU worker's events and the fake
Ollama's request log.
"""
import asyncio
import contextlib
import time
from datetime import datetime, timezone

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import override_settings

from chat.models import FINISHED_STATUSES, Message, MessageStatus, ModelConfig
from chatsite import queues
from chatsite.celery import app
from chatsite.queues import gpu_queue
from chatsite.redis_client import redis_client
from gpu_manager.scheduler import slot_scheduler
from gpu_manager.state import GpuStateStore
from tests import test_arbitration as arbitration
from tests.support.sockets import communicator, ends, frames_until, send_and_finish
from tests.support.waiting import eventually

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

LOCAL = "local_demo"
OLLAMA = "ollama_qwen:7b"
#: Tokens of a local reply in the streams below: a few tenths of a second
#: on this machine (the demo model writes ~1500 a second unloaded), well
#: above a sender's round trip, so that a closed loop of two senders keeps
#: a local message waiting at every pick.
STREAM_TOKENS = 60
#: Tokens of a local reply that holds the GPU worker while a test queues
#: work behind it (cancelled once it is queued).
BLOCKER_TOKENS = 50000
#: Seconds between two admissions or picks that this machine may add to a
#: bound: a socket frame, a task delivery, a few Redis and database writes,
#: with other test runs sharing the two cores.
SLACK = 3.0
#: How long a test waits for a whole scenario to end.
SCENARIO_TIMEOUT = 120.0


def store() -> GpuStateStore:
    return GpuStateStore(slot=settings.GPU_SLOT)


def scheduler():
    return slot_scheduler(settings.GPU_SLOT)


def gate_age() -> float:
    return scheduler().snapshot()["gate"]["age_seconds"]


async def tokens(demo_model, n: int) -> None:
    await ModelConfig.objects.filter(pk=demo_model.pk).aupdate(max_new_tokens=n)


async def connected(ws_headers):
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    return comm


async def send(comm, *, model: str, content: str) -> int:
    """Send one message and return its reply's id once it is accepted."""
    await comm.send_json_to({"type": "chat.send", "model": model, "content": content, "client_id": content})
    accepted = (await frames_until(comm, lambda f: f["type"] in ("chat.accepted", "chat.error")))[-1]
    assert accepted["type"] == "chat.accepted", accepted
    return accepted["message"]


async def blocker_start(comm, demo_model) -> int:
    """A long local reply that keeps the GPU worker busy (the GPU is the
    local model's) until `blocker_stop`; later local replies are short."""
    await tokens(demo_model, BLOCKER_TOKENS)
    message = await send(comm, model=LOCAL, content="blocker")
    await frames_until(comm, lambda f: f["type"] == "chat.delta" and f["message"] == message)
    await tokens(demo_model, 8)
    return message


async def blocker_stop(comm, message: int) -> None:
    await comm.send_json_to({"type": "chat.cancel", "message": message})


async def until_ended(comm, ids) -> list[dict]:
    """The socket's frames until each of `ids` has ended."""
    left = set(ids)

    def done(frame: dict) -> bool:
        if frame.get("type") in ("chat.done", "chat.error"):
            left.discard(frame.get("message"))
        return not left

    return await frames_until(comm, done, timeout=SCENARIO_TIMEOUT)


def end_frames(frames: list[dict], ids) -> dict[int, list[dict]]:
    return {pk: [f for f in frames if f.get("type") in ("chat.done", "chat.error") and f.get("message") == pk]
            for pk in ids}


def local_served() -> int:
    """Local generations the GPU worker completed (it feeds each one's
    seconds to the scheduler, which counts them)."""
    return int(redis_client().hget(scheduler().sched_key, "serve:local:count") or 0)


async def prompt_of(reply: Message) -> str:
    """The user's message a reply answers (the one just before it)."""
    return (await Message.objects.filter(conversation_id=reply.conversation_id, pk__lt=reply.pk)
            .order_by("-pk").afirst()).content


async def replies(ids) -> dict[int, Message]:
    return {m.pk: m async for m in Message.objects.filter(pk__in=list(ids))}


def chats_by_content(stack) -> dict[str, list[float]]:
    """The fake Ollama's generations: the user's message -> when each request came."""
    seen: dict[str, list[float]] = {}
    for request in stack.ollama.requests_to("/api/chat"):
        if request.body and request.body.get("messages"):
            seen.setdefault(request.body["messages"][-1]["content"], []).append(request.at)
    return seen


def owner_changes(since: float) -> list[dict]:
    return [e for e in store().events(1000) if e["at"] > since and e["kind"] == "owner_change"]


class GpuLog:
    """The GPU worker's log from now on: Celery writes one line
    `Task <name>[<id>] received` for each task the worker takes."""

    def __init__(self, workers):
        self.path = workers.var / "gpu.log"
        self.offset = self.path.stat().st_size

    def tasks_received(self) -> list[str]:
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            lines = log.read().decode(errors="replace").splitlines()
        return [line for line in lines if "Task workers.tasks.gpu_" in line and "] received" in line]


async def closed_loop(ws_headers, *, model: str, name: str, stop: asyncio.Event, sent: list[int]) -> None:
    """One user who sends the next message as soon as the last reply ends."""
    comm = await connected(ws_headers)
    n = 0
    while not stop.is_set():
        accepted, frames = await send_and_finish(comm, model=model, content=f"{name} {n}", timeout=SCENARIO_TIMEOUT)
        sent.append(accepted["message"])
        assert frames[-1]["type"] == "chat.done", frames[-1]
        n += 1
    await comm.disconnect()


@contextlib.asynccontextmanager
async def closed_loops(ws_headers, *, model: str, users: int):
    """`users` closed-loop users of `model` for the block; the ids of their
    replies, which have all ended when the block exits."""
    stop, sent = asyncio.Event(), []
    loops = [asyncio.create_task(closed_loop(ws_headers, model=model, name=f"{model} user {i}", stop=stop, sent=sent))
             for i in range(users)]
    try:
        yield sent
    finally:
        stop.set()
        await asyncio.gather(*loops)


# --- the gate ------------------------------------------------------------------

async def test_an_ollama_message_amid_a_local_stream_starts_within_the_gate(ws_headers, demo_model, workers, stack):
    """Two local users keep a local message waiting at every pick, so the
    local visit never runs dry. The Ollama message must still start once it
    has waited A: the gate closes, only the local work that arrived before
    it is served (at most one reply per user: the one generating and the
    one waiting), then the GPU switches once."""
    await tokens(demo_model, STREAM_TOKENS)
    comm = await connected(ws_headers)
    await send_and_finish(comm, model=LOCAL, content="make the local model the owner")
    async with closed_loops(ws_headers, model=LOCAL, users=2) as local:
        await eventually(lambda: scheduler().snapshot()["waiting"]["local"] >= 1 and len(local) >= 2,
                         timeout=SCENARIO_TIMEOUT, what="a continuous local stream")
        age = gate_age()
        ollama = await send(comm, model=OLLAMA, content="amid the local stream")
        # A broken gate starves it for as long as the stream goes on.
        final = (await frames_until(comm, ends(ollama), timeout=age + SCENARIO_TIMEOUT / 2))[-1]
        assert final["type"] == "chat.done", final
    got = await replies([ollama, *local])
    mine = got.pop(ollama)
    arrived, picked = mine.queued_at.timestamp(), mine.started_at.timestamp()
    generation = max((m.finished_at - m.started_at).total_seconds() for m in got.values())
    # No local message that arrived after the gate closed was picked before it.
    gate_closed = arrived + age
    late = [m.pk for m in got.values() if m.queued_at.timestamp() > gate_closed + SLACK / 3
            and m.started_at < mine.started_at]
    assert not late, (late, age)
    # The bound: A, then the local replies admitted before the gate closed
    # (one per user), then the switch and its generation.
    assert picked - arrived <= age + 2 * generation + SLACK, (picked - arrived, age, generation)
    (chat_at,) = chats_by_content(stack)["amid the local stream"]
    assert chat_at - arrived <= age + 2 * generation + 2 * SLACK, (chat_at - arrived, age, generation)


async def test_no_ollama_lease_is_granted_after_the_gate_closes(ws_headers, demo_model, workers, stack):
    """Two Ollama users keep Ollama's visit going (each new message would
    take its lease at admission while the gate is open). Once a local
    message has waited A, no Ollama message that came after that starts
    before the local model is loaded."""
    await tokens(demo_model, 8)
    stack.ollama.reply = " ".join(f"w{i}" for i in range(30))
    stack.ollama.token_delay = 0.02
    comm = await connected(ws_headers)
    await send_and_finish(comm, model=OLLAMA, content="make Ollama the owner")
    async with closed_loops(ws_headers, model=OLLAMA, users=2) as ollama:
        await eventually(lambda: len(ollama) >= 2, timeout=SCENARIO_TIMEOUT, what="a continuous Ollama stream")
        age = gate_age()
        local = await send(comm, model=LOCAL, content="amid the Ollama stream")
        final = (await frames_until(comm, ends(local), timeout=age + SCENARIO_TIMEOUT / 2))[-1]
        assert final["type"] == "chat.done", final
        # The loops go on until one of their messages came after the gate.
        gate_closed = (await Message.objects.aget(pk=local)).queued_at.timestamp() + age
        after = datetime.fromtimestamp(gate_closed + SLACK / 3, tz=timezone.utc)
        await eventually(lambda: Message.objects.filter(pk__in=list(ollama), queued_at__gt=after).exists(),
                         timeout=SCENARIO_TIMEOUT, what="an Ollama message after the gate closed")
    load = next(e for e in store().events(1000) if e["kind"] == "local_load" and e["at"] > gate_closed - age)
    load_started = load["at"] - load["seconds"]
    chats = chats_by_content(stack)
    after_gate = [m for m in (await replies(ollama)).values() if m.queued_at > after]
    assert after_gate
    early = [(m.pk, at - load_started) for m in after_gate for at in chats[await prompt_of(m)] if at < load_started]
    assert not early, early


# --- order -----------------------------------------------------------------------

async def test_each_owner_is_served_in_arrival_order(ws_headers, demo_model, workers, stack):
    """Ollama messages queued behind a local reply, then local messages
    queued behind Ollama's generations: each owner's messages are picked
    (their `started_at`, written by the one GPU worker as it picks them) in
    the order they were sent. Not the order of Ollama's requests: the CPU
    worker's threads may reorder two generations queued milliseconds apart."""
    comm = await connected(ws_headers)
    blocker = await blocker_start(comm, demo_model)
    ollama = [await send(comm, model=OLLAMA, content=f"ollama in order {i}") for i in range(5)]
    await blocker_stop(comm, blocker)
    await until_ended(comm, ollama)
    # Ollama owns the GPU now; a long generation holds it while local messages queue.
    stack.ollama.reply = " ".join(f"w{i}" for i in range(100))
    stack.ollama.token_delay = 0.02
    holder = await send(comm, model=OLLAMA, content="hold the GPU")
    await frames_until(comm, lambda f: f["type"] == "chat.delta" and f["message"] == holder)
    local = [await send(comm, model=LOCAL, content=f"local in order {i}") for i in range(5)]
    await until_ended(comm, local)
    got = await replies([*ollama, *local])
    assert {m.status for m in got.values()} == {MessageStatus.DONE}
    for sent in (ollama, local):
        picked = sorted(sent, key=lambda pk: got[pk].started_at)
        assert picked == sent, [(pk, got[pk].started_at) for pk in sent]


# --- faults -------------------------------------------------------------------------

async def test_a_gpu_worker_killed_while_the_gate_is_closed(ws_headers, demo_model, workers, stack):
    """Ollama streams; a local message waits A, the gate closes and the GPU
    worker starts handing the GPU over (it waits for Ollama's generation:
    the `hold` is set, so a new Ollama message queues). The worker is killed
    there. Its successor clears the hold, ends the reply it died on once
    (`worker_restarted`), and serves every other message exactly once.
    Nothing after it switches the GPU, so a hold left behind would stay, and
    Ollama messages would queue for the GPU worker for good."""
    await tokens(demo_model, 8)
    comm = await connected(ws_headers)
    await send_and_finish(comm, model=OLLAMA, content="make Ollama the owner")
    # Streaming until well after the gate closes: the hand-over waits for it.
    stack.ollama.token_delay = 0.02
    stack.ollama.reply = " ".join(f"w{i}" for i in range(int((gate_age() + 8) / stack.ollama.token_delay)))
    streaming = await send(comm, model=OLLAMA, content="streaming through the kill")
    await frames_until(comm, lambda f: f["type"] == "chat.delta" and f["message"] == streaming)
    handed = await send(comm, model=LOCAL, content="local behind the gate")
    await eventually(lambda: scheduler().snapshot()["gate"]["handover"], timeout=gate_age() + SCENARIO_TIMEOUT / 4,
                     what="the GPU worker to start handing the GPU over")
    assert store().current() == handed
    queued = await send(comm, model=OLLAMA, content="ollama during the hand-over")
    assert scheduler().snapshot()["waiting"]["ollama"] == 1, "an Ollama lease was granted during the hand-over"
    served_before = local_served()
    try:
        await sync_to_async(workers.kill)("gpu")
    finally:
        await sync_to_async(workers.start)("gpu")
    # Workers.start returns once the worker answers a ping, after its recovery.
    snapshot = scheduler().snapshot()
    assert snapshot["gate"]["handover"] is False, snapshot
    ids = [streaming, handed, queued]
    ended = end_frames(await until_ended(comm, ids), ids)
    assert {pk: len(e) for pk, e in ended.items()} == dict.fromkeys(ids, 1), ended
    assert ended[handed][0]["type"] == "chat.error" and ended[handed][0]["code"] == "worker_restarted"
    assert ended[streaming][0]["type"] == "chat.done" and ended[queued][0]["type"] == "chat.done", ended
    assert all(m.status in FINISHED_STATUSES for m in (await replies(ids)).values())
    # Served at most once: Ollama saw each message once, and the local
    # model never generated the reply the worker died on.
    chats = chats_by_content(stack)
    assert [len(chats.get(c, [])) for c in ("streaming through the kill", "ollama during the hand-over")] == [1, 1]
    assert local_served() == served_before
    state = store().read()
    assert (state.owner, state.local_models) == ("ollama", []), state
    # Repaired: the next Ollama message takes the fast path again.
    log = GpuLog(workers)
    _, frames = await send_and_finish(comm, model=OLLAMA, content="after the repair")
    assert frames[-1]["type"] == "chat.done" and log.tasks_received() == [], log.tasks_received()


async def test_redis_restarted_in_the_middle_of_a_visit(ws_headers, demo_model, workers, stack):
    """The local model's visit is under way (a local reply generates, two
    local and two Ollama messages wait in the scheduler) when Redis restarts
    (with its append-only file: what it drops is every connection). Every
    message still ends exactly once."""
    from tests.test_faults import channel_layer_reset, redis_restart

    comm = await connected(ws_headers)
    await send_and_finish(comm, model=OLLAMA, content="warm Ollama up")
    served_before = local_served()
    blocker = await blocker_start(comm, demo_model)
    contents = ["ollama in the visit 0", "local in the visit 0", "ollama in the visit 1", "local in the visit 1"]
    ids = [await send(comm, model=OLLAMA if c.startswith("ollama") else LOCAL, content=c) for c in contents]
    assert scheduler().snapshot()["waiting"] == {"local": 2, "ollama": 2, "openai": 0}
    await redis_restart(stack, comm)
    await channel_layer_reset()
    # The page reconnects (the socket follows the replies not yet ended) and the user stops the long one.
    fresh = await connected(ws_headers)
    await blocker_stop(fresh, blocker)
    frames = await until_ended(fresh, [pk for pk in [blocker, *ids]
                                       if not (await Message.objects.aget(pk=pk)).is_finished])
    assert all(len(e) <= 1 for e in end_frames(frames, [blocker, *ids]).values()), frames
    got = await replies([blocker, *ids])
    # The reply generating through the blip ends, stopped, or with the
    # error it met if a write of its stream found Redis down.
    stopped = got[blocker].status == MessageStatus.CANCELLED
    assert stopped or got[blocker].status == MessageStatus.ERROR, got[blocker].status
    assert {got[pk].status for pk in ids} == {MessageStatus.DONE}, {pk: got[pk].status for pk in ids}
    chats = chats_by_content(stack)
    assert [len(chats.get(c, [])) for c in contents if c.startswith("ollama")] == [1, 1]
    # One generation for each local message, and for the blocker if it was
    # stopped rather than failed; a second run of either message would add two.
    await eventually(lambda: local_served() - served_before >= 2 + stopped, timeout=5, what="the local generations")
    assert local_served() - served_before <= 3


# --- fifo ---------------------------------------------------------------------------

@pytest.fixture
def fifo(workers):
    """The GPU worker picks, and this process admits, in arrival order."""
    with workers.restarted_with(("gpu",), GPU_SCHEDULE="fifo"), override_settings(GPU_SCHEDULE="fifo"):
        assert scheduler().policy.mode == "fifo"
        yield


async def test_fifo_still_never_overlaps_local_and_ollama(fifo, ws_headers, demo_model, workers, stack):
    """The core of tests/test_arbitration.py's twenty-client interleaving
    (not factored for reuse: it is one test body), smaller, under fifo:
    every message ends with chat.done and I1 holds."""
    await tokens(demo_model, 8)
    stack.ollama.token_delay = 0.002
    stack.ollama.reply = "A short answer from Ollama, in a few tokens."
    resident_at_start = LOCAL in store().read().local_models
    since = time.time()
    stack.ollama.clear()
    ends_seen: list[str] = []

    async def client(i: int) -> None:
        comm = await connected(ws_headers)
        for j in range(6):
            model = LOCAL if (i + j) % 2 else OLLAMA
            _, frames = await send_and_finish(comm, model=model, content=f"client {i} message {j}", timeout=300)
            ends_seen.append(frames[-1]["type"])
        await comm.disconnect()

    await asyncio.gather(*(client(i) for i in range(6)))
    assert ends_seen == ["chat.done"] * 36, ends_seen
    events = [e for e in store().events(1000) if e["at"] > since]
    local = arbitration.local_intervals(events, resident_at_start=resident_at_start)
    ollama = [(r[1], r[2] if r[2] is not None else float("inf")) for r in stack.ollama.residency]
    generations = stack.ollama.generations
    assert local and ollama and len(generations) == 18
    clashes = [(a, b) for a in local for b in ollama + generations if arbitration.overlaps(a, b)]
    assert not clashes, clashes[:5]


# --- admission ------------------------------------------------------------------------

async def test_gpu_busy_when_the_projected_wait_exceeds_the_bound(ws_headers, demo_model, workers, stack):
    """The GPU is the local model's: an Ollama message would wait at least
    a switch. With GPU_MAX_WAIT_SECONDS below that, it ends at once with
    `gpu_busy` and the estimate, and nothing is queued: no waiting entry,
    no GPU task, no switch."""
    await tokens(demo_model, 8)
    comm = await connected(ws_headers)
    await send_and_finish(comm, model=OLLAMA, content="make Ollama the owner")
    await send_and_finish(comm, model=LOCAL, content="and then the local model")  # a switch measured
    switch = scheduler().snapshot()["switch_seconds"]
    assert switch > 0
    state, log, since = store().read(), GpuLog(workers), time.time()
    with override_settings(GPU_MAX_WAIT_SECONDS=switch / 2):
        sent = time.monotonic()
        accepted, frames = await send_and_finish(comm, model=OLLAMA, content="no room for me")
        took = time.monotonic() - sent
    final = frames[-1]
    assert final["type"] == "chat.error" and final["code"] == "gpu_busy", final
    assert f"would wait about {switch:.0f} s" in final["detail"], final["detail"]
    assert took < SLACK, took
    snapshot = scheduler().snapshot()
    assert snapshot["waiting"] == {"local": 0, "ollama": 0, "openai": 0}, snapshot
    assert (await Message.objects.aget(pk=accepted["message"])).error_code == "gpu_busy"
    assert store().read().epoch == state.epoch and [e for e in store().events(1000) if e["at"] > since] == []
    assert redis_client().llen(gpu_queue(settings.GPU_SLOT)) == 0
    assert log.tasks_received() == []
    assert chats_by_content(stack).get("no room for me") is None


# --- switches and hops -------------------------------------------------------------------

async def test_thirty_mixed_messages_sent_at_once_cost_one_switch(ws_headers, demo_model, workers, stack):
    """The GPU is the local model's, and its worker busy, while 15 local and
    15 Ollama messages arrive interleaved. The local visit serves its 15
    (all came before the gate could close), then the GPU switches once and
    Ollama serves its 15: one owner change, where arrival order makes one
    per message."""
    comm = await connected(ws_headers)
    blocker = await blocker_start(comm, demo_model)
    since = time.time()  # the blocker made the GPU the local model's (a change when it had no owner)
    ids = [await send(comm, model=OLLAMA if i % 2 == 0 else LOCAL, content=f"burst {i}") for i in range(30)]
    await blocker_stop(comm, blocker)
    frames = await until_ended(comm, [blocker, *ids])
    assert [f["type"] for f in end_frames(frames, ids).values() for f in f] == ["chat.done"] * 30
    got = await replies(ids)
    burst = max(m.queued_at for m in got.values()) - got[ids[0]].queued_at
    age = gate_age()
    assert burst.total_seconds() < age, ("the precondition: every message came before the gate could close",
                                         burst, age)
    changes = owner_changes(since)
    assert [(e["previous"], e["model"]) for e in changes] == [("local", "ollama")], changes


async def test_an_ollama_message_while_ollama_owns_the_gpu_takes_no_gpu_task(ws_headers, demo_model, workers, stack):
    """The fast path: the GPU is Ollama's and the gate open, so the message
    takes its lease at admission and goes straight to the CPU worker. The
    count is of the GPU worker's own log, where Celery writes a line for
    every task it receives: none of the message tasks (gpu_generate,
    gpu_acquire, gpu_serve) while the message is served."""
    comm = await connected(ws_headers)
    await send_and_finish(comm, model=OLLAMA, content="make Ollama the owner")
    assert store().read().owner == "ollama"
    log, epoch = GpuLog(workers), store().read().epoch
    _, frames = await send_and_finish(comm, model=OLLAMA, content="straight to the CPU worker")
    assert frames[-1]["type"] == "chat.done", frames[-1]
    assert log.tasks_received() == []
    assert store().read().epoch == epoch
    assert len(chats_by_content(stack)["straight to the CPU worker"]) == 1


async def test_thirty_mixed_messages_sent_at_once_to_an_idle_gpu_cost_two_switches(ws_headers, demo_model, workers,
                                                                                   stack):
    """The GPU has no owner and its worker is idle when 15 Ollama and 15
    local messages arrive at once, interleaved, Ollama's first: the first
    owner takes the GPU and serves its 15, then the GPU switches once to
    the other: exactly 2 owner changes (arrival order makes one per message).
    Ollama's replies take a while (paced tokens), so its visit is still on
    while the burst arrives."""
    comm = await connected(ws_headers)
    await tokens(demo_model, 8)
    await send_and_finish(comm, model=LOCAL, content="a local model first")
    app.signature(queues.GPU_UNLOAD).apply_async(queue=gpu_queue(settings.GPU_SLOT))
    await eventually(lambda: store().read().owner == "none", timeout=30, what="the GPU to have no owner")
    stack.ollama.token_delay = 0.05
    since = time.time()
    for i in range(30):
        model = OLLAMA if i % 2 == 0 else LOCAL
        await comm.send_json_to({"type": "chat.send", "model": model, "content": f"idle burst {i}",
                                 "client_id": f"idle burst {i}"})
    accepted, ended = [], set()

    def all_ended(frame: dict) -> bool:
        # An early reply may end before the last message is accepted.
        if frame["type"] == "chat.accepted":
            accepted.append(frame["message"])
        elif frame["type"] in ("chat.done", "chat.error"):
            ended.add(frame.get("message"))
        return len(accepted) == 30 and ended >= set(accepted)

    frames = await frames_until(comm, all_ended, timeout=SCENARIO_TIMEOUT)
    assert [f["type"] for f in end_frames(frames, accepted).values() for f in f] == ["chat.done"] * 30
    changes = owner_changes(since)
    assert [(e["previous"], e["model"]) for e in changes] == [("none", "ollama"), ("ollama", "local")], changes
