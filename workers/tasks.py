"""Celery tasks: thin adapters from a queue message to one service call.

Names decide routes (settings.CELERY_TASK_ROUTES): `gpu_*` run on the single
GPU worker, `cpu_*` on the CPU workers.
"""
import logging
import threading
import time

from celery import shared_task
from celery.signals import task_postrun, worker_ready, worker_shutdown
from django.conf import settings

from chat.batches import batch_advance, batch_advance_queue, batch_line_ended
from chat.generation import (
    external_reply_generate, gpu_acquire_for_reply, gpu_worker_recover, local_reply_generate, local_spec,
    local_specs_preload, ollama_urls, replies_redispatch_lost,
)
from workers.base import GpuControlTask, GpuTask, LocalModelTask, MessageTask, gpu_manager
from workers.heartbeat import heartbeat_start, heartbeat_stop
from workers.orphans import orphans_restore

log = logging.getLogger(__name__)
#: Imported as the worker starts, before it consumes: a message of its queue
#: delivered earlier was taken by a predecessor (workers/orphans.py).
_PROCESS_STARTED = time.time()


@shared_task(base=LocalModelTask, bind=True)
def gpu_generate(self, message_id: int) -> None:
    local_reply_generate(message_id=message_id, manager=self.manager)


@shared_task(base=GpuTask, bind=True)
def gpu_acquire(self, message_id: int) -> None:
    gpu_acquire_for_reply(message_id=message_id, manager=self.manager)


@shared_task(base=MessageTask)
def cpu_generate(message_id: int) -> None:
    external_reply_generate(message_id=message_id)


@shared_task(base=GpuControlTask, bind=True)
def gpu_load(self, name: str) -> None:
    """The admin's "load now": the same prelude as a message to that model."""
    self.manager.prepare_local(spec=local_spec(name), preload=local_specs_preload(), ollama_urls=ollama_urls())


@shared_task(base=GpuControlTask, bind=True)
def gpu_unload(self, names: list[str] | None = None) -> None:
    """The admin's "unload now" (all local models, or `names`)."""
    self.manager.unload_local(names=names, reason="admin")


@shared_task(base=GpuControlTask, bind=True)
def gpu_unload_idle(self) -> None:
    """Queued by the housekeeping thread; checks again when it runs, since a
    message may have used the model in between."""
    global _idle_queued_at
    _idle_queued_at = None
    idle = self.manager.idle_engines()
    if idle:
        self.manager.unload_local(names=idle, reason="idle")


_heartbeat = None
#: When the housekeeping thread last queued gpu_unload_idle (monotonic), or
#: None once it ran. Queued again after IDLE_REQUEUE_SECONDS: a task that a
#: Redis which came back empty lost must not stop idle unloads for good (a
#: second one is harmless: it checks again when it runs).
_idle_queued_at: float | None = None
IDLE_REQUEUE_SECONDS = 120.0


def _housekeeping(stop: threading.Event) -> None:
    """In the GPU worker, beside the solo pool: fail the replies of dead
    lease holders, queue an idle unload when a model outlived its
    keep-alive, and, when Redis lost them (a Redis that crashed or came back
    empty), rewrite the GPU state and queue the lost replies again. It never touches an engine itself:
    unloading goes through the queue, so it cannot race a running task, and
    the state is rewritten only between transitions (GpuManager.state_sync)."""
    global _idle_queued_at
    manager = gpu_manager()
    while not stop.wait(settings.GPU_HOUSEKEEPING_SECONDS):
        try:
            manager.state_sync(note="restored after Redis lost it")
            manager.reap_leases()
            replies_redispatch_lost()
            waited = None if _idle_queued_at is None else time.monotonic() - _idle_queued_at
            if (waited is None or waited > IDLE_REQUEUE_SECONDS) and manager.idle_engines():
                _idle_queued_at = time.monotonic()
                gpu_unload_idle.apply_async(queue=f"gpu.{settings.GPU_SLOT}")
        except Exception:  # keep the thread alive through a Redis blip
            log.exception("GPU housekeeping failed; retrying")


@worker_ready.connect
def worker_started(sender, **kwargs) -> None:
    """A GPU worker that (re)starts holds no model: repair a state that says
    otherwise, end the reply its predecessor died on, and put back the
    messages it had taken (workers/orphans.py), before the first task is
    served. Every worker then reports itself alive for /readyz."""
    global _heartbeat
    queues = sorted(sender.app.amqp.queues.consume_from)
    if any(q.startswith("gpu.") for q in queues):
        gpu_worker_recover(manager=gpu_manager())
        for queue in (q for q in queues if q.startswith("gpu.")):
            orphans_restore(app=sender.app, queue=queue, delivered_before=_PROCESS_STARTED)
        threading.Thread(target=_housekeeping, args=(threading.Event(),), name="gpu-housekeeping",
                         daemon=True).start()
    _heartbeat = heartbeat_start(hostname=sender.hostname, queues=queues)


@worker_shutdown.connect
def worker_stopping(sender, **kwargs) -> None:
    queues = sorted(sender.app.amqp.queues.consume_from)
    if any(q.startswith("gpu.") for q in queues):
        gpu_manager().forget()
    if _heartbeat is not None:
        heartbeat_stop(_heartbeat, hostname=sender.hostname, queues=queues)


# --- batches (chat/batches.py) ----------------------------------------------

#: The tasks after which a reply may have ended.
_REPLY_TASKS = {"workers.tasks.gpu_generate", "workers.tasks.gpu_acquire", "workers.tasks.cpu_generate"}


@shared_task(ignore_result=True)
def cpu_batch_advance(batch_id: str) -> None:
    batch_advance(batch_id=batch_id)


@task_postrun.connect
def batch_line_followup(sender=None, args=None, **kwargs) -> None:
    """When a reply that is a batch line has ended, its batch moves on (the
    next line, or the end). After the task, whether it succeeded or failed:
    a failed reply ends its line as surely as a finished one."""
    if sender is None or sender.name not in _REPLY_TASKS or not args:
        return
    batch_id = batch_line_ended(message_id=args[0])
    if batch_id is not None:
        batch_advance_queue(batch_id=batch_id)
