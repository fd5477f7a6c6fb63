"""What a worker process runs beside its tasks, from `worker_ready` to
`worker_shutdown`: one `WorkerLifecycle` per process.

Every worker: a heartbeat for /readyz and placement. Celery's remote control
(ping, inspect) is answered by a worker's main loop, which the GPU worker's
solo pool blocks for the whole of a task: a busy GPU worker would look dead
for as long as it loads or generates. A daemon thread refreshing a key with
a TTL is alive exactly as long as the process is.

A GPU worker (it consumes a `gpu.<slot>` queue), before its first task:
- recovery: it holds no model, so a state that says otherwise is repaired,
  and the reply its predecessor died on is ended (its task would only be
  redelivered after the broker's visibility timeout);
- orphans: the messages of its queue that the dead predecessor had taken
  are put back at the head of the queue (`orphans_restore`);
- then housekeeping, every GPU_HOUSEKEEPING_SECONDS: rewrite the GPU state
  when Redis lost it, fail the replies of dead lease holders, queue the
  replies whose tasks Redis lost again, and queue an idle unload when a
  model outlived its keep-alive. It never touches an engine itself:
  unloading goes through the queue, so it cannot race a running task, and
  the state is rewritten only between transitions (GpuManager.state_sync).

Each tick runs inside `close_old_connections()`: a thread beside a worker
has no request cycle to close a connection a database restart broke.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING

from celery.signals import task_postrun, worker_ready, worker_shutdown
from django.conf import settings
from django.db import close_old_connections

from chat.batches import batch_advance_queue, batch_line_ended
from chat.dispatch import message_fail, queue_depth, replies_redispatch_lost, worker_alive_key
from chatsite import queues
from chatsite.redis_client import redis_client
from gpu_manager.scheduler import slot_scheduler

if TYPE_CHECKING:  # handed in by the GPU tasks; importing it would import torch
    from gpu_manager.manager import GpuManager

log = logging.getLogger(__name__)

#: Set while an idle unload is queued and has not run; it expires, so that a
#: task a Redis which came back empty lost cannot stop idle unloads for good
#: (a second one is harmless: it checks again when it runs).
IDLE_UNLOAD_PENDING_KEY = "gpu:slot:{slot}:idle-unload-pending"
IDLE_REQUEUE_SECONDS = 120.0

#: Set while a GPU task runs in this process (workers/gpu_tasks.py): the
#: housekeeping thread then queues no wake-up (`SchedulerWaker`), since the
#: running task asks the scheduler again before it ends.
gpu_task_running = threading.Event()

#: Imported as the worker starts, before it consumes: a message of its queue
#: delivered earlier was taken by a predecessor (`orphans_restore`).
PROCESS_STARTED = time.time()


class WorkerLifecycle:
    """The threads and start-up work of one worker process."""

    def __init__(self, *, app, hostname: str, consumes: list[str]):
        self.app = app
        self.hostname = hostname
        self.consumes = consumes
        self.gpu_queues = [q for q in consumes if q.startswith(queues.GPU_QUEUE_PREFIX)]
        self._stop = threading.Event()

    def start(self) -> None:
        if self.gpu_queues:
            manager = self._gpu_manager()
            gpu_worker_recover(manager=manager)
            for queue in self.gpu_queues:
                orphans_restore(app=self.app, queue=queue, delivered_before=PROCESS_STARTED)
            waker = SchedulerWaker(app=self.app, slot=manager.slot)
            self._thread("gpu-housekeeping", settings.GPU_HOUSEKEEPING_SECONDS,
                         lambda: self._housekeep(manager, waker))
        self._thread("worker-heartbeat", settings.WORKER_HEARTBEAT_SECONDS, self._beat, at_once=True)

    def stop(self) -> None:
        self._stop.set()
        if self.gpu_queues:
            self._gpu_manager().forget()
        # On a clean shutdown, stop counting at once instead of after the TTL.
        redis_client().delete(*[worker_alive_key(queue=q, hostname=self.hostname) for q in self.consumes])

    def _gpu_manager(self) -> GpuManager:
        # The manager belongs to the GPU tasks (workers/gpu_tasks.py); a
        # worker on a GPU queue without them could take no GPU message.
        task = self.app.tasks.get(queues.GPU_GENERATE)
        if task is None:
            raise RuntimeError(f"a worker on {self.gpu_queues} needs the GPU tasks: start it with "
                               f"-I {queues.GPU_TASK_MODULE}")
        return task.manager

    def _thread(self, name: str, period: float, tick, *, at_once: bool = False) -> None:
        def loop() -> None:
            if at_once:
                self._tick(name, tick)
            while not self._stop.wait(period):
                self._tick(name, tick)
        threading.Thread(target=loop, name=name, daemon=True).start()

    @staticmethod
    def _tick(name: str, tick) -> None:
        close_old_connections()
        try:
            tick()
        except Exception:  # keep the thread alive through a Redis or database blip
            log.exception("%s failed; retrying", name)
        finally:
            close_old_connections()

    def _beat(self) -> None:
        pipe = redis_client().pipeline()
        for queue in self.consumes:
            pipe.set(worker_alive_key(queue=queue, hostname=self.hostname), "1", ex=settings.WORKER_HEARTBEAT_TTL)
        pipe.execute()

    def _housekeep(self, manager: GpuManager, waker: SchedulerWaker) -> None:
        manager.state_sync(note="restored after Redis lost it")
        manager.reap_leases()
        replies_redispatch_lost()
        waker.tick(busy=gpu_task_running.is_set())
        pending = IDLE_UNLOAD_PENDING_KEY.format(slot=manager.slot)
        if manager.idle_engines() and redis_client().set(pending, "1", nx=True, ex=int(IDLE_REQUEUE_SECONDS)):
            self.app.signature(queues.GPU_UNLOAD_IDLE).apply_async(queue=queues.gpu_queue(manager.slot))


class SchedulerWaker:
    """Queues a `gpu_serve` wake-up when the slot's scheduler holds requests
    and its queue no task to serve them: every admitted request queues one
    task, but a task can end without serving (a Redis error before its
    pick), and the order is the scheduler's, so the count is what must never
    fall short. A spare wake-up finds nothing and ends.

    Only a shortage seen on two ticks in a row counts: an admission writes
    its wait entry a moment before it queues its task, and the worker pops a
    task a moment before it marks itself running (`gpu_task_running`), so
    one look can find a shortage that is not there."""

    def __init__(self, *, app, slot: str):
        self.app = app
        self.slot = slot
        self._short = False

    def tick(self, *, busy: bool) -> bool:
        """Look once; True when this look queued a wake-up."""
        snapshot = slot_scheduler(self.slot).snapshot()
        queue = queues.gpu_queue(self.slot)
        short = not busy and any(snapshot["waiting"].values()) and not queue_depth(queue)
        if not (short and self._short):
            self._short = short
            return False
        self._short = False
        log.warning("GPU slot %s: %s waiting and no task queued to serve them; waking the worker",
                    self.slot, snapshot["waiting"])
        self.app.signature(queues.GPU_SERVE).apply_async(queue=queue)
        return True


def idle_unload_ran(*, slot: str) -> None:
    """The queued idle unload ran: the next idle engine may queue another."""
    redis_client().delete(IDLE_UNLOAD_PENDING_KEY.format(slot=slot))


def gpu_worker_recover(*, manager: GpuManager) -> None:
    """At GPU worker start: repair the state, and end the reply the previous
    worker was on when it died."""
    manager.repair()
    slot_scheduler(manager.slot).repair()
    message_id = manager.store.current()
    if message_id is not None:
        message_fail(message_id=message_id, code="worker_restarted",
                     detail="The GPU worker restarted during this reply. Please send the message again.")
        manager.store.current_set(None)


def replies_fail_lost(holders: list[str]) -> None:
    """The GPU leases of these replies expired: the worker streaming them
    died (GpuManager.on_leases_expired)."""
    for holder in holders:
        message_fail(message_id=int(holder), code="worker_lost",
                     detail="The worker streaming this reply stopped. Please send the message again.")


def orphans_restore(*, app, queue: str, delivered_before: float) -> int:
    """Put back on `queue` the messages of it that were delivered before
    `delivered_before` (Unix time) and never acknowledged; return how many.

    With late acknowledgement, a message a worker has taken sits in the Redis
    transport's `unacked` hash until it is acknowledged; if the worker dies,
    it goes back to its queue only after the broker's visibility timeout
    (CELERY_BROKER_TRANSPORT_OPTIONS: 22 minutes). A slot has one GPU worker,
    so every message of its queue delivered before it started is its dead
    predecessor's: the one it was running (whose reply gpu_worker_recover
    ends) and the next one it had already taken. Running one again is
    harmless: a finished reply is skipped and a claimed one left to its
    holder (chat/dispatch.py). Only for a queue with a single consumer:
    another live consumer's messages would run twice."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        client = channel.client
        tags = client.zrangebyscore(channel.unacked_index_key, "-inf", delivered_before)
        restored = 0
        # kombu consumes from the right; restore_by_tag pushes there: the
        # newest first, so that the oldest is taken first.
        for tag in reversed(tags):
            raw = client.hget(channel.unacked_key, tag)
            if raw is None:  # acknowledged or restored meanwhile
                continue
            _payload, _exchange, routing_key = json.loads(raw)
            if routing_key != queue:
                continue
            channel.qos.restore_by_tag(tag)
            restored += 1
    if restored:
        log.warning("%s: %d message(s) taken by a worker that died put back at the head of the queue",
                    queue, restored)
    return restored


# --- the signals: one lifecycle per worker process ---------------------------

_lifecycles: dict[str, WorkerLifecycle] = {}


@worker_ready.connect
def _worker_ready(sender, **kwargs) -> None:
    lifecycle = WorkerLifecycle(app=sender.app, hostname=sender.hostname,
                                consumes=sorted(sender.app.amqp.queues.consume_from))
    _lifecycles[sender.hostname] = lifecycle
    lifecycle.start()


@worker_shutdown.connect
def _worker_shutdown(sender, **kwargs) -> None:
    lifecycle = _lifecycles.pop(sender.hostname, None)
    if lifecycle is not None:
        lifecycle.stop()


@task_postrun.connect
def _batch_line_followup(sender=None, args=None, **kwargs) -> None:
    """When a reply that is a batch line has ended, its batch moves on (the
    next line, or the end). After the task, whether it succeeded or failed:
    a failed reply ends its line as surely as a finished one."""
    if sender is None or sender.name not in queues.REPLY_TASKS:
        return
    # A GPU task names the reply it served on its request (the scheduler's
    # pick); a CPU task's reply is its argument.
    message_id = getattr(sender.request, "message_id", None) or (args[0] if args else None)
    if message_id is None:
        return
    if sender.name == queues.CPU_GENERATE and (sender.request.delivery_info or {}).get(
            "priority") != settings.BATCH_PRIORITY:
        return  # an interactive reply: batch lines are queued with BATCH_PRIORITY (chat/dispatch.py)
    batch_id = batch_line_ended(message_id=message_id)
    if batch_id is not None:
        batch_advance_queue(batch_id=batch_id)
