"""The reply runner: one reply's run on a worker, from its claim to its end.

Every entry point takes a message id, claims the reply (chat/dispatch.py
`reply_hold`), and ends it exactly once with `chat.done` or `chat.error`
(`message_finish` / `message_fail`). A reply that has already ended (a
re-delivered task) or that another run holds is left alone.

- GPU worker: `gpu_prelude` (the task prelude: take the scheduler's pick,
  claim it, then make the local model resident, or free the GPU for an
  external model and queue its generation) hands a local model's claim to
  `local_reply_generate` (the task body) on the task's own request
  (workers/gpu_tasks.py).
- CPU workers: `external_reply_generate` streams from Ollama or an
  OpenAI-compatible endpoint, under the GPU lease granted at admission or
  by the acquire step.

This module never imports torch: the GPU manager is handed in by the GPU
tasks, so that the CPU worker, which imports this module, stays light.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from django.conf import settings
from django.db import connection
from django.utils import timezone

from chat import params
from chat.catalog import ModelChoice, endpoints, local_spec, local_specs_preload, model_resolve
from chat.dispatch import (
    ReplyHold, cancel_requested, cpu_generate_queue, message_dispatch, message_fail, message_finish,
    reply_claim_holder, reply_hold,
)
from chat.knowledge.retrieve import prompt_with_sources
from chat.metrics import gpu_wait_observe
from chat.models import Message, MessageStatus
from chat.relay import DeltaRelay, group_send, message_group
from chatsite.errors import error_code
from chatsite.ollama_client import OllamaModelMissing, ollama_chat_stream, ollama_tags
from chatsite.openai_client import openai_chat_stream
from gpu_manager.leases import LeaseKeeper, LeaseLost, Leases
from gpu_manager.scheduler import Item, ObservationBuffer, Scheduler

if TYPE_CHECKING:  # the GPU tasks hand it in; importing it would import torch
    from gpu_manager.manager import GpuManager

log = logging.getLogger(__name__)

#: Seconds between two reads of the cancel flag while tokens stream: often
#: enough that Stop feels immediate, rare enough to cost nothing per token.
CANCEL_POLL_SECONDS = 0.05
#: Seconds between two saves of a streaming reply's text, so that a page
#: reloaded mid-reply shows what was already sent.
SAVE_EVERY_SECONDS = 1.0


@dataclass
class Outcome:
    text: str
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: list[dict] | None = None  # OpenAI's form


def db_release() -> None:
    """Give this run's database connection back to the pool (PostgreSQL,
    chatsite/settings.py). A CPU worker streams hundreds of replies at once,
    each in its own greenlet with its own connection: a stream must not
    hold one of the pool's few while it waits on its upstream. A SQLite
    connection is a file handle, not a server's slot: it is kept until the
    task ends (Celery's Django fixup closes it), since opening one costs
    ~0.3 ms (its pragmas and Django's SQL functions)."""
    if connection.vendor != "sqlite":
        connection.close()


class _Run:
    """The bookkeeping of one streaming reply: deltas, first-token time,
    periodic saves, a rate-limited cancel check, and its claim.
    `streaming`: an external stream, which gives its database connection
    back after each write (`db_release`)."""

    def __init__(self, reply: Message, hold: ReplyHold, *, streaming: bool = False):
        self.reply = reply
        self.hold = hold
        self.streaming = streaming
        self.relay = DeltaRelay(reply.pk, on_flush=self._flushed)
        self._saved_at = time.monotonic()
        self._cancel_checked = time.monotonic()  # `reply_start` has just read the flag
        self._first_token_unsaved = False
        self._cancelled = False

    def _flushed(self, relay: DeltaRelay) -> None:
        if relay.seq == 1:
            # Written with the next save, or with the end: a
            # reply that ends within SAVE_EVERY_SECONDS costs one write less.
            self.reply.first_token_at = timezone.now()
            self._first_token_unsaved = True
        if time.monotonic() - self._saved_at >= SAVE_EVERY_SECONDS:
            Message.objects.filter(pk=self.reply.pk).update(content=relay.text, **self.first_token_fields())
            self._first_token_unsaved = False
            self._saved_at = time.monotonic()
            if self.streaming:
                db_release()

    def first_token_fields(self) -> dict:
        """The first token's time, while no save has written it yet: for
        the next write of the reply (a save, or its end)."""
        return {"first_token_at": self.reply.first_token_at} if self._first_token_unsaved else {}

    def known(self) -> dict:
        """What the metrics need of the reply, as this run knows it."""
        r = self.reply
        return {"model_name": r.model_name, "queued_at": r.queued_at, "started_at": r.started_at,
                "first_token_at": r.first_token_at}

    def should_stop(self) -> bool:
        """Cancelled, or the claim was taken over: stop generating now."""
        if self.hold.lost:
            return True
        now = time.monotonic()
        if not self._cancelled and now - self._cancel_checked >= CANCEL_POLL_SECONDS:
            self._cancel_checked = now
            self._cancelled = cancel_requested(self.reply.pk)
        return self._cancelled

    def past_deadline(self) -> bool:
        return time.monotonic() >= self.hold.deadline

    def superseded(self) -> bool:
        """Another run took the reply over (this one stalled past the claim's
        TTL): the reply is its to end, not this run's."""
        if self.hold.lost:
            log.warning("message %s: another run took this reply over; this one stops without ending it",
                        self.reply.pk)
        return self.hold.lost

    def fail(self, exc: Exception) -> None:
        """End the reply with the error, keeping the text already sent."""
        before = self.relay.take()
        self.hold.ended = message_fail(message_id=self.reply.pk, code=error_code(exc), detail=str(exc),
                                       content=self.relay.text, before=before, known=self.known(),
                                       **self.first_token_fields())

    def finish(self, outcome: Outcome) -> None:
        if self.superseded():
            return
        before = self.relay.take()  # the last text and the end: one group send
        self.hold.ended = message_finish(
            message_id=self.reply.pk, content=self.relay.text, finish_reason=outcome.finish_reason,
            prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens, before=before,
            known=self.known(), tool_calls=outcome.tool_calls, **self.first_token_fields())


def reply_start(message_id: int, choice: ModelChoice | None = None) -> tuple[Message, ModelChoice] | None:
    """The reply and its model (`choice`, when the sender resolved it and
    it is the reply's), marked running; None when there is nothing to do
    (already ended, or cancelled while it waited: a queued reply is ended
    by the cancel itself, so a fresh run reads no cancel flag here). The caller holds the
    reply's claim: read after taking it, the reply cannot end between this
    check and the generation (but for a cancel)."""
    reply = Message.objects.select_related("conversation").filter(pk=message_id).first()
    if reply is None or reply.is_finished:
        return None
    if choice is None or choice.name != reply.model_name:
        choice = model_resolve(reply.model_name)
    if reply.status == MessageStatus.QUEUED:
        reply.status, reply.started_at = MessageStatus.RUNNING, timezone.now()
        if not Message.objects.filter(pk=message_id, status=MessageStatus.QUEUED).update(
                status=reply.status, started_at=reply.started_at):
            return None  # cancelled while it waited (chat/dispatch.py message_cancel_queued)
    elif cancel_requested(message_id):
        # Started by an earlier run (now gone) and cancelled since.
        message_finish(message_id=message_id, content="", finish_reason="cancelled", prompt_tokens=0,
                       completion_tokens=0)
        return None
    return reply, choice


def history(reply: Message) -> list[dict]:
    """The conversation up to this reply, as OpenAI's chat messages: the
    `/v1` request's own when they carry more than text (tool calls, images:
    chat/completions.py), else the stored turns. Failed and cancelled
    replies are left out: they would teach the model nonsense."""
    messages = (reply.params or {}).get("messages")
    if not messages:
        turns = reply.conversation.messages.filter(pk__lt=reply.pk).exclude(
            role=Message.Role.ASSISTANT, status__in=[MessageStatus.ERROR, MessageStatus.QUEUED])
        messages = [{"role": m.role, "content": m.content} for m in turns if m.content]
    return prompt_with_sources(messages, reply.sources)  # CONTRACT §8: the same for every model kind


def request_options(reply: Message) -> dict:
    """The request's checked options (chat/params.py); none for the page's messages."""
    return (reply.params or {}).get("options") or {}


def switch_notifier(message_id: int) -> Callable[[str, dict], None]:
    """The GPU manager's progress, as `gpu.switch` frames to the reply's socket."""
    def notify(phase: str, payload: dict) -> None:
        event = {k: v for k, v in payload.items() if k not in ("before", "after")}
        group_send(message_group(message_id), {"type": "gpu.switch", "message": message_id, **event,
                                                "phase": phase})
    return notify


def ollama_urls() -> list[str]:
    return [e.base_url for e in endpoints() if e.kind == "ollama"]


# --- GPU worker -------------------------------------------------------------

def gpu_prelude(*, manager: GpuManager, scheduler: Scheduler, hint: int | None,
                on_pick: Callable[[int], None]) -> ReplyHold | None:
    """The GPU task prelude: take the request the scheduler picks, claim its
    reply and make the GPU ready for it. The pick need not be the message
    this task was queued with (`hint`): the queue counts the work, the
    scheduler orders it (gpu_manager/scheduler.py). A local model's claim is
    returned for the task body; an external model's generation is queued on
    the CPU queue under the lease it was granted. A pick with nothing to do
    (its reply ended, or another run holds it) does not use the task up.

    `on_pick(message_id)` names the picked reply to the task (its failure
    ends that reply; the state's `current` names it)."""
    adopted = False
    while True:
        pick = scheduler.next()
        if pick.kind == "wait":  # Ollama's visit goes on until it ends or the gate closes
            time.sleep(manager.timings.lease_poll)
            continue
        if pick.kind == "idle":
            if hint and not adopted and _unscheduled(hint):
                # Queued before the scheduler knew it (an upgrade, or a wait
                # entry lost while its task survived): admit it now.
                adopted = True
                model_name, batch_line = Message.objects.filter(pk=hint).values_list(
                    "model_name", "batch_line__id").get()
                message_dispatch(message_id=hint, choice=model_resolve(model_name),
                                 priority=settings.BATCH_PRIORITY if batch_line else None)
                continue
            return None
        on_pick(pick.item.message_id)
        try:
            served, hold = _gpu_serve(pick.item, manager=manager, scheduler=scheduler, switch=pick.switch)
        finally:
            if pick.switch:
                scheduler.handover_done()
        if served:
            return hold


def _unscheduled(message_id: int) -> bool:
    """A reply still queued that no run holds (this task's own message, when
    the scheduler has nothing left: was it ever admitted?). A reply a pick
    served is running (`reply_start`), even before its CPU worker claims it."""
    status = Message.objects.filter(pk=message_id).values_list("status", flat=True).first()
    if status not in (MessageStatus.QUEUED, MessageStatus.RUNNING):
        return False
    holder = reply_claim_holder(message_id)
    if holder is not None:
        log.info("message %s: another run is working on this reply (%s); this delivery does nothing",
                 message_id, holder)
        return False
    return status == MessageStatus.QUEUED


def _gpu_serve(item: Item, *, manager: GpuManager, scheduler: Scheduler,
               switch: bool) -> tuple[bool, ReplyHold | None]:
    """Serve one picked request: (served, the claim for the task body)."""
    hold = reply_hold(item.message_id)
    if hold is None:
        return False, None
    try:
        started = reply_start(item.message_id)
        if started is None:
            hold.stop()
            return False, None
        reply, choice = started
        previous = manager.store.read().owner if switch else item.owner
        began = time.perf_counter()
        if choice.kind == "local":
            manager.prepare_local(spec=local_spec(choice.name), preload=local_specs_preload(),
                                  ollama_urls=ollama_urls(), on_event=switch_notifier(item.message_id))
        else:
            _external_acquire(choice, item.message_id, manager)
        if previous != choice.kind:
            # The switch's own cost, without the wait for Ollama's
            # generations to end (that is Ollama's visit, not the switch).
            scheduler.observe("switch:local" if choice.kind == "local" else "switch:external",
                              time.perf_counter() - began - manager.lease_waited)
        gpu_wait_observe(slot=manager.slot, owner=choice.kind, seconds=time.time() - item.arrived)
    except BaseException:
        hold.stop()
        raise
    if choice.kind == "local":
        hold.choice = choice  # the body generates with it: the model is resolved once here
        return True, hold
    hold.stop()
    options = {"priority": settings.BATCH_PRIORITY} if item.batch else {}
    cpu_generate_queue(item.message_id, choice, **options)
    return True, None


def local_reply_generate(*, message_id: int | None, hold: ReplyHold | None, manager: GpuManager,
                         scheduler: Scheduler) -> None:
    """The GPU task body: generate with the engine its prelude made resident."""
    if hold is None:  # the prelude found nothing to do, or another run holds the reply
        return
    with hold:
        reply = Message.objects.select_related("conversation").filter(pk=message_id).first()
        if reply is None or reply.is_finished:
            return
        choice = hold.choice or model_resolve(reply.model_name)
        run = _Run(reply, hold)
        began = time.perf_counter()
        try:
            result = manager.engine(choice.name).generate(
                params.local_messages(history(reply)), on_text=run.relay.push, should_stop=run.should_stop,
                deadline=hold.deadline, **params.local_arguments(request_options(reply), choice.generation),
            )
        except Exception as exc:
            if run.superseded():  # the reply, and its end, are the other run's
                return
            run.fail(exc)
            if error_code(exc) == "invalid_request":
                # The model cannot do what the request asks (tools its template
                # does not take, a token id beyond its vocabulary): the caller's
                # 400, not a failure of the task.
                log.info("message %s: refused: %s", message_id, exc)
                return
            raise
        scheduler.observe("serve:local", time.perf_counter() - began)
        calls = [params.tool_call(c["name"], c["arguments"]) for c in result.tool_calls] or None
        run.finish(Outcome(result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens,
                           calls))


def _external_acquire(choice: ModelChoice, message_id: int, manager: GpuManager) -> None:
    """Free the GPU for an external model. For Ollama, check first that it
    answers and has the model: evicting the local model for a request that
    cannot run would cost a reload for nothing."""
    # Asked live unless the GPU is already Ollama's for this very model
    # (checked when it got it): one request less per message in a run
    # of Ollama messages (docs/BENCHMARKS.md, finding 1), and the state
    # never lists a model Ollama was not seen to have.
    if (choice.kind == "ollama"
            and (manager.resident() or choice.upstream not in manager.store.read().ollama_models)
            and choice.upstream not in ollama_tags(choice.base_url)):
        raise OllamaModelMissing(f"Ollama at {choice.base_url} does not have {choice.upstream}")
    manager.acquire_external(owner=choice.kind, holder=message_id,
                             ollama_model=choice.upstream if choice.kind == "ollama" else None,
                             on_event=switch_notifier(message_id))


# --- CPU workers ------------------------------------------------------------

def external_reply_generate(*, message_id: int, choice: ModelChoice | None = None) -> None:
    hold = reply_hold(message_id)
    if hold is None:  # another run streams this reply, under its own GPU lease
        return
    leases = Leases(slot=settings.OLLAMA_GPU_SLOT)
    kept = False  # the lease keeper, once it ran, has released the lease
    with hold:
        try:
            started = reply_start(message_id, choice)
            if started is None:
                return
            reply, choice = started
            run = _Run(reply, hold, streaming=True)
            if choice.kind == "ollama":
                # The lease granted at admission or by the acquire step keeps
                # local models off the GPU while Ollama generates; without it,
                # it must not run.
                began, final = time.perf_counter(), {}
                try:
                    with LeaseKeeper(leases, message_id, ttl=settings.GPU_LEASE_TTL) as keeper:
                        kept = True
                        _stream(run, _ollama_chunks(choice, reply, final), lease=keeper)
                except LeaseLost as exc:
                    if not run.superseded():
                        message_fail(message_id=message_id, code=exc.code, detail=str(exc))
                else:
                    _ollama_observe(time.perf_counter() - began, final.get("load_seconds", 0.0))
            else:
                _stream(run, _openai_chunks(choice, reply))
        finally:
            # Whatever happened (cancelled while queued, an error before the
            # stream), the GPU is not held a moment longer than the generation.
            if not kept:
                leases.release(message_id)


def _stream(run: _Run, chunks: Iterator[tuple[str, str, int, int]], *, lease: LeaseKeeper | None = None) -> None:
    outcome = Outcome(text="", finish_reason="stop")
    upstream_ended = False
    try:
        for text, finish, prompt_tokens, completion_tokens, tool_calls in chunks:
            if lease is not None and lease.lost:
                raise LeaseLost(f"the GPU lease of message {run.reply.pk} expired while it streamed")
            run.relay.push(text)
            outcome.tool_calls = tool_calls or outcome.tool_calls
            outcome.finish_reason = finish or outcome.finish_reason
            outcome.prompt_tokens = prompt_tokens or outcome.prompt_tokens
            outcome.completion_tokens = completion_tokens or outcome.completion_tokens
            upstream_ended = upstream_ended or bool(finish)
            if run.should_stop():
                outcome.finish_reason = "cancelled"
                break
            # Checked between chunks: a stalled upstream is bounded by
            # UPSTREAM_READ_TIMEOUT instead (GENERATION_DEADLINE_SECONDS).
            # Not after the upstream's own end: only its usage chunk is left.
            if not upstream_ended and run.past_deadline():
                outcome.finish_reason = "length"
                break
    except Exception as exc:
        if run.superseded():  # the reply, and its end, are the other run's
            return
        run.fail(exc)
        raise
    finally:
        chunks.close()  # closes the HTTP response: the upstream stops generating
    run.finish(outcome)


#: An Ollama reply whose model load took longer than this followed a switch
#: to Ollama: its load is that switch's second half (a resident model
#: reports a load of microseconds).
OLLAMA_SWITCH_LOAD_SECONDS = 0.05


@functools.cache
def _observations() -> ObservationBuffer:
    return ObservationBuffer(period=settings.GPU_OBSERVE_FLUSH_SECONDS)


def _ollama_observe(seconds: float, load_seconds: float) -> None:
    """Feed the scheduler of Ollama's GPU: how long a generation held the
    GPU, and Ollama's own load when this reply paid for one (sent in
    batches: `ObservationBuffer`)."""
    slot = settings.OLLAMA_GPU_SLOT
    _observations().add(slot=slot, what="serve:ollama", seconds=seconds)
    if load_seconds >= OLLAMA_SWITCH_LOAD_SECONDS:
        _observations().add(slot=slot, what="load:ollama", seconds=load_seconds)


#: One step of an external stream: text, finish reason ("" until the end),
#: prompt and completion tokens (0 until known), tool calls (OpenAI's form).
Chunk = tuple[str, str, int, int, "list[dict] | None"]


def _ollama_chunks(choice: ModelChoice, reply: Message, final: dict) -> Iterator[Chunk]:
    arguments = params.ollama_arguments(request_options(reply), choice.generation)
    messages = params.ollama_messages(history(reply))
    db_release()  # the first token may be seconds away (Ollama loading the model)
    calls: list[dict] = []
    for chunk in ollama_chat_stream(choice.base_url, model=choice.upstream, messages=messages, **arguments):
        # Ollama sends a call whole, in a chunk of its own, before the last.
        calls += [params.tool_call(c["name"], c["arguments"]) for c in chunk.tool_calls]
        finish = ""
        if chunk.done:
            final["load_seconds"] = chunk.load_seconds
            finish = "length" if chunk.done_reason == "length" else ("tool_calls" if calls else "stop")
        yield chunk.text, finish, chunk.prompt_tokens, chunk.completion_tokens, (calls or None) if chunk.done else None


def _openai_chunks(choice: ModelChoice, reply: Message) -> Iterator[Chunk]:
    messages = history(reply)
    db_release()
    for chunk in openai_chat_stream(choice.base_url, choice.api_key, model=choice.upstream, messages=messages,
                                    arguments=params.openai_arguments(request_options(reply), choice.generation)):
        yield chunk.text, chunk.finish_reason, chunk.prompt_tokens, chunk.completion_tokens, chunk.tool_calls
