"""A reply worked on by one run at a time, and a bound on how long a run
generates (issue 7; tests/test_faults.py has the redelivery of a reply that
ended, and of one that still streams, on the CPU worker).

With late acknowledgement Redis hands a task out again after the
visibility timeout, and a reconciler may dispatch a reply again: the run
that starts a reply claims it (chat/generation.py `reply_claim`), and a
delivery that finds the claim live does nothing. A claim whose holder was
killed expires, and the next delivery takes the reply over. Since neither
worker pool enforces Celery's time limits, each run stops generating after
GENERATION_DEADLINE_SECONDS and ends its reply with finish_reason "length".
"""
import os
import time

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings

from chat.dispatch import reply_claim, reply_claim_holder, reply_claim_renew, reply_release
from chat.models import Message, MessageStatus, ModelConfig
from gpu_manager.leases import Claims, ClaimLost, Keeper, Leases
from gpu_manager.state import GpuStateStore
from tests.support.sockets import communicator, ends, frames_until, send_and_finish
from tests.support.waiting import eventually, wait_for

#: The deadline the workers run with in the deadline tests: long enough for
#: a local model to load and stream on a loaded 2-core machine, short
#: enough that each test waits seconds.
DEADLINE = 3.0
#: How late a reply may end after its deadline: the next token or chunk,
#: the end's own writes, and a loaded machine.
DEADLINE_SLACK = 10.0
#: max_new_tokens of the local model in the deadline test: far more than it
#: writes before the deadline, so that the deadline is what stops it.
LOCAL_TOKENS = 20000


def deltas(frames: list[dict], message_id: int) -> list[dict]:
    return [f for f in frames if f["type"] == "chat.delta" and f["message"] == message_id]


def end_frames(frames: list[dict], message_id: int) -> list[dict]:
    return [f for f in frames if f.get("type") in ("chat.done", "chat.error") and f.get("message") == message_id]


# --- the claim, on the real Redis ---------------------------------------------------

def test_a_claim_has_one_holder_and_only_its_holder_renews_or_releases_it():
    token = reply_claim(900001)
    assert token and reply_claim_holder(900001) == token
    assert reply_claim(900001) is None, "a second run claimed a live claim"
    assert not reply_claim_renew(900001, "someone-else") and not reply_release(900001, "someone-else")
    assert reply_claim_holder(900001) == token
    assert reply_claim_renew(900001, token)
    assert reply_release(900001, token) and reply_claim_holder(900001) is None
    assert not reply_release(900001, token), "released twice"


def test_an_expired_claim_is_taken_over_and_fences_out_its_old_holder():
    claims = Claims(prefix="test:claim")
    old = claims.take("r1", ttl=0.2)
    keeper = Keeper(name="old-holder", renew=lambda: claims.renew("r1", old, ttl=0.2),
                    release=lambda: claims.release("r1", old), ttl=0.2)
    # The old holder stalls (its keeper is not running): the claim expires.
    new = wait_for(lambda: claims.take("r1", ttl=5), timeout=5, what="the claim to expire")
    with pytest.raises(ClaimLost):
        claims.renew("r1", old, ttl=5)
    assert not claims.release("r1", old) and claims.holder("r1") == new
    # A keeper that wakes up after the takeover learns it at its first renewal.
    with pytest.raises(ClaimLost):
        keeper.start()
    keeper.stop()
    assert claims.holder("r1") == new
    claims.release("r1", new)


def test_a_kept_claim_outlives_its_ttl_and_is_taken_again_if_redis_lost_it():
    claims = Claims(prefix="test:claim")
    token = claims.take("r2", ttl=0.3)
    with Keeper(name="holder", renew=lambda: claims.renew("r2", token, ttl=0.3),
                release=lambda: claims.release("r2", token), ttl=0.3) as keeper:
        started = time.monotonic()
        wait_for(lambda: time.monotonic() - started > 1.0, what="three TTLs")  # renewed every 0.1 s meanwhile
        assert claims.holder("r2") == token and not keeper.lost
        # A Redis restart without persistence loses every key: the holder,
        # still working, takes its claim again at its next renewal.
        claims._redis.delete(claims.key("r2"))
        wait_for(lambda: claims.holder("r2") == token, timeout=5, what="the claim to be taken again")
        assert not keeper.lost
    assert claims.holder("r2") is None


# --- deliveries on the real stack ---------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_gpu_task_delivered_again_while_its_reply_streams_does_nothing(ws_headers, demo_model, workers,
                                                                               stack):
    """A second GPU worker (another slot) gets the streaming reply's
    gpu_generate: it neither loads the model nor sends a frame."""
    from chatsite.celery import app

    await ModelConfig.objects.filter(pk=demo_model.pk).aupdate(max_new_tokens=4000)
    await sync_to_async(workers.start)("gpu1")
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    try:
        mark = len(GpuStateStore(slot="1").events(1000))
        await comm.send_json_to({"type": "chat.send", "model": "local_demo", "content": "long", "client_id": "x"})
        accepted = (await frames_until(comm, lambda f: f["type"] == "chat.accepted"))[-1]
        frames = await frames_until(comm, lambda f: f["type"] == "chat.delta")
        result = app.signature("workers.tasks.gpu_generate", args=(accepted["message"],),
                               queue="gpu.1").apply_async()
        await eventually(lambda: f"[{result.id}] succeeded" in workers.log("gpu1"), timeout=30,
                         what="the second delivery to run on gpu1")
        assert "another run is working on this reply" in workers.log("gpu1")
        await comm.send_json_to({"type": "chat.cancel", "message": accepted["message"]})
        frames += await frames_until(comm, ends(accepted["message"]), timeout=30)
        seqs = [f["seq"] for f in deltas(frames, accepted["message"])]
        assert seqs == list(range(len(seqs))), seqs
        assert len(end_frames(frames, accepted["message"])) == 1
        loads = [e for e in GpuStateStore(slot="1").events(1000)[mark:] if e["kind"] == "local_load"]
        assert loads == [] and GpuStateStore(slot="1").read().local_models == []
        await eventually(lambda: reply_claim_holder(accepted["message"]) is None, timeout=5,
                         what="the claim to be released with the reply's end")
    finally:
        await comm.disconnect()
        await sync_to_async(workers.stop)("gpu1")
        await ModelConfig.objects.filter(pk=demo_model.pk).aupdate(max_new_tokens=8)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_reply_whose_worker_was_killed_is_taken_over_by_its_next_delivery(ws_headers, demo_model,
                                                                                  workers, stack):
    """An OpenAI reply (no GPU lease, so nothing else ends it) whose CPU
    worker was SIGKILLed: once its claim expired, the task delivered again
    streams it from the start and ends it."""
    from chatsite.celery import app

    stack.openai.reply = " ".join(f"w{i}" for i in range(300))
    stack.openai.token_delay = 0.02
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    await comm.send_json_to({"type": "chat.send", "model": "openai_gpt-4o-mini", "content": "long",
                             "client_id": "x"})
    message = (await frames_until(comm, lambda f: f["type"] == "chat.accepted"))[-1]["message"]
    await frames_until(comm, lambda f: f["type"] == "chat.delta" and f["message"] == message)
    try:
        await sync_to_async(workers.kill)("cpu")
        assert reply_claim_holder(message), "the killed worker's claim is still live"
    finally:
        await sync_to_async(workers.start)("cpu")
    await eventually(lambda: reply_claim_holder(message) is None, timeout=settings.GPU_LEASE_TTL + 5,
                     what="the killed worker's claim to expire")
    stack.openai.token_delay = 0.0
    app.signature("workers.tasks.cpu_generate", args=(message,), queue="cpu").apply_async()
    final = (await frames_until(comm, ends(message), timeout=30))[-1]
    assert final["type"] == "chat.done", final
    reply = await Message.objects.aget(pk=message)
    assert reply.status == MessageStatus.DONE and reply.content == stack.openai.reply
    await comm.disconnect()


# --- the generation deadline --------------------------------------------------------

def test_a_run_ends_before_the_soft_time_limit_and_long_before_redelivery():
    """The deadline plus a stalled upstream's last read fit in the soft time
    limit, which is below the hard one and the visibility timeout."""
    deadline, read = settings.GENERATION_DEADLINE_SECONDS, settings.UPSTREAM_READ_TIMEOUT
    soft, hard = settings.CELERY_TASK_SOFT_TIME_LIMIT, settings.CELERY_TASK_TIME_LIMIT
    visibility = settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]
    assert 0 < deadline and deadline + read <= soft < hard < visibility


@pytest.fixture(scope="module")
def short_deadline(workers):
    """Both workers restarted with GENERATION_DEADLINE_SECONDS=DEADLINE for
    the deadline tests, and restarted as before after them."""
    with workers.restarted_with(("gpu", "cpu"), GENERATION_DEADLINE_SECONDS=str(DEADLINE)):
        yield DEADLINE


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("model", ["local_demo", "ollama_qwen:7b", "openai_gpt-4o-mini"])
async def test_a_reply_longer_than_the_deadline_is_cut_there(short_deadline, model, ws_headers, demo_model,
                                                            workers, stack):
    fake = stack.ollama if model.startswith("ollama_") else stack.openai
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    try:
        # A short reply first: the timed one neither loads a model nor switches the GPU.
        await ModelConfig.objects.filter(pk=demo_model.pk).aupdate(max_new_tokens=8)
        _, frames = await send_and_finish(comm, model=model, content="warm up")
        assert frames[-1]["type"] == "chat.done", frames[-1]
        # Each would take well over the deadline: 20000 local tokens (the
        # demo model writes ~1500 a second here); 2000 upstream tokens 10 ms
        # apart (20 s).
        await ModelConfig.objects.filter(pk=demo_model.pk).aupdate(max_new_tokens=LOCAL_TOKENS)
        fake.reply = " ".join(f"w{i}" for i in range(2000))
        fake.token_delay = 0.01
        if fake is stack.ollama:  # the warm-up's generation is recorded once its stream closed
            await eventually(lambda: stack.ollama.generations, timeout=5, what="the warm-up's generation")
        fake.clear()
        sent = time.monotonic()
        accepted, frames = await send_and_finish(comm, model=model, content="go on and on",
                                                 timeout=DEADLINE + DEADLINE_SLACK + 30)
        took = time.monotonic() - sent
        message = accepted["message"]
        final = frames[-1]
        assert final["type"] == "chat.done" and final["finish_reason"] == "length", final
        assert DEADLINE <= took < DEADLINE + DEADLINE_SLACK, took
        streamed = "".join(f["text"] for f in deltas(frames, message))
        reply = await Message.objects.aget(pk=message)
        assert reply.status == MessageStatus.DONE and reply.finish_reason == "length"
        assert streamed and reply.content == streamed
        if model == "local_demo":
            assert 0 < reply.completion_tokens < LOCAL_TOKENS, reply.completion_tokens
        else:
            assert fake.reply.startswith(streamed) and len(streamed) < len(fake.reply)
        if model.startswith("ollama_"):
            # The stream was closed: Ollama stopped generating at the cut.
            (started, stopped), = await eventually(lambda: stack.ollama.generations, timeout=5,
                                                   what="Ollama to notice the closed stream")
            assert stopped - started < DEADLINE + DEADLINE_SLACK
            await eventually(lambda: str(message) not in Leases(slot=settings.OLLAMA_GPU_SLOT).live(),
                             timeout=5, what="the GPU lease to be released")
        await eventually(lambda: reply_claim_holder(message) is None, timeout=5, what="the claim's release")
        # The next message is answered as usual.
        await ModelConfig.objects.filter(pk=demo_model.pk).aupdate(max_new_tokens=8)
        fake.reply, fake.token_delay = "Short.", 0.0
        _, frames = await send_and_finish(comm, model=model, content="and a short one")
        assert frames[-1]["type"] == "chat.done", frames[-1]
    finally:
        await comm.disconnect()


# --- a message taken by a GPU worker that died -------------------------------------

TAKE_AND_DIE = """
import os, sys
from chatsite.celery import app
with app.connection_for_write() as connection:
    message = connection.default_channel.basic_get(sys.argv[1], no_ack=False)
    print("took" if message is not None else "nothing", flush=True)
    os._exit(0)  # as a killed worker: no acknowledgement, no restore on close
"""


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_message_taken_by_a_dead_gpu_worker_runs_when_the_next_one_starts(ws_headers, demo_model,
                                                                                  workers, stack):
    """The window a SIGKILL can hit between two tasks: the worker has taken
    the next message (late acknowledgement: it sits in the transport's
    `unacked` hash) but not yet started its reply. Without workers/orphans.py
    it would wait out the visibility timeout (22 minutes) with its reply
    `queued`; here a real consumer process takes it and exits."""
    import subprocess

    from chatsite.queues import gpu_queue
    from chatsite.celery import app

    queue = gpu_queue(settings.GPU_SLOT)
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    await sync_to_async(workers.stop)("gpu")
    try:
        await comm.send_json_to({"type": "chat.send", "model": "local_demo", "content": "taken", "client_id": "t"})
        message = (await frames_until(comm, lambda f: f["type"] == "chat.accepted"))[-1]["message"]
        env = {**os.environ, "DATABASE_URL": workers.database_url}
        took = await sync_to_async(subprocess.run)(
            [".venv/bin/python", "-c", TAKE_AND_DIE, queue], cwd=str(settings.BASE_DIR), env=env,
            capture_output=True, text=True, timeout=60)
        assert took.stdout.strip() == "took", took.stdout + took.stderr
        with app.connection_for_write() as connection:
            assert connection.default_channel.client.hlen("unacked") >= 1
    finally:
        await sync_to_async(workers.start)("gpu")
    final = (await frames_until(comm, ends(message), timeout=60))[-1]
    assert final["type"] == "chat.done", final
    reply = await Message.objects.aget(pk=message)
    assert reply.status == MessageStatus.DONE and reply.content
    await comm.disconnect()
