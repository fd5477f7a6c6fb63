"""A reply's way from the queue to its end, in one place: which worker gets
it (placement), the dispatch ledger, the claim a run holds on it, its one
ending (`message_finish` / `message_fail`), and the redispatch of replies
whose tasks Redis lost.

Placement. Each GPU has one worker, on its own queue `gpu.<slot>`:
- a local model goes to a slot where it is resident already (no load), else
  to the least busy slot (queued + running), so that two local models are
  served in parallel by two GPUs instead of swapping on one;
- Ollama's work, and external models that free the GPU, go to the slot whose
  GPU Ollama shares (OLLAMA_GPU_SLOT): Ollama places its models on the GPU it
  was started on (docs/gpu-arbitration.md, "Several GPUs").

The ledger. A hash of the replies whose work is queued or under way, from
`message_dispatch` until the reply ends. It lives in the same Redis as the
queues, so when Redis comes back empty both are gone, and an unfinished
reply missing from it, which no run claims, is one whose task was lost
(`replies_redispatch_lost`).

The claim. Only one run works on a reply at a time: a run takes the reply's
claim (`reply_claim`), keeps it while it works (`ReplyHold`) and releases it
when the reply has ended. A task delivered again while the claim is live
(the broker's visibility timeout passed, or the reply was redispatched) does
nothing. A claim whose holder died (SIGKILL) expires after GPU_LEASE_TTL; a
later delivery takes the reply over.

Keys: chat:dispatched (hash id -> queued at), chat:redispatch-lock,
chat:reply-claim:<id> (gpu_manager/leases.py Claims), chat:cancel:<id>,
worker:alive:<queue>:<hostname> (the workers' heartbeats, workers/lifecycle.py).
"""
from __future__ import annotations

import functools
import logging
import time
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from chat.catalog import PREFIXES, CatalogError, ModelChoice, model_resolve
from chat.metrics import STAGES, message_observe
from chat.models import FINISHED_STATUSES, Message, MessageStatus
from chat.relay import group_send, message_group
from chatsite import queues
from chatsite.celery import app
from chatsite.redis_client import redis_client
from gpu_manager.leases import Claims, Keeper, LeaseLost
from gpu_manager.scheduler import Admission, slot_scheduler
from gpu_manager.state import GpuStateStore

log = logging.getLogger(__name__)

DISPATCHED_KEY = "chat:dispatched"
REDISPATCH_LOCK_KEY = "chat:redispatch-lock"
CLAIM_PREFIX = "chat:reply-claim"
CANCEL_PREFIX = "chat:cancel"
WORKER_ALIVE_PREFIX = "worker:alive"


# --- placement ----------------------------------------------------------------

def worker_alive_key(*, queue: str, hostname: str) -> str:
    """The key a worker refreshes while it lives (workers/lifecycle.py)."""
    return f"{WORKER_ALIVE_PREFIX}:{queue}:{hostname}"


def workers_alive() -> dict[str, list[str]]:
    """Queue name -> hostnames of the workers consuming it now."""
    alive: dict[str, list[str]] = {}
    for key in redis_client().scan_iter(match=f"{WORKER_ALIVE_PREFIX}:*", count=100):
        queue, hostname = key.removeprefix(f"{WORKER_ALIVE_PREFIX}:").split(":", 1)
        alive.setdefault(queue, []).append(hostname)
    return alive


def gpu_slots_alive() -> list[str]:
    """Slots whose GPU worker is alive now; the configured one when none is
    (a message then waits in its queue for the worker to come)."""
    prefix = queues.GPU_QUEUE_PREFIX
    alive = [q.removeprefix(prefix) for q in workers_alive() if q.startswith(prefix)]
    return sorted(alive) or [settings.GPU_SLOT]


def slot_for_local(name: str) -> str:
    slots = gpu_slots_alive()
    states = {slot: GpuStateStore(slot=slot).read() for slot in slots}
    for slot in slots:
        if name in states[slot].local_models:
            return slot
    return min(slots, key=lambda s: (_busy(s), len(states[s].local_models), s))


def _busy(slot: str) -> int:
    """Messages queued for the slot (every priority list) plus the one running."""
    running = 1 if GpuStateStore(slot=slot).current() is not None else 0
    return queue_depth(queues.gpu_queue(slot)) + running


def queue_depth(queue: str) -> int:
    """Tasks waiting in a queue, over every priority list: kombu keeps a
    queue's priority steps as lists named queue + \\x06\\x16 + step."""
    r = redis_client()
    return sum(r.llen(name) for name in [queue, *r.scan_iter(match=f"{queue}\x06\x16*")])


# --- dispatch and the ledger ----------------------------------------------------

def message_dispatch(*, message_id: int, choice: ModelChoice, priority: int | None = None,
                     retrieve: bool = False) -> Admission | None:
    """Queue the work for a reply, and note it in the ledger.

    A request for a GPU (a local model, or an external model that needs
    the GPU freed) is admitted by that GPU's scheduler (gpu_manager/
    scheduler.py): a local model's request waits in the scheduler's order,
    with one task on the slot's queue that wakes the GPU worker; an external
    one whose owner holds the GPU while the gate is open takes its lease at
    once and goes straight to a CPU worker (no GPU-queue hop); one whose
    projected wait is over GPU_MAX_WAIT_SECONDS ends at once with
    `gpu_busy` and its estimate. The caller shows a waiting request its
    place (`queued_frame`).

    `retrieve`: the reply draws on knowledge bases and has no sources yet:
    its first step is their retrieval, on the knowledge worker.

    `priority` (batch lines: settings.BATCH_PRIORITY) goes on every step
    and ranks the line behind interactive work in the scheduler. A broker
    that refuses ends the reply with `queue_unavailable`: it must not sit
    queued forever. Returns the admission (None: no GPU involved).
    """
    options = {} if priority is None else {"priority": priority}
    admission = None
    try:
        redis_client().hset(DISPATCHED_KEY, str(message_id), f"{time.time():.3f}")
        if retrieve:
            # The knowledge worker finds the passages, then dispatches the
            # reply again without `retrieve` (chat/knowledge/retrieve.py).
            kwargs = {"choice": choice.as_task_kwargs(), "priority": priority}
            app.signature(queues.KNOWLEDGE_RETRIEVE, args=(message_id,), kwargs=kwargs,
                          queue=queues.KNOWLEDGE_QUEUE, **options).apply_async()
            return None
        local = choice.kind == "local"
        if local or choice.needs_gpu_owner:
            slot = slot_for_local(choice.name) if local else settings.OLLAMA_GPU_SLOT
            admission = slot_scheduler(slot).admit(
                message_id=message_id, owner=choice.kind, model=choice.name if local else choice.upstream,
                batch=priority is not None, lease_ttl=settings.GPU_LEASE_PENDING_TTL)
            if admission.kind == "busy":
                message_fail(message_id=message_id, code="gpu_busy", detail=_busy_detail(admission))
            elif admission.kind == "fast":
                cpu_generate_queue(message_id, choice, **options)
            else:
                task = queues.GPU_GENERATE if local else queues.GPU_ACQUIRE
                app.signature(task, args=(message_id,), queue=queues.gpu_queue(slot), **options).apply_async()
        else:
            cpu_generate_queue(message_id, choice, **options)
    except Exception as exc:  # the broker refused: see the docstring
        log.exception("could not queue message %s", message_id)
        message_fail(message_id=message_id, code="queue_unavailable", detail=f"Could not queue the message: {exc}")
    return admission


def cpu_generate_queue(message_id: int, choice: ModelChoice, **options) -> None:
    """Queue an external reply's generation on the CPU workers, with its
    model as resolved here when it carries no secret."""
    fields = choice.as_task_kwargs()
    kwargs = {"choice": fields} if fields is not None else {}
    app.signature(queues.CPU_GENERATE, args=(message_id,), kwargs=kwargs, **options).apply_async()


def queued_frame(message_id: int, admission: Admission | None) -> dict | None:
    """The `gpu.switch` frame (phase `queued`) that tells a waiting request's
    socket its place, whose the GPU is, and about when its turn comes; None
    when it does not wait. Sent by the consumer that accepted the message,
    right after `chat.accepted`: before any frame of the worker's."""
    if admission is None or not admission.waits:
        return None
    return {"type": "gpu.switch", "message": message_id, "phase": "queued", "owner": admission.owner,
            "position": admission.position, "eta_seconds": round(admission.eta, 1)}


def _busy_detail(admission: Admission) -> str:
    owner = {"local": "the local models'", "ollama": "Ollama's", "openai": "an OpenAI endpoint's"}.get(
        admission.owner, "free")
    return (f"The GPU is busy: it is {owner}, and this message would wait about {admission.eta:.0f} s "
            f"(more than the {settings.GPU_MAX_WAIT_SECONDS:.0f} s allowed). Please try again later.")


def dispatch_forget(message_id: int, *, cancelled: bool = False) -> None:
    """The reply ended. Best effort: an entry left behind is harmless (the
    ledger is only read for unfinished replies). A cancelled reply's cancel
    flag goes too, in the same round trip: message ids can come again (a
    database whose sequence restarts, SQLite reusing the highest id after a
    delete), and a flag left for CHAT_CANCEL_TTL would stop a new reply of
    the same id that a run finds already started (`reply_start`)."""
    try:
        if cancelled:
            redis_client().pipeline(transaction=False).hdel(DISPATCHED_KEY, str(message_id)).delete(
                cancel_key(message_id)).execute()
        else:
            redis_client().hdel(DISPATCHED_KEY, str(message_id))
    except Exception:
        log.warning("message %s: could not remove it from the dispatch ledger", message_id, exc_info=True)


def replies_redispatch_lost() -> list[int]:
    """Queue again the replies whose work is in no queue and under way
    nowhere: unfinished more than REPLY_REDISPATCH_AFTER_SECONDS after they
    were queued, missing from the ledger (Redis crashed without its
    append-only file, or was flushed or replaced, and took their tasks), and
    claimed by no run (a live run renews its claim, into the new Redis too).
    Called by the GPU workers' housekeeping; one pass per period across all
    of them (a lock). A duplicate delivery is harmless: one run at a time
    claims a reply, and a finished one is skipped."""
    r = redis_client()
    after = settings.REPLY_REDISPATCH_AFTER_SECONDS
    period_ms = int(1000 * max(settings.GPU_HOUSEKEEPING_SECONDS, after / 4))
    if not r.set(REDISPATCH_LOCK_KEY, "1", nx=True, px=period_ms):
        return []
    waiting = list(
        Message.objects.filter(role=Message.Role.ASSISTANT, status__in=[MessageStatus.QUEUED, MessageStatus.RUNNING],
                               queued_at__lt=timezone.now() - timedelta(seconds=after))
        .values_list("pk", "model_name", "batch_line__id", "knowledge", "sources")[:500]
    )
    if not waiting:
        return []
    ledger = set(r.hkeys(DISPATCHED_KEY))
    lost = [(pk, model, line, bool(knowledge) and sources is None) for pk, model, line, knowledge, sources in waiting
            if str(pk) not in ledger and reply_claim_holder(pk) is None]
    for message_id, model_name, batch_line, retrieve in lost:
        log.warning("message %s: its task is in no queue (Redis lost it); queued again", message_id)
        try:
            choice = model_resolve(model_name)
        except CatalogError as exc:
            message_fail(message_id=message_id, code=exc.code, detail=str(exc))
            continue
        message_dispatch(message_id=message_id, choice=choice,
                         priority=settings.BATCH_PRIORITY if batch_line else None, retrieve=retrieve)
    return [message_id for message_id, *_ in lost]


# --- the claim ------------------------------------------------------------------

@functools.cache
def _claims() -> Claims:
    return Claims(prefix=CLAIM_PREFIX)


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


class ReplyHold(Keeper):
    """A run's claim on its reply, renewed from a thread until `stop()`, and
    the run's deadline (time.monotonic(), GENERATION_DEADLINE_SECONDS after
    the claim was taken).

    A run that ended the reply itself sets `ended`: its claim is then
    deleted without the fenced check (one command instead of three). That
    is safe even if the claim were by then another run's (Redis lost it and
    a later delivery took it): the reply has ended, so that run can only
    find it ended and stop, and so can any run after it."""

    def __init__(self, message_id: int, token: str):
        super().__init__(name=f"reply-claim-{message_id}", ttl=_claim_ttl(),
                         renew=lambda: _claims().renew(message_id, token, ttl=_claim_ttl()),
                         release=lambda: self._claim_end(token),
                         renew_first=False)  # taken a moment ago, for a whole TTL
        self.message_id = message_id
        self.ended = False
        self.deadline = time.monotonic() + settings.GENERATION_DEADLINE_SECONDS
        #: The reply's model, once the run resolved it (a GPU prelude hands
        #: it to the task body with the hold, so it is resolved once).
        self.choice: ModelChoice | None = None

    def _claim_end(self, token: str) -> None:
        if self.ended:
            _claims().drop(self.message_id)
        else:
            reply_release(self.message_id, token)


def reply_hold(message_id: int) -> ReplyHold | None:
    """Claim the reply and keep the claim alive until the hold is stopped;
    None when another run holds it, and then this delivery must not touch
    the reply at all."""
    token = reply_claim(message_id)
    if token is None:
        log.info("message %s: another run is working on this reply (%s); this delivery does nothing",
                 message_id, reply_claim_holder(message_id))
        return None
    return ReplyHold(message_id, token).start()


# --- cancel and the one ending ------------------------------------------------------

def cancel_key(message_id: int) -> str:
    return f"{CANCEL_PREFIX}:{message_id}"


def cancel_request(message_id: int) -> None:
    """Flag a reply to stop: a solo GPU worker cannot be interrupted, so the
    generation loop (and a task not yet started) checks the flag."""
    redis_client().set(cancel_key(message_id), "1", ex=settings.CHAT_CANCEL_TTL)


def cancel_requested(message_id: int) -> bool:
    return bool(redis_client().exists(cancel_key(message_id)))


def message_finish(*, message_id: int, content: str, finish_reason: str, prompt_tokens: int,
                   completion_tokens: int, before: list[dict] = (), known: dict | None = None,
                   first_token_at=None, queued_only: bool = False, tool_calls: list[dict] | None = None) -> bool:
    """End a reply and send `chat.done`, once: a conditional update makes a
    second caller (a re-delivered task, a racing cancel) a no-op. `before`:
    the run's last frames (its pending text, chat/relay.py `take`), sent
    ahead of the end in the same group send. `known`: the reply's
    model_name, queued_at, started_at and first_token_at, when the run has
    them (the metrics then need no query). `first_token_at`: written with
    the end, when the run has not written it yet. `queued_only`: only if
    no run has started the reply (`message_cancel_queued`). `tool_calls`:
    the calls the reply asks for (issue 16), on the reply and its end."""
    status = MessageStatus.CANCELLED if finish_reason == "cancelled" else MessageStatus.DONE
    extra = {"first_token_at": first_token_at} if first_token_at else {}
    if tool_calls:
        extra["tool_calls"] = tool_calls
    ended = _end(message_id, known=known, queued_only=queued_only, status=status, content=content,
                 finish_reason=finish_reason, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 **extra)
    if ended:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        done = {"type": "chat.done", "message": message_id, "finish_reason": finish_reason, "usage": usage}
        group_send(message_group(message_id), *before, {**done, "tool_calls": tool_calls} if tool_calls else done)
    return ended


def message_fail(*, message_id: int, code: str, detail: str, content: str | None = None,
                 before: list[dict] = (), known: dict | None = None, first_token_at=None) -> bool:
    """End a reply with an error and send `chat.error`, once (after `before`,
    and with `known` and `first_token_at`, as in `message_finish`)."""
    fields = {"status": MessageStatus.ERROR, "error_code": code, "error_detail": detail}
    if first_token_at:
        fields["first_token_at"] = first_token_at
    if content is not None:
        fields["content"] = content
    ended = _end(message_id, known=known, **fields)
    if ended:
        group_send(message_group(message_id), *before,
                   {"type": "chat.error", "message": message_id, "code": code, "detail": detail})
    return ended


def message_cancel_queued(message_id: int) -> bool:
    """End a reply that no run has started, as cancelled, at once: False
    when a run started it first (then the cancel flag stops it). A run
    that claims it afterwards finds it ended (`workers/replies.py
    reply_start`)."""
    return message_finish(message_id=message_id, content="", finish_reason="cancelled", prompt_tokens=0,
                          completion_tokens=0, queued_only=True)


def _end(message_id: int, *, known: dict | None = None, queued_only: bool = False, **fields) -> bool:
    finished_at = timezone.now()
    rows = Message.objects.filter(pk=message_id)
    rows = rows.filter(status=MessageStatus.QUEUED) if queued_only else rows.exclude(status__in=FINISHED_STATUSES)
    updated = rows.update(finished_at=finished_at, **fields)
    if updated == 1:
        dispatch_forget(message_id, cancelled=fields["status"] == MessageStatus.CANCELLED)
        if known is None:
            known = Message.objects.filter(pk=message_id).values(
                "model_name", "queued_at", "started_at", "first_token_at").first()
        if known is not None:
            _observe({**known, "status": fields["status"], "finished_at": finished_at})
    return updated == 1


def _observe(reply: dict) -> None:
    """Feed the reply's timings to /metrics (seconds from queued)."""
    if reply["queued_at"] is None:
        return
    kind = next((k for k, prefix in PREFIXES.items() if reply["model_name"].startswith(prefix)), "local")
    seconds = {stage: (reply[f"{stage}_at"] - reply["queued_at"]).total_seconds()
               for stage in STAGES if reply[f"{stage}_at"] is not None}
    message_observe(kind=kind, status=reply["status"], seconds=seconds)
