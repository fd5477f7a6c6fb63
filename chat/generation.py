"""Running one reply: the GPU prelude, local generation on the GPU worker,
and external generation (Ollama, OpenAI-compatible) on the CPU workers.

Every entry point takes a message id, finds the reply, and ends it exactly
once with `chat.done` or `chat.error` (see `message_finish` / `message_fail`).
A reply that has already ended (a re-delivered task) is left alone.

Only one run works on a reply at a time: a run first takes the reply's
claim (`reply_claim`), keeps it while it works and releases it when the
reply has ended. A task delivered again while the claim is live (the
broker's visibility timeout passed, or something re-dispatched the reply)
does nothing. A claim whose holder died (SIGKILL) expires after
GPU_LEASE_TTL; a later delivery takes the reply over. Each run also stops
generating GENERATION_DEADLINE_SECONDS after it took the claim.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator

from django.conf import settings
from django.utils import timezone

from chat.catalog import CatalogError, ModelChoice, endpoints, model_resolve
from chat.models import Message, MessageStatus, ModelConfig, ModelKind
from chat.openai_endpoint import openai_chat_stream
from chat.relay import DeltaRelay, group_send, message_group
from chatsite.redis_client import redis_client
from chat.services import (
    DISPATCHED_KEY, REDISPATCH_LOCK_KEY, cancel_requested, message_dispatch, message_fail, message_finish,
)
from gpu_manager.leases import Claims, Keeper, LeaseKeeper, LeaseLost, Leases
from gpu_manager.manager import GpuManager, LocalSpec
from gpu_manager.ollama import OllamaModelMissing, ollama_chat_stream, ollama_tags

log = logging.getLogger(__name__)

#: Seconds between two reads of the cancel flag while tokens stream: often
#: enough that Stop feels immediate, rare enough to cost nothing per token.
CANCEL_POLL_SECONDS = 0.05
#: Seconds between two saves of a streaming reply's text, so that a page
#: reloaded mid-reply shows what was already sent.
SAVE_EVERY_SECONDS = 1.0


# --- the reply's claim ---------------------------------------------------------

@functools.cache
def _claims() -> Claims:
    return Claims(prefix="chat:reply-claim")


def _claim_ttl() -> float:
    # A claim is a lease on a reply: renewed like the GPU lease, and with the
    # same TTL, so a dead holder is noticed as fast as a dead lease holder.
    return settings.GPU_LEASE_TTL


def reply_claim(message_id: int) -> str | None:
    """Take the exclusive claim on a reply: a token, or None while another
    run holds it. The claim expires after GPU_LEASE_TTL unless renewed with
    `reply_claim_renew`; end it with `reply_release`. Any code that is about
    to generate, end or re-dispatch a reply takes it first."""
    return _claims().take(message_id, ttl=_claim_ttl())


def reply_claim_renew(message_id: int, token: str) -> bool:
    """Extend the claim for another GPU_LEASE_TTL; False when it is no longer
    this token's (it expired and another run took it over)."""
    try:
        _claims().renew(message_id, token, ttl=_claim_ttl())
    except LeaseLost:
        return False
    return True


def reply_release(message_id: int, token: str) -> bool:
    """End the claim, if `token` still holds it (never another run's)."""
    return _claims().release(message_id, token)


def reply_claim_holder(message_id: int) -> str | None:
    """The token of the live claim on a reply (it names the holder's host
    and process), or None when no run works on it."""
    return _claims().holder(message_id)


class _ReplyHold(Keeper):
    """A run's claim on its reply, renewed from a thread until `stop()`, and
    the run's deadline (time.monotonic())."""

    def __init__(self, message_id: int, token: str):
        super().__init__(name=f"reply-claim-{message_id}", ttl=_claim_ttl(),
                         renew=lambda: _claims().renew(message_id, token, ttl=_claim_ttl()),
                         release=lambda: reply_release(message_id, token))
        self.message_id = message_id
        self.deadline = time.monotonic() + settings.GENERATION_DEADLINE_SECONDS


def _reply_hold(message_id: int) -> _ReplyHold | None:
    """Claim the reply and keep the claim alive until the hold is stopped;
    None when another run holds it, and then this delivery must not touch
    the reply at all."""
    token = reply_claim(message_id)
    if token is None:
        log.info("message %s: another run is working on this reply (%s); this delivery does nothing",
                 message_id, reply_claim_holder(message_id))
        return None
    return _ReplyHold(message_id, token).start()


@dataclass
class Outcome:
    text: str
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Run:
    """The bookkeeping of one streaming reply: deltas, first-token time,
    periodic saves, a rate-limited cancel check, and its claim."""

    def __init__(self, reply: Message, hold: _ReplyHold):
        self.reply = reply
        self.hold = hold
        self.relay = DeltaRelay(reply.pk, on_flush=self._flushed)
        self._saved_at = time.monotonic()
        self._cancel_checked = 0.0
        self._cancelled = False

    def _flushed(self, relay: DeltaRelay) -> None:
        if relay.seq == 1:
            Message.objects.filter(pk=self.reply.pk).update(first_token_at=timezone.now())
        if time.monotonic() - self._saved_at >= SAVE_EVERY_SECONDS:
            Message.objects.filter(pk=self.reply.pk).update(content=relay.text)
            self._saved_at = time.monotonic()

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
        self.relay.flush()
        message_fail(message_id=self.reply.pk, code=error_code(exc), detail=str(exc), content=self.relay.text)

    def finish(self, outcome: Outcome) -> None:
        if self.superseded():
            return
        self.relay.flush()
        message_finish(message_id=self.reply.pk, content=self.relay.text, finish_reason=outcome.finish_reason,
                       prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens)


def error_code(exc: BaseException) -> str:
    """The `chat.error` code for an exception: our errors carry one."""
    return getattr(exc, "code", "internal_error")


def reply_start(message_id: int) -> tuple[Message, ModelChoice] | None:
    """The reply and its model, marked running; None when there is nothing
    to do (already ended, or cancelled while it waited). The caller holds
    the reply's claim: read after taking it, the reply cannot end between
    this check and the generation (but for a cancel)."""
    reply = Message.objects.select_related("conversation").filter(pk=message_id).first()
    if reply is None or reply.is_finished:
        return None
    if cancel_requested(message_id):
        message_finish(message_id=message_id, content="", finish_reason="cancelled", prompt_tokens=0,
                       completion_tokens=0)
        return None
    choice = model_resolve(reply.model_name)
    if reply.status == MessageStatus.QUEUED:
        reply.status, reply.started_at = MessageStatus.RUNNING, timezone.now()
        Message.objects.filter(pk=message_id, status=MessageStatus.QUEUED).update(
            status=reply.status, started_at=reply.started_at)
    return reply, choice


def history(reply: Message) -> list[dict]:
    """The conversation up to this reply, as chat messages. Failed and
    cancelled replies are left out: they would teach the model nonsense."""
    turns = reply.conversation.messages.filter(pk__lt=reply.pk).exclude(
        role=Message.Role.ASSISTANT, status__in=[MessageStatus.ERROR, MessageStatus.QUEUED])
    return [{"role": m.role, "content": m.content} for m in turns if m.content]


def switch_notifier(message_id: int) -> Callable[[str, dict], None]:
    def notify(phase: str, payload: dict) -> None:
        event = {k: v for k, v in payload.items() if k not in ("before", "after")}
        group_send(message_group(message_id), {"type": "gpu.switch", "message": message_id, **event,
                                                "phase": phase})
    return notify


def local_spec(name: str) -> LocalSpec:
    config = ModelConfig.objects.get(kind=ModelKind.LOCAL, name=name)
    return LocalSpec(name=config.name, path=config.path, keep_alive=float(config.keep_alive),
                     warm_offload=config.warm_offload)


def local_specs_preload() -> list[LocalSpec]:
    return [local_spec(name) for name in ModelConfig.objects.filter(
        kind=ModelKind.LOCAL, enabled=True, preload=True).values_list("name", flat=True)]


def ollama_urls() -> list[str]:
    return [e.base_url for e in endpoints() if e.kind == "ollama"]


# --- GPU worker -------------------------------------------------------------

#: The claims this GPU worker's task preludes took, for their task bodies
#: (`local_reply_generate`): both run in the solo pool's one thread, one
#: task at a time.
_held: dict[int, _ReplyHold] = {}


def gpu_prepare_for_reply(*, message_id: int, manager: GpuManager) -> None:
    """The GPU task prelude: claim the reply and make the requested local
    model resident. The claim passes to the task body, which releases it."""
    for stale in _held.values():  # a body that never ran (none should)
        stale.stop()
    _held.clear()
    hold = _reply_hold(message_id)
    if hold is None:
        return
    try:
        started = reply_start(message_id)
        if started is None:
            hold.stop()
            return
        reply, choice = started
        manager.prepare_local(spec=local_spec(choice.name), preload=local_specs_preload(),
                              ollama_urls=ollama_urls(), on_event=switch_notifier(message_id))
    except BaseException:
        hold.stop()
        raise
    _held[message_id] = hold


def gpu_acquire_for_reply(*, message_id: int, manager: GpuManager) -> None:
    """Free the GPU for an external model, in queue order. For Ollama, check
    first that it answers and has the model: evicting the local model for a
    request that cannot run would cost a reload for nothing. A delivery
    that finds the reply claimed (its generation streams) does nothing: it
    must not grant a second lease or switch the GPU under it."""
    hold = _reply_hold(message_id)
    if hold is None:
        return
    with hold:
        started = reply_start(message_id)
        if started is None:
            return
        reply, choice = started
        # Asked live unless the GPU is already Ollama's for this very model
        # (checked when it got it): one request less per message in a run
        # of Ollama messages (BENCHMARKS finding 1), and the state never
        # lists a model Ollama was not seen to have.
        if (choice.kind == "ollama"
                and (manager.resident() or choice.upstream not in manager.store.read().ollama_models)
                and choice.upstream not in ollama_tags(choice.base_url)):
            raise OllamaModelMissing(f"Ollama at {choice.base_url} does not have {choice.upstream}")
        manager.acquire_external(owner=choice.kind, holder=message_id,
                                 ollama_model=choice.upstream if choice.kind == "ollama" else None,
                                 on_event=switch_notifier(message_id))


def replies_redispatch_lost() -> list[int]:
    """Queue again the replies whose work is in no queue and under way
    nowhere: unfinished more than REPLY_REDISPATCH_AFTER_SECONDS after they
    were queued, missing from the dispatch ledger (Redis crashed without its
    append-only file, or was flushed or replaced, and took their tasks), and
    claimed by no run (a live run renews its claim, into the new Redis too).
    Called by the GPU workers' housekeeping; one pass per period across all
    of them (a lock). A duplicate delivery is harmless: one run at a time
    claims a reply, and a finished one is skipped (reply_start)."""
    r = redis_client()
    after = settings.REPLY_REDISPATCH_AFTER_SECONDS
    period_ms = int(1000 * max(settings.GPU_HOUSEKEEPING_SECONDS, after / 4))
    if not r.set(REDISPATCH_LOCK_KEY, "1", nx=True, px=period_ms):
        return []
    unfinished = [MessageStatus.QUEUED, MessageStatus.RUNNING]
    waiting = list(
        Message.objects.filter(role=Message.Role.ASSISTANT, status__in=unfinished,
                               queued_at__lt=timezone.now() - timedelta(seconds=after))
        .values_list("pk", "model_name", "batch_line__id")[:500]
    )
    if not waiting:
        return []
    ledger = set(r.hkeys(DISPATCHED_KEY))
    lost = [(pk, model, line) for pk, model, line in waiting
            if str(pk) not in ledger and reply_claim_holder(pk) is None]
    for message_id, model_name, batch_line in lost:
        log.warning("message %s: its task is in no queue (Redis lost it); queued again", message_id)
        try:
            choice = model_resolve(model_name)
        except CatalogError as exc:
            message_fail(message_id=message_id, code=exc.code, detail=str(exc))
            continue
        message_dispatch(message_id=message_id, choice=choice,
                         priority=settings.BATCH_PRIORITY if batch_line else None)
    return [message_id for message_id, *_ in lost]


def gpu_worker_recover(*, manager: GpuManager) -> None:
    """At GPU worker start: repair the state, and end the reply the previous
    worker was on when it died (its task is only redelivered after the
    broker's visibility timeout, and would then find the reply ended)."""
    manager.repair()
    message_id = manager.store.current()
    if message_id is not None:
        message_fail(message_id=message_id, code="worker_restarted",
                     detail="The GPU worker restarted during this reply. Please send the message again.")
        manager.store.current_set(None)


def replies_fail_lost(holders: list[str]) -> None:
    """The GPU leases of these replies expired: the worker streaming them died."""
    for holder in holders:
        message_fail(message_id=int(holder), code="worker_lost",
                     detail="The worker streaming this reply stopped. Please send the message again.")


def local_reply_generate(*, message_id: int, manager: GpuManager) -> None:
    hold = _held.pop(message_id, None)
    if hold is None:  # the prelude found nothing to do, or another run holds the reply
        return
    with hold:
        reply = Message.objects.select_related("conversation").filter(pk=message_id).first()
        if reply is None or reply.is_finished:
            return
        choice = model_resolve(reply.model_name)
        run = _Run(reply, hold)
        gen = choice.generation
        try:
            result = manager.engine(choice.name).generate(
                history(reply), max_new_tokens=gen["max_new_tokens"], temperature=gen["temperature"],
                top_p=gen["top_p"], on_text=run.relay.push, should_stop=run.should_stop, deadline=hold.deadline,
            )
        except Exception as exc:
            if run.superseded():  # the reply, and its end, are the other run's
                return
            run.fail(exc)
            raise
        run.finish(Outcome(result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens))


# --- CPU workers ------------------------------------------------------------

def external_reply_generate(*, message_id: int) -> None:
    hold = _reply_hold(message_id)
    if hold is None:  # another run streams this reply, under its own GPU lease
        return
    leases = Leases(slot=settings.OLLAMA_GPU_SLOT)
    with hold:
        try:
            started = reply_start(message_id)
            if started is None:
                return
            reply, choice = started
            run = _Run(reply, hold)
            if choice.kind == "ollama":
                # The lease granted by the acquire step keeps local models off
                # the GPU while Ollama generates; without it, it must not run.
                try:
                    with LeaseKeeper(leases, message_id, ttl=settings.GPU_LEASE_TTL) as keeper:
                        _stream(run, _ollama_chunks(choice, reply), lease=keeper)
                except LeaseLost as exc:
                    if not run.superseded():
                        message_fail(message_id=message_id, code=exc.code, detail=str(exc))
            else:
                _stream(run, _openai_chunks(choice, reply))
        finally:
            # Whatever happened (cancelled while queued, an error before the
            # stream), the GPU is not held a moment longer than the generation.
            leases.release(message_id)


def _stream(run: _Run, chunks: Iterator[tuple[str, str, int, int]], *, lease: LeaseKeeper | None = None) -> None:
    outcome = Outcome(text="", finish_reason="stop")
    upstream_ended = False
    try:
        for text, finish, prompt_tokens, completion_tokens in chunks:
            if lease is not None and lease.lost:
                raise LeaseLost(f"the GPU lease of message {run.reply.pk} expired while it streamed")
            run.relay.push(text)
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


def _ollama_chunks(choice: ModelChoice, reply: Message) -> Iterator[tuple[str, str, int, int]]:
    gen = choice.generation
    options = {"num_predict": gen["max_new_tokens"], "temperature": gen["temperature"], "top_p": gen["top_p"]}
    for chunk in ollama_chat_stream(choice.base_url, model=choice.upstream, messages=history(reply),
                                    options=options):
        finish = ("length" if chunk.done_reason == "length" else "stop") if chunk.done else ""
        yield chunk.text, finish, chunk.prompt_tokens, chunk.completion_tokens


def _openai_chunks(choice: ModelChoice, reply: Message) -> Iterator[tuple[str, str, int, int]]:
    gen = choice.generation
    for chunk in openai_chat_stream(choice.base_url, choice.api_key, model=choice.upstream,
                                    messages=history(reply), max_tokens=gen["max_new_tokens"],
                                    temperature=gen["temperature"], top_p=gen["top_p"]):
        finish = "length" if chunk.finish_reason == "length" else ("stop" if chunk.finish_reason else "")
        yield chunk.text, finish, chunk.prompt_tokens, chunk.completion_tokens
