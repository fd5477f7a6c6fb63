"""Faults on the real stack (issue 7), one test each: the private Redis
restarted, upstreams that are slow, fail or hang up, the web process
restarted while tasks run, and a task delivered twice. Killed GPU and CPU
workers and a down Ollama are in tests/test_arbitration.py.

For every fault: each accepted message ends in exactly one `chat.done` or a
clear `chat.error` within a bounded time, nothing is delivered twice, the
GPU state is left consistent, and the next message is answered. The table
of what was observed is docs/reliability.md.
"""
import asyncio
import contextlib
import json
import shutil
import time

import pytest
import pytest_asyncio
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection
from redis.exceptions import ConnectionError as RedisConnectionError

from chat.catalog import catalog_forget, catalog_list
from chat.models import FINISHED_STATUSES, Message, MessageStatus, ModelConfig
from gpu_manager.leases import Leases
from gpu_manager.state import GpuStateStore
from tests.support.sockets import communicator, ends, frames_until, send_and_finish, session_cookie
from tests.support.waiting import eventually
from tests.support.web import WebServer
from tests.support.workers import test_database_url

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

#: Seconds of upstream silence after which the CPU worker gives up in this
#: module (UPSTREAM_READ_TIMEOUT; 120 s in production). Short, so that the
#: "slow upstream" tests wait seconds; long enough that a loaded 2-core
#: machine never trips it on a healthy stream.
READ_TIMEOUT = 2.0
#: How long a failed reply may take to end, from the send: the fault's own
#: timeout (if any) plus queueing and a GPU switch on a loaded machine.
END_WITHIN = 15.0


def store() -> GpuStateStore:
    return GpuStateStore(slot=settings.GPU_SLOT)


def end_frames(frames: list[dict], message_id: int) -> list[dict]:
    return [f for f in frames if f.get("type") in ("chat.done", "chat.error") and f.get("message") == message_id]


async def send_timed(comm, *, model: str, content: str, timeout: float = END_WITHIN):
    """Send one message; return (accepted, frames up to its end, seconds from send to end)."""
    started = time.monotonic()
    accepted, frames = await send_and_finish(comm, model=model, content=content, timeout=timeout)
    took = time.monotonic() - started
    # The "observed" column of docs/reliability.md (pytest -s shows it).
    print(f"\n[fault] {model}: {frames[-1]['type']} {frames[-1].get('code', '')} {took:.2f} s after the send")
    return accepted, frames, took


async def assert_recovered(comm, *, failed: int) -> None:
    """The GPU state is consistent, no lease is left behind by the failed
    reply, and the next messages (local, then Ollama) are answered, with no
    late frame of the failed reply among their frames."""
    # `current` is cleared, and a lease released, just after the task ended its reply.
    await eventually(lambda: store().current() is None, timeout=5, what="the GPU step to return")
    await eventually(lambda: str(failed) not in Leases(slot=settings.GPU_SLOT).live(), timeout=5,
                     what="the failed reply's GPU lease to be released")
    state = store().read()
    if state.owner == "local":
        assert state.local_models and not state.ollama_models, state
    if state.owner == "ollama":
        assert not state.local_models, state
    seen = []
    for model in ("local_demo", "ollama_qwen:7b"):
        _, frames = await send_and_finish(comm, model=model, content="are you still there?", timeout=60)
        assert frames[-1]["type"] == "chat.done", frames
        seen += frames
    assert not [f for f in seen if f.get("message") == failed], "a frame of the failed reply came late"
    reply = await Message.objects.aget(pk=failed)
    assert reply.finished_at is not None and reply.status in FINISHED_STATUSES


async def assert_one_clear_error(accepted: dict, frames: list[dict], *, code: str, mentions: str) -> dict:
    ended = end_frames(frames, accepted["message"])
    assert len(ended) == 1 and ended[0]["type"] == "chat.error", frames
    error = ended[0]
    assert error["code"] == code, error
    assert mentions in error["detail"], error
    reply = await Message.objects.aget(pk=accepted["message"])
    assert (reply.status, reply.error_code) == (MessageStatus.ERROR, code)
    return error


@pytest_asyncio.fixture
async def small_demo(demo_model):
    await ModelConfig.objects.filter(pk=demo_model.pk).aupdate(max_new_tokens=8)
    return demo_model


@pytest_asyncio.fixture
async def ws(ws_headers):
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    yield comm
    await comm.disconnect()


@pytest.fixture(scope="module")
def short_read_timeout(workers):
    """The CPU worker restarted with UPSTREAM_READ_TIMEOUT=READ_TIMEOUT for
    this module's slow-upstream tests, and restarted as before after them."""
    with workers.restarted_with(("cpu",), UPSTREAM_READ_TIMEOUT=str(READ_TIMEOUT)):
        yield READ_TIMEOUT


# --- Ollama ------------------------------------------------------------------

async def test_ollama_answering_500_ends_the_reply_with_its_error(ws, small_demo, workers, stack):
    stack.ollama.fail = "500"
    accepted, frames, took = await send_timed(ws, model="ollama_qwen:7b", content="hello?")
    stack.ollama.fail = None
    await assert_one_clear_error(accepted, frames, code="ollama_error", mentions="answered 500")
    assert took < END_WITHIN
    await assert_recovered(ws, failed=accepted["message"])


async def test_ollama_closing_the_stream_half_way_keeps_the_text_and_says_so(ws, small_demo, workers, stack):
    stack.ollama.reply = " ".join(f"w{i}" for i in range(40))
    stack.ollama.token_delay = 0.005
    stack.ollama.fail = "close_midway"
    accepted, frames, took = await send_timed(ws, model="ollama_qwen:7b", content="tell me")
    stack.ollama.fail = None
    error = await assert_one_clear_error(accepted, frames, code="endpoint_unavailable", mentions="Ollama at")
    assert took < END_WITHIN
    # What streamed before the cut is kept, in order, and is the reply's text.
    streamed = "".join(f["text"] for f in frames if f["type"] == "chat.delta")
    assert streamed and stack.ollama.reply.startswith(streamed), streamed
    reply = await Message.objects.aget(pk=accepted["message"])
    assert reply.content == streamed and error["detail"]
    await assert_recovered(ws, failed=accepted["message"])


async def test_ollama_slower_than_the_read_timeout_fails_in_bounded_time(short_read_timeout, ws, small_demo,
                                                                        workers, stack):
    stack.ollama.fail, stack.ollama.slow_seconds = "slow", 4 * READ_TIMEOUT
    try:
        accepted, frames, took = await send_timed(ws, model="ollama_qwen:7b", content="anyone?")
    finally:
        stack.ollama.fail, stack.ollama.slow_seconds = None, 30.0
    await assert_one_clear_error(accepted, frames, code="endpoint_unavailable", mentions="timed out")
    assert READ_TIMEOUT <= took < READ_TIMEOUT + END_WITHIN, took
    await assert_recovered(ws, failed=accepted["message"])


# --- OpenAI-compatible endpoint -------------------------------------------------

async def test_openai_refusing_the_key_401_says_so_without_the_key(ws, small_demo, workers, stack):
    await sync_to_async(catalog_list)()  # discovered with the right key ...
    stack.openai.api_key = "sk-rotated-elsewhere"  # ... which is then revoked upstream
    try:
        accepted, frames, took = await send_timed(ws, model="openai_gpt-4o-mini", content="hi")
    finally:
        stack.openai.api_key = "sk-test"
    error = await assert_one_clear_error(accepted, frames, code="upstream_auth", mentions="refused the API key")
    assert settings.OPENAI_API_KEY not in error["detail"]
    assert took < END_WITHIN
    await assert_recovered(ws, failed=accepted["message"])


async def test_openai_rate_limiting_429_says_so(ws, small_demo, workers, stack):
    stack.openai.fail_status = 429
    accepted, frames, took = await send_timed(ws, model="openai_gpt-4o-mini", content="hi")
    stack.openai.fail_status = None
    await assert_one_clear_error(accepted, frames, code="upstream_rate_limited", mentions="429")
    assert took < END_WITHIN
    await assert_recovered(ws, failed=accepted["message"])


async def test_openai_slower_than_the_read_timeout_fails_in_bounded_time(short_read_timeout, ws, small_demo,
                                                                        workers, stack):
    stack.openai.slow_seconds = 4 * READ_TIMEOUT
    accepted, frames, took = await send_timed(ws, model="openai_gpt-4o-mini", content="anyone?")
    stack.openai.slow_seconds = None
    await assert_one_clear_error(accepted, frames, code="endpoint_unavailable", mentions="timed out")
    assert READ_TIMEOUT <= took < READ_TIMEOUT + END_WITHIN, took
    await assert_recovered(ws, failed=accepted["message"])


# --- Redis -------------------------------------------------------------------
# The private Redis keeps an append-only file (chatsite/redis_server.py), and
# redis_restart stops it with SIGTERM, so a restart keeps the queues, the
# channel layer's groups, the GPU state and the leases; what it drops is every
# connection. A Redis that crashes loses up to the last second (and one that
# comes back empty, everything): the GPU worker then rewrites the state from
# what it holds. A socket whose channel layer loses Redis fails (uvicorn
# closes it with 1011) and the page reconnects; these tests do what the page
# does.

def message_over_http(user, message_id: int) -> dict:
    """GET /api/messages/<id>/, as the page reads a reply after reconnecting."""
    from django.test import Client

    client = Client()
    client.force_login(user)
    response = client.get(f"/api/messages/{message_id}/")
    assert response.status_code == 200, response.content
    return response.json()


async def start_reply(comm, *, model: str) -> dict:
    """Send a message and wait for its first text."""
    await comm.send_json_to({"type": "chat.send", "model": model, "content": "a long one", "client_id": "long"})
    accepted = (await frames_until(comm, lambda f: f["type"] == "chat.accepted"))[-1]
    await frames_until(comm, lambda f: f["type"] == "chat.delta" and f["message"] == accepted["message"])
    return accepted


def long_ollama_reply(stack) -> None:
    """~3 s of Ollama streaming (300 tokens, 10 ms apart), also on a loaded machine."""
    stack.ollama.reply = " ".join(f"w{i}" for i in range(300))
    stack.ollama.token_delay = 0.01


async def redis_restart(stack, comm, *, empty: bool = False) -> None:
    """Restart Redis (`empty`: without its append-only file, as a crash
    before a write or a replaced server leaves it); the socket's consumer
    fails with the connection error of its channel layer (uvicorn would
    close the socket with 1011)."""
    await sync_to_async(stack.redis.stop)()
    # Waited for while Redis is down: the channel layer retries a command
    # once on a fresh connection, so a Redis already back could answer the
    # consumer's retry and keep it alive (the CI failure of
    # test_redis_come_back_empty_loses_no_queued_message on an idle machine).
    done, _ = await asyncio.wait({comm.future}, timeout=END_WITHIN)
    assert done, "the consumer did not notice that Redis went away"
    assert isinstance(comm.future.exception(), RedisConnectionError), comm.future.exception()
    if empty:
        shutil.rmtree(stack.redis.directory / "appendonlydir")
    await sync_to_async(stack.redis.start)()
    await sync_to_async(catalog_forget)()
    # This process's pooled broker connections are stale too. Publishing
    # retries on a fresh one, but Workers.start's app.control.ping (the
    # fixtures restart workers after these tests) does not: replace them
    # (kombu's own pool reset: close all, then refill with lazy ones).
    from chatsite.celery import app

    app.pool.resize(app.pool.limit, reset=True)


async def channel_layer_reset() -> None:
    """Drop the web side's pooled channel-layer connections. A web process
    that lived through the restart keeps them, and the first commands on
    them fail: test_redis_restart_first_message_after_it_is_accepted."""
    await get_channel_layer().close_pools()


def cpu_worker_ensure(workers) -> None:
    """Start the CPU worker again if a test's fault killed it."""
    if workers.procs["cpu"].poll() is not None:
        workers.procs.pop("cpu")
        workers.start("cpu")


async def test_redis_restarted_mid_conversation(ws_headers, user, small_demo, workers, stack):
    await ModelConfig.objects.filter(pk=small_demo.pk).aupdate(max_new_tokens=4000)
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    running = await start_reply(comm, model="local_demo")
    await redis_restart(stack, comm)
    await channel_layer_reset()

    # The page reconnects. The reply still streaming is the new socket's (or
    # it failed on the blip, in which case the page reads its error over
    # HTTP); the user stops it, and the GPU worker sees the flag in the new
    # Redis. Either way it ends once.
    fresh = communicator(ws_headers)
    assert (await fresh.connect())[0]
    stopped = time.monotonic()
    await fresh.send_json_to({"type": "chat.cancel", "message": running["message"]})
    await eventually(lambda: message_over_http(user, running["message"])["finished_at"],
                                  timeout=END_WITHIN, what="the streaming reply to end")
    assert time.monotonic() - stopped < END_WITHIN
    ended = await sync_to_async(message_over_http)(user, running["message"])
    assert ended["status"] in ("cancelled", "error"), ended
    if ended["status"] == "error":
        assert ended["error_code"] and ended["error_detail"], ended
    # Its end reached the new socket at most once (not at all if it ended
    # before the socket subscribed): everything up to the next reply's end.
    await ModelConfig.objects.filter(pk=small_demo.pk).aupdate(max_new_tokens=8)
    await fresh.send_json_to({"type": "chat.send", "model": "local_demo", "content": "next", "client_id": "next"})
    frames = await frames_until(fresh, lambda f: f["type"] == "chat.accepted")
    frames += await frames_until(fresh, ends(frames[-1]["message"]))
    assert frames[-1]["type"] == "chat.done", frames
    assert len(end_frames(frames, running["message"])) <= 1, frames
    # The cancel of a reply that had ended in the blip is answered so.
    assert all(f["code"] == "already_finished" for f in frames if f.get("message") is None), frames

    # The service answers again; the GPU state is true once more; nothing
    # more of the ended reply comes.
    await assert_recovered(fresh, failed=running["message"])
    await fresh.disconnect()


async def test_redis_restart_while_an_ollama_reply_streams_keeps_the_cpu_worker(ws_headers, small_demo, workers,
                                                                             stack):
    long_ollama_reply(stack)
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    try:
        await start_reply(comm, model="ollama_qwen:7b")
        await redis_restart(stack, comm)
        await channel_layer_reset()
        # It exits within a second of the restart, if it does; give it five.
        with contextlib.suppress(AssertionError):
            await eventually(lambda: workers.procs["cpu"].poll() is not None, timeout=5, what="")
        assert workers.procs["cpu"].poll() is None, "the CPU worker exited:\n" + workers.log("cpu")[-600:]
    finally:
        await sync_to_async(cpu_worker_ensure, thread_sensitive=False)(workers)


async def message_queued_behind_a_switch(comm, stack) -> dict:
    """Two local messages after an Ollama one: the GPU worker takes the
    first and waits 3 s for Ollama to free its memory; the second, whose
    `chat.accepted` this returns, waits in the broker's queue."""
    _, frames = await send_and_finish(comm, model="ollama_qwen:7b", content="Ollama owns the GPU")
    assert frames[-1]["type"] == "chat.done"
    stack.ollama.unload_delay = 3.0
    for client_id in ("switching", "queued"):
        await comm.send_json_to({"type": "chat.send", "model": "local_demo", "content": "behind it",
                                 "client_id": client_id})
        queued = (await frames_until(comm, lambda f: f["type"] == "chat.accepted"))[-1]
    await eventually(lambda: store().current() is not None, timeout=END_WITHIN,
                     what="the GPU worker to take the first local message")
    return queued


async def test_redis_restart_loses_no_queued_message(ws_headers, user, small_demo, workers, stack):
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    queued = await message_queued_behind_a_switch(comm, stack)
    await redis_restart(stack, comm)
    await eventually(lambda: message_over_http(user, queued["message"])["finished_at"], timeout=10,
                     what="the queued reply to end")


async def test_redis_come_back_empty_loses_no_queued_message(ws_headers, user, small_demo, workers, stack):
    """As above, but Redis returns with nothing (a crash without its
    append-only file, a replaced server): the queued reply's task is gone
    with the queue, and the GPU workers' housekeeping queues it again."""
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    queued = await message_queued_behind_a_switch(comm, stack)
    await redis_restart(stack, comm, empty=True)
    await eventually(lambda: message_over_http(user, queued["message"])["status"] == "done",
                     timeout=settings.REPLY_REDISPATCH_AFTER_SECONDS + END_WITHIN,
                     what="the lost reply to be queued again and answered")


async def test_redis_restart_state_soon_lists_what_the_worker_holds(ws_headers, small_demo, workers, stack):
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    _, frames = await send_and_finish(comm, model="local_demo", content="load it")
    assert frames[-1]["type"] == "chat.done" and store().read().local_models == ["local_demo"]
    await redis_restart(stack, comm)
    await eventually(lambda: store().read().local_models == ["local_demo"], timeout=5,
                                  what="the GPU state to list the resident model again")


async def test_redis_restart_first_message_after_it_is_accepted(ws_headers, small_demo, workers, stack):
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    _, frames = await send_and_finish(comm, model="local_demo", content="warm the pool")
    assert frames[-1]["type"] == "chat.done"
    await redis_restart(stack, comm)
    fresh = communicator(ws_headers)
    assert (await fresh.connect())[0]
    # A crashed consumer surfaces only when a receive times out: keep it short.
    _, frames = await send_and_finish(fresh, model="local_demo", content="hello again", timeout=10)
    assert frames[-1]["type"] == "chat.done"


# --- the web process -------------------------------------------------------------

async def test_web_process_restarted_while_a_reply_streams(user, small_demo, workers, stack):
    """uvicorn killed mid-reply and started again: the worker goes on, the
    page reconnects, and the reply reaches it (live if it still streams,
    else from the database), whole and once."""
    # ~8 s of Ollama streaming: still running when the new process answers,
    # unless the machine is very loaded, in which case the database has it.
    # Within the model's num_predict (512 by default): Ollama would cut it there.
    stack.ollama.reply = " ".join(f"w{i}" for i in range(400))
    stack.ollama.token_delay = 0.02
    web = WebServer(log_dir=stack.var, database_url=test_database_url(connection.settings_dict))
    session = await sync_to_async(session_cookie)(user)
    await sync_to_async(web.start, thread_sensitive=False)()
    try:
        async with web.socket(session) as ws:
            await ws.send(json.dumps({"type": "chat.send", "model": "ollama_qwen:7b", "content": "long",
                                      "client_id": "long"}))
            accepted = (await frames_until(ws, lambda f: f["type"] == "chat.accepted"))[-1]
            before = await frames_until(ws, lambda f: f["type"] == "chat.delta")
            await sync_to_async(web.kill)()
        killed = time.monotonic()
        await sync_to_async(web.start, thread_sensitive=False)()
        async with web.socket(session) as ws:
            reply = await Message.objects.aget(pk=accepted["message"])
            if not reply.is_finished:  # it is this socket's now (subscribed on connect)
                after = await frames_until(ws, ends(accepted["message"]), timeout=END_WITHIN + 10)
            else:
                after = []
            reply = await Message.objects.aget(pk=accepted["message"])
            assert reply.status == MessageStatus.DONE and reply.content == stack.ollama.reply, reply.status
            assert time.monotonic() - killed < 60
            mine = [f for f in after if f.get("message") == accepted["message"]]
            assert len(end_frames(mine, accepted["message"])) == (1 if after else 0), mine
            seqs = [f["seq"] for f in before + mine if f["type"] == "chat.delta"]
            assert len(seqs) == len(set(seqs)), "a delta was delivered twice"
            # The next message is answered by the new process.
            await ws.send(json.dumps({"type": "chat.send", "model": "local_demo", "content": "and now?",
                                      "client_id": "next"}))
            nxt = (await frames_until(ws, lambda f: f["type"] == "chat.accepted"))[-1]
            final = (await frames_until(ws, ends(nxt["message"])))[-1]
            assert final["type"] == "chat.done", final
    finally:
        await sync_to_async(web.stop, thread_sensitive=False)()


# --- a task delivered twice; time limits ----------------------------------------
# With late acknowledgement, Redis hands an unacknowledged task out again
# after the visibility timeout (a worker that died, or a task still running
# past it). A second run must not send a reply twice.

async def _task_ran(workers, name: str, result) -> None:
    await eventually(lambda: f"[{result.id}] succeeded" in workers.log(name), timeout=END_WITHIN,
                     what=f"task {result.id} to run on the {name} worker")


async def _no_frame_on(channel: str, *, idle: float = 0.5) -> None:
    """Nothing arrives on the channel: the task is known to have returned,
    so any frame it sent is already in Redis; this short wait only reads it."""
    layer = get_channel_layer()
    with pytest.raises(asyncio.TimeoutError):
        frame = await asyncio.wait_for(layer.receive(channel), idle)
        raise AssertionError(f"a frame was delivered again: {frame}")


async def test_a_task_delivered_again_after_its_reply_ended_does_nothing(ws, small_demo, workers, stack):
    from chatsite.queues import gpu_queue
    from chat.relay import message_group
    from chatsite.celery import app

    layer = get_channel_layer()
    for model, tasks in (("local_demo", [("gpu", "workers.tasks.gpu_generate")]),
                         ("ollama_qwen:7b", [("gpu", "workers.tasks.gpu_acquire"),
                                             ("cpu", "workers.tasks.cpu_generate")])):
        accepted, frames = await send_and_finish(ws, model=model, content="once")
        assert frames[-1]["type"] == "chat.done"
        before = await Message.objects.aget(pk=accepted["message"])
        listener = await layer.new_channel()
        await layer.group_add(message_group(accepted["message"]), listener)
        stack.ollama.clear()
        for worker, task in tasks:
            queue = gpu_queue(settings.GPU_SLOT) if worker == "gpu" else "cpu"
            result = app.signature(task, args=(accepted["message"],), queue=queue).apply_async()
            await _task_ran(workers, worker, result)
        await _no_frame_on(listener)
        after = await Message.objects.aget(pk=accepted["message"])
        assert (after.status, after.content, after.finished_at) == (before.status, before.content,
                                                                    before.finished_at)
        assert not stack.ollama.requests_to("/api/chat"), "the upstream was asked again"
        assert str(accepted["message"]) not in Leases(slot=settings.GPU_SLOT).live()


async def test_a_task_delivered_again_while_its_reply_streams_does_not_stream_it_twice(ws, small_demo, workers,
                                                                                       stack):
    from chatsite.celery import app

    stack.ollama.reply = " ".join(f"w{i}" for i in range(200))
    stack.ollama.token_delay = 0.01
    await ws.send_json_to({"type": "chat.send", "model": "ollama_qwen:7b", "content": "long", "client_id": "x"})
    accepted = (await frames_until(ws, lambda f: f["type"] == "chat.accepted"))[-1]
    frames = await frames_until(ws, lambda f: f["type"] == "chat.delta")
    app.signature("workers.tasks.cpu_generate", args=(accepted["message"],), queue="cpu").apply_async()
    frames += await frames_until(ws, ends(accepted["message"]), timeout=END_WITHIN)
    assert len(stack.ollama.requests_to("/api/chat")) == 1, "the upstream was asked twice"
    seqs = [f["seq"] for f in frames if f["type"] == "chat.delta"]
    assert seqs == list(range(len(seqs))), seqs


async def test_redelivery_waits_longer_than_any_task_may_run(settings):
    """The visibility timeout is above the hard time limit, which is above
    the soft one (docs/reliability.md: what bounds a generation, since the
    worker pools in use do not enforce these limits)."""
    soft, hard = settings.CELERY_TASK_SOFT_TIME_LIMIT, settings.CELERY_TASK_TIME_LIMIT
    visibility = settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]
    assert 0 < soft < hard < visibility
    assert settings.UPSTREAM_READ_TIMEOUT < soft


def _reply_row(*, user, model: str) -> Message:
    """A question and its queued reply, as message_enqueue stores them, not dispatched."""
    from django.utils import timezone

    from chat.models import Conversation

    conversation = Conversation.objects.create(user=user, title="limits")
    now = timezone.now()
    Message.objects.create(conversation=conversation, role="user", content="take your time", model_name=model,
                           queued_at=now, finished_at=now)
    return Message.objects.create(conversation=conversation, role="assistant", model_name=model,
                                  status=MessageStatus.QUEUED, queued_at=now)


async def test_the_solo_pool_ignores_task_time_limits_and_the_gevent_pool_ends_the_reply_at_them(
        ws, user, small_demo, workers, stack):
    """The truth behind CELERY_TASK_*_TIME_LIMIT: Celery enforces them in the
    prefork pool (billiard's timeout handler) and, the hard one, in the
    gevent pool (celery/concurrency/gevent.py `apply_timeout`: gevent's
    Timeout raised inside the task). The solo pool (solo.py: `on_apply =
    apply_target`) drops them. Here a GPU step runs 2 s past a 1 s limit and
    ends normally; a CPU step is cut at the limit, and its reply ends with a
    clear `time_limit` error (workers/base.py MessageTask), not in silence.
    If this fails, a pool changed: update docs/reliability.md."""
    from chatsite.queues import gpu_queue
    from chatsite.celery import app

    # The GPU step: switching from Ollama to local_demo waits 3 s for Ollama
    # to free its memory. The CPU step: an OpenAI reply of 3 s.
    _, frames = await send_and_finish(ws, model="ollama_qwen:7b", content="Ollama owns the GPU")
    assert frames[-1]["type"] == "chat.done"
    stack.ollama.unload_delay = 3.0
    stack.openai.reply = " ".join(f"w{i}" for i in range(100))
    stack.openai.token_delay = 0.03
    limits = {"time_limit": 1, "soft_time_limit": 0.5}
    replies = {}
    for model, task, queue in (("local_demo", "workers.tasks.gpu_generate", gpu_queue(settings.GPU_SLOT)),
                               ("openai_gpt-4o-mini", "workers.tasks.cpu_generate", "cpu")):
        reply = await sync_to_async(_reply_row)(user=user, model=model)
        app.signature(task, args=(reply.pk,), queue=queue).apply_async(**limits)
        replies[model] = reply.pk
    for model, message_id in replies.items():
        await eventually(lambda: Message.objects.filter(pk=message_id, finished_at__isnull=False).exists(),
                         timeout=30, what=f"the {model} reply to end")
    local = await Message.objects.aget(pk=replies["local_demo"])
    assert local.status == MessageStatus.DONE, (local.status, local.error_code, local.error_detail)
    assert (local.finished_at - local.started_at).total_seconds() > limits["time_limit"] + 1
    cut = await Message.objects.aget(pk=replies["openai_gpt-4o-mini"])
    assert cut.status == MessageStatus.ERROR and cut.error_code == "time_limit", (cut.status, cut.error_code)
    assert (cut.finished_at - cut.started_at).total_seconds() < limits["time_limit"] + 1
