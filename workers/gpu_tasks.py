"""The GPU worker's tasks, and the one GPU manager of its process.

Only a GPU worker imports this module (`celery worker -I workers.gpu_tasks`,
chat/management/commands/runstack.py): through the GPU manager it imports
torch and transformers, which no other process needs.
"""
from __future__ import annotations

from celery import Task, shared_task

from chatsite import queues
from gpu_manager.manager import GpuManager
from workers.base import MessageTask
from workers.lifecycle import idle_unload_ran, replies_fail_lost
from workers.replies import (
    gpu_acquire_for_reply, gpu_prelude, local_reply_generate, local_spec, local_specs_preload, ollama_urls,
)

_manager: GpuManager | None = None


def gpu_manager() -> GpuManager:
    """This GPU worker's manager. Built by the first task (or the worker's
    start-up recovery), never at import: no device probing until the GPU is
    needed. The solo pool runs tasks in the main thread; the housekeeping
    thread (workers/lifecycle.py) only reads it and queues tasks."""
    global _manager
    if _manager is None:
        _manager = GpuManager.from_settings()
        _manager.on_leases_expired = replies_fail_lost
    return _manager


class GpuControlTask(Task):
    """An operator's or the worker's own request on the GPU queue (load,
    unload, idle unload): in line with every message, so it never races one."""

    abstract = True
    ignore_result = True

    @property
    def manager(self) -> GpuManager:
        return gpu_manager()


class GpuTask(MessageTask):
    """A message's step on the GPU worker. While it runs, the slot's state
    names its message: a worker restarted after a crash fails that reply
    instead of leaving it running forever."""

    abstract = True

    @property
    def manager(self) -> GpuManager:
        return gpu_manager()

    def before_start(self, task_id, args, kwargs) -> None:
        super().before_start(task_id, args, kwargs)
        if args:
            self.manager.store.current_set(args[0])

    def after_return(self, status, retval, task_id, args, kwargs, einfo) -> None:
        self.manager.store.current_set(None)
        super().after_return(status, retval, task_id, args, kwargs, einfo)


class LocalModelTask(GpuTask):
    """A local-model generation. Its prelude claims the reply and asks the
    GPU manager to make the requested model resident (unloading Ollama's
    models first if they own the GPU) before the task body runs; the claim
    reaches the body on the task's own request (`self.request.reply_hold`)."""

    abstract = True

    def before_start(self, task_id, args, kwargs) -> None:
        super().before_start(task_id, args, kwargs)
        self.request.reply_hold = gpu_prelude(message_id=args[0], manager=self.manager)


@shared_task(name=queues.GPU_GENERATE, base=LocalModelTask, bind=True)
def gpu_generate(self, message_id: int) -> None:
    local_reply_generate(message_id=message_id, hold=getattr(self.request, "reply_hold", None),
                         manager=self.manager)


@shared_task(name=queues.GPU_ACQUIRE, base=GpuTask, bind=True)
def gpu_acquire(self, message_id: int) -> None:
    gpu_acquire_for_reply(message_id=message_id, manager=self.manager)


@shared_task(name=queues.GPU_LOAD, base=GpuControlTask, bind=True)
def gpu_load(self, name: str) -> None:
    """The admin's "load now": the same prelude as a message to that model."""
    self.manager.prepare_local(spec=local_spec(name), preload=local_specs_preload(), ollama_urls=ollama_urls())


@shared_task(name=queues.GPU_UNLOAD, base=GpuControlTask, bind=True)
def gpu_unload(self, names: list[str] | None = None) -> None:
    """The admin's "unload now" (all local models, or `names`)."""
    self.manager.unload_local(names=names, reason="admin")


@shared_task(name=queues.GPU_UNLOAD_IDLE, base=GpuControlTask, bind=True)
def gpu_unload_idle(self) -> None:
    """Queued by the housekeeping thread; checks again when it runs, since a
    message may have used the model in between."""
    idle_unload_ran(slot=self.manager.slot)
    idle = self.manager.idle_engines()
    if idle:
        self.manager.unload_local(names=idle, reason="idle")
