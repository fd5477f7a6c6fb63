"""Task base classes: what every chat task does at its boundary, and the GPU
task's prelude."""
from __future__ import annotations

import logging

from celery import Task

from chat.generation import error_code, gpu_prepare_for_reply, replies_fail_lost
from chat.services import message_fail
from chatsite.logs import message_id_var
from gpu_manager.manager import GpuManager

log = logging.getLogger(__name__)


class MessageTask(Task):
    """A task whose first argument is a reply's message id.

    Any exception that escapes the task ends the reply with `chat.error`
    (once; a reply already ended is left alone), so that every accepted
    message ends in `chat.done` or `chat.error`. A failed acquire step also
    stops its chain, so the streaming step never runs.
    """

    abstract = True
    #: Results are not read: replies travel through the channel layer.
    ignore_result = True

    def before_start(self, task_id, args, kwargs) -> None:
        # Everything this task logs names its message (chatsite/logs.py).
        message_id_var.set(args[0] if args else kwargs.get("message_id"))

    def after_return(self, status, retval, task_id, args, kwargs, einfo) -> None:
        message_id_var.set(None)

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        message_id = args[0] if args else kwargs.get("message_id")
        if message_id is not None:
            message_fail(message_id=message_id, code=error_code(exc), detail=str(exc) or type(exc).__name__)


_manager: GpuManager | None = None


def gpu_manager() -> GpuManager:
    """This GPU worker's manager. Built by the first task (or the worker's
    start-up repair), never at import: no device probing until the GPU is
    needed (STYLE 5). The solo pool runs tasks in the main thread; the
    housekeeping thread only reads it and queues tasks."""
    global _manager
    if _manager is None:
        _manager = GpuManager.from_settings()
        _manager.on_leases_expired = replies_fail_lost
    return _manager


class GpuControlTask(Task):
    """An operator's or the worker's own request on the `gpu` queue (load,
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
    """A local-model generation. Its prelude asks the GPU manager to make the
    requested model resident (unloading Ollama's models first if they own
    the GPU) before the task body runs."""

    abstract = True

    def before_start(self, task_id, args, kwargs) -> None:
        super().before_start(task_id, args, kwargs)
        gpu_prepare_for_reply(message_id=args[0], manager=self.manager)
