"""Celery tasks: thin adapters from a queue message to one service call.

Names decide routes (settings.CELERY_TASK_ROUTES): `gpu_*` run on the single
GPU worker, `cpu_*` on the CPU workers.
"""
from celery import shared_task
from celery.signals import worker_ready, worker_shutdown

from chat.generation import external_reply_generate, gpu_acquire_for_reply, local_reply_generate
from workers.base import GpuTask, LocalModelTask, MessageTask
from workers.heartbeat import heartbeat_start, heartbeat_stop


@shared_task(base=LocalModelTask, bind=True)
def gpu_generate(self, message_id: int) -> None:
    local_reply_generate(message_id=message_id, manager=self.manager)


@shared_task(base=GpuTask, bind=True)
def gpu_acquire(self, message_id: int) -> None:
    gpu_acquire_for_reply(message_id=message_id, manager=self.manager)


@shared_task(base=MessageTask)
def cpu_generate(message_id: int) -> None:
    external_reply_generate(message_id=message_id)


_heartbeat = None


@worker_ready.connect
def worker_started(sender, **kwargs) -> None:
    """A GPU worker that (re)starts holds no model: repair a state that says
    otherwise before the first task is served. Every worker then reports
    itself alive for /readyz."""
    global _heartbeat
    queues = sorted(sender.app.amqp.queues.consume_from)
    if "gpu" in queues:
        gpu_generate.manager.repair()
    _heartbeat = heartbeat_start(hostname=sender.hostname, queues=queues)


@worker_shutdown.connect
def worker_stopping(sender, **kwargs) -> None:
    if _heartbeat is not None:
        heartbeat_stop(_heartbeat, hostname=sender.hostname, queues=sorted(sender.app.amqp.queues.consume_from))
