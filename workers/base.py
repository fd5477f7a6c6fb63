"""Task base classes: what every chat task does at its boundary, and the GPU
task's prelude."""
from __future__ import annotations

import logging

from celery import Task

from chat.generation import error_code, gpu_prepare_for_reply
from chat.services import message_fail
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

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        message_id = args[0] if args else kwargs.get("message_id")
        if message_id is not None:
            message_fail(message_id=message_id, code=error_code(exc), detail=str(exc) or type(exc).__name__)


class GpuTask(MessageTask):
    """A task on the GPU worker. The worker runs the solo pool, so one
    GpuManager per process serves every task, in queue order."""

    abstract = True
    _manager: GpuManager | None = None

    @property
    def manager(self) -> GpuManager:
        # Built by the first task, not at import or worker start: no device
        # probing until the GPU is needed (STYLE 5).
        if GpuTask._manager is None:
            GpuTask._manager = GpuManager.from_settings()
        return GpuTask._manager


class LocalModelTask(GpuTask):
    """A local-model generation. Its prelude asks the GPU manager to make the
    requested model resident (unloading Ollama's models first if they own
    the GPU) before the task body runs."""

    abstract = True

    def before_start(self, task_id, args, kwargs) -> None:
        gpu_prepare_for_reply(message_id=args[0], manager=self.manager)
