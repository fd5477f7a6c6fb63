"""Batches in OpenAI's Batch API format, run through the chat services.

A batch goes: validating (each input line checked, chat/batch_lines.py; a
bad one becomes an error line with its number) -> in_progress -> completed, or cancelling ->
cancelled, or failed when no line is valid.

How lines run:

- Each valid line becomes a Message through `completion_enqueue` (and so
  `message_enqueue`) when its turn comes, queued with settings.BATCH_PRIORITY:
  the workers take every interactive message first.
- At most BATCH_MAX_IN_FLIGHT lines of a batch have a Message that has not
  ended. That bounds what a cancel must let finish, what a batch puts in
  the broker at once, and the Ollama leases granted ahead of their
  generation (gpu_manager/leases.py).
- Lines are taken in `rank` order: grouped by the GPU owner their model
  needs, the GPU's current owner first, so a mixed batch changes the GPU's
  owner once per owner rather than once per alternation in the file. The
  GPU queue (`gpu.<slot>`) is FIFO, so no group needs to drain before the
  next starts.
- `batch_advance` moves a batch on. It runs as a task when one of the
  batch's lines ends (a task_postrun hook in workers/lifecycle.py), after a
  cancel, and from a watchdog while the batch runs (a reply can also end
  outside a task, when a worker's death is noticed). It is idempotent and
  serialized per batch, and it is asked for cheaply: while an advance runs,
  a line's end only marks the batch (the running one passes again), and
  while one is queued and has not started, nothing (`batch_advance_queue`).
  A 2,000-line batch costs a handful of advance tasks, not one per line.
- Lines are given their Messages FILL_STATUS_EVERY at a time, in one
  transaction (`_lines_dispatch`), by the one advance running. Their
  models are resolved before it: a transaction that waited on Redis inside
  would hold SQLite's one write lock meanwhile, and the streams' writes
  would wait for it. One line at a time, each in a transaction of its own,
  the dispatch set a batch's pace, not the window: 2.2 lines in flight of
  16 on average (bench/batch_throughput.py prints the lines in flight
  against the window).
- The output and error files are written once, from the lines' and their
  Messages' terminal states, in the transaction that ends the batch. A
  Message ends once (`message_finish`/`message_fail`), so each line appears
  exactly once, in one of the two files, whatever was redelivered.
- An embeddings batch (`endpoint: "/v1/embeddings"`) goes the same way,
  through the embedding service (chat/embeddings.py) instead of the chat's:
  a line has no Message; it is dispatched when its task is queued, and
  ended by its answer, which the worker writes on the line
  (`BatchLine.response`: status code and body, `batch_line_answered`) once.
  A task lost with its worker comes back when the broker redelivers it
  (late acknowledgement), and the line waits for it.
"""
from __future__ import annotations

import functools
import json
import logging
import time
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Count, IntegerField, Q, Sum
from django.db.models.fields.json import KT
from django.db.models.functions import Cast
from django.utils import timezone
from redis.exceptions import LockError

from chat.batch_lines import EMBEDDINGS, ENDPOINTS, LineInvalid, line_check
from chat.completions import (
    RequestError, chat_request_parse, completion_admissible, completion_enqueue, completion_object, error_body,
    error_status,
)
from chat.embeddings import embedding_backend, embedding_queue, embedding_request_parse
from chat.models import (
    BATCH_FINISHED_STATUSES, FINISHED_STATUSES, Batch, BatchFile, BatchLine, BatchStatus, MessageStatus,
)
from chatsite import queues
from chatsite.celery import app
from chatsite.redis_client import redis_client
from gpu_manager.state import GpuStateStore

log = logging.getLogger(__name__)

COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}
#: Validation errors listed on the batch object itself; all of them are in the error file.
ERRORS_LISTED = 1000
#: While filling, the batch's status is read again after this many lines: a
#: cancel stops the filling within this many lines, whatever the window.
FILL_STATUS_EVERY = 8
#: Lines validated or written to a result file between two yields: the CPU
#: worker runs greenlets (gevent) on one thread, and a pass over a large
#: file must not hold up the streams beside it (and their connect timeouts,
#: lease renewals and interactive replies) for the whole pass.
YIELD_EVERY = 100


# --- files ------------------------------------------------------------------

def file_create(*, user, filename: str, data: bytes, purpose: str) -> BatchFile:
    if purpose != BatchFile.Purpose.BATCH:
        raise RequestError("invalid_request", f"Only purpose 'batch' can be uploaded, not {purpose!r}.",
                           param="purpose")
    if len(data) > settings.BATCH_MAX_FILE_BYTES:
        raise RequestError("invalid_request", f"The file is larger than {settings.BATCH_MAX_FILE_BYTES} bytes.",
                           param="file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError("invalid_request", f"The file is not UTF-8 text: {exc}", param="file") from exc
    if "\x00" in text:
        raise RequestError("invalid_request", "The file contains a NUL byte: JSONL is text.", param="file")
    return BatchFile.objects.create(user=user, purpose=purpose, filename=filename or "upload.jsonl",
                                    bytes=len(data), content=text)


def file_object(file: BatchFile) -> dict:
    return {"id": file.id, "object": "file", "bytes": file.bytes, "created_at": _ts(file.created_at),
            "filename": file.filename, "purpose": file.purpose, "status": "processed", "expires_at": None,
            "status_details": None}


# --- creating, cancelling, reading -----------------------------------------

def batch_create(*, user, input_file_id: str, endpoint: str, completion_window: str = "24h",
                 metadata: dict | None = None, order: str = Batch.Order.GROUPED) -> Batch:
    """Accept a batch; its lines are validated by the first `batch_advance`."""
    input_file = BatchFile.objects.filter(pk=input_file_id, user=user).defer("content").first()
    if input_file is None:
        raise RequestError("not_found", f"No such file: {input_file_id}", param="input_file_id", status=404)
    if input_file.purpose != BatchFile.Purpose.BATCH:
        raise RequestError("invalid_request", f"{input_file_id} was not uploaded with purpose 'batch'.",
                           param="input_file_id")
    if endpoint not in ENDPOINTS:
        raise RequestError("invalid_request", f"Unsupported endpoint {endpoint!r}; use one of {list(ENDPOINTS)}.",
                           param="endpoint")
    if completion_window not in COMPLETION_WINDOWS:
        raise RequestError("invalid_request", f"completion_window must be one of {list(COMPLETION_WINDOWS)}.",
                           param="completion_window")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise RequestError("invalid_request", "metadata must map strings to strings.", param="metadata")
    with transaction.atomic():
        batch = Batch.objects.create(user=user, input_file=input_file, endpoint=endpoint,
                                     completion_window=completion_window, metadata=metadata, order=order,
                                     expires_at=timezone.now() + COMPLETION_WINDOWS[completion_window])
        transaction.on_commit(lambda: batch_advance_queue(batch_id=batch.pk))
    return batch


def batch_cancel(*, batch: Batch) -> Batch:
    """Stop taking new lines: lines whose Message exists finish, the others
    end as `batch_cancelled`, and the batch ends `cancelled` with the output
    it has."""
    if batch.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
        return batch
    with transaction.atomic():
        moved = Batch.objects.filter(pk=batch.pk, status__in=[BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS]) \
            .update(status=BatchStatus.CANCELLING, cancelling_at=timezone.now())
        if not moved:
            batch.refresh_from_db()
            raise RequestError("invalid_request", f"Cannot cancel a batch with status {batch.status!r}.",
                               status=409)
        transaction.on_commit(lambda: batch_advance_queue(batch_id=batch.pk))
    batch.refresh_from_db()
    return batch


def batches_of(*, user, after: str | None = None, limit: int = 20) -> tuple[list[Batch], bool]:
    """A page of the user's batches, newest first, after the batch `after`."""
    batches = Batch.objects.filter(user=user).order_by("-created_at", "-pk")
    if after:
        anchor = Batch.objects.filter(pk=after, user=user).first()
        if anchor is None:
            raise RequestError("not_found", f"No such batch: {after}", param="after", status=404)
        batches = batches.filter(Q(created_at__lt=anchor.created_at) | Q(created_at=anchor.created_at,
                                                                         pk__lt=anchor.pk))
    page = list(batches[:limit + 1])
    return page[:limit], len(page) > limit


def batch_counts(batch: Batch) -> dict:
    """request_counts, live: a line is completed when its reply is done, and
    failed when it is invalid, failed, cancelled or its reply did not end well.
    An embeddings line: by its answer's status."""
    dispatched = Q(state=BatchLine.State.DISPATCHED)
    if batch.endpoint == EMBEDDINGS:
        answered = dispatched & Q(response__isnull=False)
        counts = batch.lines.aggregate(
            total=Count("pk"),
            completed=Count("pk", filter=answered & Q(response__status_code=200)),
            failed=Count("pk", filter=Q(state__in=[BatchLine.State.INVALID, BatchLine.State.FAILED,
                                                   BatchLine.State.CANCELLED])
                         | answered & ~Q(response__status_code=200)),
        )
        return {"total": counts["total"], "completed": counts["completed"], "failed": counts["failed"]}
    counts = batch.lines.aggregate(
        total=Count("pk"),
        completed=Count("pk", filter=dispatched & Q(message__status=MessageStatus.DONE)),
        failed=Count("pk", filter=Q(state__in=[BatchLine.State.INVALID, BatchLine.State.FAILED,
                                               BatchLine.State.CANCELLED])
                     | dispatched & Q(message__status__in=[MessageStatus.ERROR, MessageStatus.CANCELLED])
                     | dispatched & Q(message__isnull=True)),
    )
    return {"total": counts["total"], "completed": counts["completed"], "failed": counts["failed"]}


def batch_object(batch: Batch) -> dict:
    """The batch as OpenAI's `batch` object."""
    if batch.endpoint == EMBEDDINGS:  # the answers' usage (an error's body has none: not counted)
        usage = batch.lines.aggregate(input=Sum(Cast(KT("response__body__usage__prompt_tokens"), IntegerField())))
    else:
        usage = batch.lines.aggregate(input=Sum("message__prompt_tokens"),
                                      output=Sum("message__completion_tokens"))
    tokens_in, tokens_out = usage["input"] or 0, usage.get("output") or 0
    return {
        "id": batch.pk, "object": "batch", "endpoint": batch.endpoint, "errors": batch.errors,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
        "status": batch.status, "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
        "created_at": _ts(batch.created_at), "in_progress_at": _ts(batch.in_progress_at),
        "expires_at": _ts(batch.expires_at), "finalizing_at": _ts(batch.finalizing_at),
        "completed_at": _ts(batch.completed_at), "failed_at": _ts(batch.failed_at), "expired_at": None,
        "cancelling_at": _ts(batch.cancelling_at), "cancelled_at": _ts(batch.cancelled_at),
        "request_counts": batch_counts(batch), "metadata": batch.metadata,
        "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out, "total_tokens": tokens_in + tokens_out,
                  "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}},
    }


def _ts(moment) -> int | None:
    return int(moment.timestamp()) if moment else None


# --- moving a batch on ------------------------------------------------------

def _keys(batch_id: str) -> tuple[str, str, str]:
    """The batch's change mark, advance lock and queued flag."""
    return f"batch:changed:{batch_id}", f"batch:lock:{batch_id}", f"batch:queued:{batch_id}"


#: Mark the batch changed; queue an advance only when none runs (it will
#: see the mark: `batch_advance`) and none is queued and not started (it
#: will read the database after this change). One script, so that the
#: advance running cannot release its lock between the mark and the look.
#: KEYS: mark, lock, queued; ARGV: the mark's and the flag's TTLs.
_MARK_SCRIPT = """
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[2]) then return 1 end
return 0
"""


@functools.lru_cache(maxsize=1)
def _mark_script():
    return redis_client().register_script(_MARK_SCRIPT)


def batch_advance_queue(*, batch_id: str, countdown: float | None = None) -> None:
    """Have the batch advanced: at once (a line ended, a cancel, a new
    batch), or after `countdown` seconds (the watchdog: always a task).

    At once costs one Redis script, and a task only when needed: while an
    advance runs, the change mark is enough (it looks again before it
    leaves), and while one is queued and has not started, that one will
    see the change. A line's end commits before this is called. The queued
    flag expires, so a task the broker lost costs a watchdog period at most."""
    if countdown is None:
        mark, lock, queued = _keys(batch_id)
        if not _mark_script()(keys=[mark, lock, queued],
                              args=[settings.BATCH_LOCK_SECONDS, int(settings.BATCH_WATCHDOG_SECONDS)]):
            return
    try:
        app.signature(queues.CPU_BATCH_ADVANCE, args=(batch_id,), priority=settings.BATCH_PRIORITY,
                      countdown=countdown).apply_async()
    except Exception:
        if countdown is None:  # none is queued after all: the next caller must try again
            redis_client().delete(_keys(batch_id)[2])
        raise


def batch_line_ended(*, message_id: int) -> str | None:
    """The batch of this reply, if it is a batch line that has ended."""
    return BatchLine.objects.filter(message_id=message_id, message__status__in=FINISHED_STATUSES) \
        .values_list("batch_id", flat=True).first()


def batch_advance(*, batch_id: str) -> None:
    """Validate, take the next lines, or end the batch: whatever is due.
    Safe to run any number of times, concurrently and after a crash.

    One advance per batch runs at a time (two could both see room for a
    line and overfill the window). A change while one runs only marks the
    batch (`batch_advance_queue`); the one running looks again while the
    mark is there, so a burst of line ends costs one pass, not one task
    each, and no CPU worker greenlet waits on a lock. The lock expires, so a
    worker that dies holding it does not stop the batch (the watchdog comes
    back); a long run renews it every pass, and hands over to a new task
    after half its TTL (a task is not meant to run for a whole batch).
    """
    r = redis_client()
    mark, lock_key, queued = _keys(batch_id)
    # The queued flag first: a change from here on queues a new task unless
    # this one is running by then. One round trip for both.
    r.pipeline(transaction=False).delete(queued).set(mark, "1", ex=settings.BATCH_LOCK_SECONDS).execute()
    lock = r.lock(lock_key, timeout=settings.BATCH_LOCK_SECONDS)
    started = time.monotonic()
    while lock.acquire(blocking=False):
        handover = lost = False
        try:
            while r.delete(mark):
                _advance(batch_id)
                if time.monotonic() - started > settings.BATCH_LOCK_SECONDS / 2:
                    handover = True
                    break
                try:
                    lock.reacquire()  # a full TTL again
                except LockError:  # it expired and another advance took it: that one goes on
                    lost = True
                    break
        finally:
            try:
                lock.release()
            except LockError:  # it expired meanwhile: nothing to release
                log.warning("batch %s: an advance outlived its lock", batch_id)
        if lost:
            return
        if handover:
            batch_advance_queue(batch_id=batch_id)  # the lock is free: marks and queues
            return
        # A mark set after the last look, by a change that found the lock
        # still held, is this call's to handle.
        if not r.exists(mark):
            return


def _advance(batch_id: str) -> None:
    batch = Batch.objects.select_related("user").filter(pk=batch_id).first()
    if batch is None or batch.status in BATCH_FINISHED_STATUSES:
        return
    if batch.status == BatchStatus.VALIDATING:
        _validate(batch)
        batch.refresh_from_db()
    busy = False
    if batch.status == BatchStatus.IN_PROGRESS:
        busy = _fill(batch)
        batch.refresh_from_db(fields=["status"])  # a cancel may have come meanwhile
    if batch.status == BatchStatus.CANCELLING:
        batch.lines.filter(state=BatchLine.State.PENDING).update(state=BatchLine.State.CANCELLED)
        busy = False  # what is in flight is all that is left: look
    if batch.status in (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING) and not busy and not _unfinished(batch):
        _finalize(batch)
    elif batch.status not in BATCH_FINISHED_STATUSES:
        _watchdog_arm(batch_id)


#: Batch id -> when this process last armed the batch's watchdog (time.monotonic()).
_armed: dict[str, float] = {}


def _watchdog_arm(batch_id: str) -> None:
    # One pending watchdog per batch and interval: every pass arms it, the
    # key makes all but the first a no-op, and within half an interval of
    # this process's own arming the key is surely there: no round trip.
    now = time.monotonic()
    if now - _armed.get(batch_id, -settings.BATCH_WATCHDOG_SECONDS) < settings.BATCH_WATCHDOG_SECONDS / 2:
        return
    if redis_client().set(f"batch:watchdog:{batch_id}", "1", nx=True, ex=int(settings.BATCH_WATCHDOG_SECONDS)):
        if len(_armed) > 1000:
            _armed.clear()
        _armed[batch_id] = now
        batch_advance_queue(batch_id=batch_id, countdown=settings.BATCH_WATCHDOG_SECONDS)


def _in_flight(batch: Batch):
    if batch.endpoint == EMBEDDINGS:
        return batch.lines.filter(state=BatchLine.State.DISPATCHED, response__isnull=True)
    return batch.lines.filter(state=BatchLine.State.DISPATCHED, message__isnull=False) \
        .exclude(message__status__in=FINISHED_STATUSES)


def _unfinished(batch: Batch) -> bool:
    return batch.lines.filter(state=BatchLine.State.PENDING).exists() or _in_flight(batch).exists()


def _in_progress(batch: Batch) -> bool:
    return Batch.objects.filter(pk=batch.pk).values_list("status", flat=True).first() == BatchStatus.IN_PROGRESS


def _fill(batch: Batch) -> bool:
    """Give lines their Messages, in rank order, up to the window. True when
    the batch is known to have lines in flight (counted, or queued by this
    pass): it cannot end in this pass, and each of those lines' ends brings
    another (the task_postrun hook, or the watchdog)."""
    in_flight = _in_flight(batch).count()
    room = settings.BATCH_MAX_IN_FLIGHT - in_flight
    busy = in_flight > 0
    while room > 0:
        lines = list(batch.lines.filter(state=BatchLine.State.PENDING).order_by("rank", "line")[:room])
        if not lines:
            break
        dispatch = _embedding_lines_dispatch if batch.endpoint == EMBEDDINGS else _lines_dispatch
        for start in range(0, len(lines), FILL_STATUS_EVERY):
            dispatched = dispatch(batch, lines[start:start + FILL_STATUS_EVERY])
            room -= dispatched
            busy = busy or dispatched > 0
            # A cancel stops the filling at once, not after the window.
            if not _in_progress(batch):
                return busy
    return busy


def _lines_dispatch(batch: Batch, lines: list[BatchLine]) -> int:
    """Queue the lines' Messages; how many were queued.

    Their models are resolved first, outside any transaction; then all of
    their rows go in one transaction (one commit, and SQLite's one write
    lock held with no Redis round trip inside), and each is queued once it
    commits (on_commit). A crash leaves a line pending, or dispatched with
    its Message, never half of it. A line is claimed by the same
    conditional update that links its Message, in a savepoint of its own:
    a line another advance took meanwhile (one whose lock expired) rolls
    back only its own Message, and its queueing with it."""
    ready = []
    for line in lines:
        try:
            request = chat_request_parse(line.body)
            choice = completion_admissible(user=batch.user, request=request, priority=settings.BATCH_PRIORITY)
        except RequestError as exc:
            # Valid when checked, not now (the model went away): the line ends here.
            BatchLine.objects.filter(pk=line.pk, state=BatchLine.State.PENDING).update(
                state=BatchLine.State.FAILED, error_code=exc.code, error_message=exc.detail)
            continue
        ready.append((line, request, choice))
    dispatched = 0
    with transaction.atomic():
        for line, request, choice in ready:
            try:
                with transaction.atomic():
                    reply = completion_enqueue(user=batch.user, request=request, choice=choice,
                                               priority=settings.BATCH_PRIORITY,
                                               title=f"{batch.pk} #{line.line} {line.custom_id}")
                    if not BatchLine.objects.filter(pk=line.pk, state=BatchLine.State.PENDING) \
                            .update(state=BatchLine.State.DISPATCHED, message=reply):
                        raise _Taken
            except _Taken:
                continue
            dispatched += 1
    return dispatched


class _Taken(Exception):
    """The line was no longer pending: its Message is rolled back."""


def _embedding_lines_dispatch(batch: Batch, lines: list[BatchLine]) -> int:
    """Queue the embeddings lines' tasks; how many were queued. A line is
    claimed (pending -> dispatched, a conditional update) before its task
    is queued, so that two advances never queue it twice; if the queueing
    fails it is pending again, for the next advance."""
    dispatched = 0
    for line in lines:
        try:
            request = embedding_request_parse(line.body)
            choice = embedding_backend(request=request)
        except RequestError as exc:
            # Valid when checked, not now (the model went away): the line ends here.
            BatchLine.objects.filter(pk=line.pk, state=BatchLine.State.PENDING).update(
                state=BatchLine.State.FAILED, error_code=exc.code, error_message=exc.detail)
            continue
        if not BatchLine.objects.filter(pk=line.pk, state=BatchLine.State.PENDING).update(
                state=BatchLine.State.DISPATCHED):
            continue
        try:
            embedding_queue(request=request, choice=choice, reply_to={"line": line.pk},
                            priority=settings.BATCH_PRIORITY)
        except Exception:
            BatchLine.objects.filter(pk=line.pk, response__isnull=True).update(state=BatchLine.State.PENDING)
            raise
        dispatched += 1
    return dispatched


def batch_line_answered(*, line_id: int, response: dict) -> None:
    """An embeddings line's answer, from its worker (chat/embeddings.py):
    written once (a redelivered task's second answer is dropped), and its
    batch moves on."""
    BatchLine.objects.filter(pk=line_id, state=BatchLine.State.DISPATCHED, response__isnull=True) \
        .update(response=response)
    batch_id = BatchLine.objects.filter(pk=line_id).values_list("batch_id", flat=True).first()
    if batch_id is not None:
        batch_advance_queue(batch_id=batch_id)


# --- validation -------------------------------------------------------------

def _yield() -> None:
    """Let the other greenlets of a gevent worker run (time.sleep is
    gevent's there); elsewhere a no-op that gives up the GIL for a moment."""
    time.sleep(0)


def _validate(batch: Batch) -> None:
    """Check every line; write them all, valid or not, and start the batch
    (or fail it when no line is valid)."""
    lines, seen, choices, params = [], set(), {}, {}
    for number, raw in enumerate(batch.input_file.content.splitlines(), start=1):
        if not raw.strip():
            continue  # a trailing newline, a blank line: not a request
        line = BatchLine(batch=batch, line=number, state=BatchLine.State.PENDING)
        try:
            line_check(batch, line, raw, seen, choices)
        except LineInvalid as exc:
            line.state, line.error_code, line.error_message = BatchLine.State.INVALID, exc.code, exc.detail
            line.body = None
            params[number] = exc.param
        lines.append(line)
        if len(lines) % YIELD_EVERY == 0:
            _yield()
    too_many = len(lines) > settings.BATCH_MAX_LINES
    valid = [line for line in lines if line.state == BatchLine.State.PENDING]
    _ranks_assign(batch, valid)
    errors = [{"code": line.error_code, "message": line.error_message, "param": params.get(line.line),
               "line": line.line}
              for line in lines if line.state == BatchLine.State.INVALID][:ERRORS_LISTED]
    if too_many:
        errors = [{"code": "too_many_lines", "message": f"The file has {len(lines)} requests; at most "
                   f"{settings.BATCH_MAX_LINES} are allowed.", "param": None, "line": None}]
    with transaction.atomic():
        now = timezone.now()
        started = not too_many and bool(valid)
        moved = Batch.objects.filter(pk=batch.pk, status=BatchStatus.VALIDATING).update(
            status=BatchStatus.IN_PROGRESS if started else BatchStatus.FAILED,
            errors={"object": "list", "data": errors} if errors else None,
            in_progress_at=now if started else None, failed_at=None if started else now)
        if not moved:
            return  # cancelled meanwhile
        if too_many:
            return
        for start in range(0, len(lines), 500):
            BatchLine.objects.bulk_create(lines[start:start + 500])
            _yield()
        if not started:
            batch.refresh_from_db()
            _files_write(batch)


def _ranks_assign(batch: Batch, lines: list[BatchLine]) -> None:
    """Grouped: the GPU's current owner first, then the other owners in the
    order they first appear, the local models last (handing the GPU from
    Ollama to an OpenAI endpoint unloads nothing, handing it away from the
    local models unloads them); lines that need no owner go with the first
    group. Arrival: file order."""
    if batch.order != Batch.Order.GROUPED:
        return
    owners = [GpuStateStore(slot=settings.GPU_SLOT).read().owner]
    others = [line.owner for line in lines if line.owner and line.owner not in owners]
    owners += sorted(dict.fromkeys(others), key=lambda owner: owner == "local")
    rank = {owner: index for index, owner in enumerate(owners)}
    for line in lines:
        line.rank = rank.get(line.owner, 0)


# --- ending -----------------------------------------------------------------

def _finalize(batch: Batch) -> None:
    """End the batch and write its files, in one transaction; the status
    it moves from is checked in the update, so this happens once."""
    with transaction.atomic():
        now = timezone.now()
        if batch.status == BatchStatus.IN_PROGRESS:
            end = {"status": BatchStatus.COMPLETED, "completed_at": now}
        else:
            end = {"status": BatchStatus.CANCELLED, "cancelled_at": now}
        moved = Batch.objects.filter(pk=batch.pk, status=batch.status).update(finalizing_at=now, **end)
        if moved:
            batch.refresh_from_db()
            _files_write(batch)


def _files_write(batch: Batch) -> None:
    """The output and error files, from the lines' terminal states (called
    in the transaction that ends the batch)."""
    output, errors = [], []
    for count, line in enumerate(batch.lines.select_related("message").order_by("line"), start=1):
        result = line_result(line)
        (errors if result["error"] or result["response"]["status_code"] != 200 else output).append(result)
        if count % YIELD_EVERY == 0:
            _yield()
    fields = {}
    for purpose, results, name in ((BatchFile.Purpose.BATCH_OUTPUT, output, "output"),
                                   (BatchFile.Purpose.BATCH_ERROR, errors, "error")):
        if results:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
            fields[f"{name}_file"] = BatchFile.objects.create(
                user=batch.user, purpose=purpose, filename=f"{batch.pk}_{name}.jsonl",
                bytes=len(text.encode()), content=text)
    if fields:
        Batch.objects.filter(pk=batch.pk).update(**fields)


def line_result(line: BatchLine) -> dict:
    """One line of the output or error file, in OpenAI's format."""
    result = {"id": f"batch_req_{line.pk}", "custom_id": line.custom_id or None, "response": None, "error": None}
    message = line.message
    if line.response is not None:  # an embeddings line's answer
        result["response"] = {"status_code": line.response["status_code"], "request_id": f"req_{line.pk}",
                              "body": line.response["body"]}
    elif line.state == BatchLine.State.DISPATCHED and message is not None:
        if message.status == MessageStatus.DONE:
            result["response"] = {"status_code": 200, "request_id": f"req_{message.pk}",
                                  "body": completion_object(message)}
        elif message.status == MessageStatus.ERROR:
            result["response"] = {"status_code": error_status(message.error_code), "request_id": f"req_{message.pk}",
                                  "body": error_body(message.error_code, message.error_detail)}
        else:
            result["error"] = {"code": "batch_cancelled", "message": "The batch was cancelled before this request ran."}
    elif line.state == BatchLine.State.DISPATCHED:
        result["error"] = {"code": "request_deleted", "message": "The request's conversation was deleted."}
    elif line.state == BatchLine.State.CANCELLED or line.state == BatchLine.State.PENDING:
        result["error"] = {"code": "batch_cancelled", "message": "The batch was cancelled before this request ran."}
    else:
        result["error"] = {"code": line.error_code, "message": line.error_message, "line": line.line}
    return result
