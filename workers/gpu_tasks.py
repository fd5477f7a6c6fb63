"""The GPU worker's tasks, and the one GPU manager of its process.

Only a GPU worker imports this module (`celery worker -I workers.gpu_tasks`,
chat/management/commands/runstack.py): through the GPU manager it imports
torch and transformers, which no other process needs.
"""
from __future__ import annotations

from celery import Task, shared_task

from chat.embeddings import embedding_queue_cpu, embedding_run
from chat.knowledge.bases import ingest_queue
from chat.knowledge.ingest import base_embedder_failed, base_ingest
from chat.models import KnowledgeBase
from chat.translations import translation_queue_cpu, translation_run
from chatsite import queues
from chatsite.logs import message_id_var
from gpu_manager.manager import GpuManager
from gpu_manager.state import gpu_local_now
from gpu_manager.scheduler import Scheduler, slot_scheduler
from workers.base import MessageTask
from workers.lifecycle import gpu_task_running, idle_unload_ran, replies_fail_lost
from workers.replies import (
    gpu_prelude, local_reply_generate, local_spec, local_specs_preload, ollama_urls, switch_notifier,
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
    """A message's step on the GPU worker: it serves the request the slot's
    scheduler picks (gpu_manager/scheduler.py), which need not be the one it
    was queued with. Its prelude takes the pick, claims the reply and makes
    the GPU ready for it: a local model resident (unloading Ollama's models
    first if they own the GPU), or the GPU freed for an external model,
    whose generation it queues on the CPU queue. A local model's claim
    reaches the task body on the task's own request (`reply_hold`).

    While it runs, the slot's state names the picked message: a worker
    restarted after a crash fails that reply instead of leaving it running
    forever; a failure ends that reply too (`MessageTask.message_id`)."""

    abstract = True

    @property
    def manager(self) -> GpuManager:
        return gpu_manager()

    def before_start(self, task_id, args, kwargs) -> None:
        super().before_start(task_id, args, kwargs)
        gpu_task_running.set()
        self.request.message_id = None
        self.request.reply_hold = gpu_prelude(manager=self.manager, scheduler=self.scheduler,
                                              hint=args[0] if args else None, on_pick=self._picked)

    def _picked(self, message_id: int) -> None:
        self.request.message_id = message_id
        message_id_var.set(message_id)
        self.manager.store.current_set(message_id)

    @property
    def scheduler(self) -> Scheduler:
        return slot_scheduler(self.manager.slot)

    def after_return(self, status, retval, task_id, args, kwargs, einfo) -> None:
        gpu_task_running.clear()
        if getattr(self.request, "message_id", None) is not None:
            self.manager.store.current_set(None)
        super().after_return(status, retval, task_id, args, kwargs, einfo)


def _generate(task: GpuTask) -> None:
    local_reply_generate(message_id=task.request.message_id, hold=getattr(task.request, "reply_hold", None),
                         manager=task.manager, scheduler=task.scheduler)


# Both names carry the same work: a local message is queued as
# `gpu_generate`, an external one as `gpu_acquire`, and either serves the
# scheduler's pick; `gpu_serve` is the housekeeping's wake-up, with no message.
@shared_task(name=queues.GPU_GENERATE, base=GpuTask, bind=True)
def gpu_generate(self, message_id: int) -> None:
    _generate(self)


@shared_task(name=queues.GPU_ACQUIRE, base=GpuTask, bind=True)
def gpu_acquire(self, message_id: int) -> None:
    _generate(self)


@shared_task(name=queues.GPU_SERVE, base=GpuTask, bind=True)
def gpu_serve(self) -> None:
    _generate(self)


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


@shared_task(name=queues.GPU_TRANSLATE, base=GpuControlTask, bind=True)
def gpu_translate(self, message_id: int, target: str, engine: str) -> None:
    """A translation while the GPU is the local models' (chat/translations.py):
    the translation engine made resident beside the others, in line with
    the messages. If the GPU changed hands since it was queued, it goes to
    the knowledge worker's CPU instead: a translation never takes the GPU
    back from an external owner."""
    message_id_var.set(message_id)
    try:
        if not gpu_local_now(self.manager.slot):
            owner = self.manager.store.read().owner
            translation_queue_cpu(message_id=message_id, target=target, engine=engine, owner=owner)
            return

        def load():
            self.manager.prepare_local(spec=local_spec(engine), preload=local_specs_preload(),
                                       ollama_urls=ollama_urls(), on_event=switch_notifier(message_id))
            return self.manager.engine(engine)

        translation_run(message_id=message_id, target=target, load=load, device=self.manager.device)
    finally:
        message_id_var.set(None)


@shared_task(name=queues.GPU_INGEST, base=GpuControlTask, bind=True)
def gpu_ingest(self, base_id: int) -> None:
    """A base's ingestion while the GPU is the local models': the embedding
    engine made resident beside the others, in line with the messages
    (chat/knowledge/bases.py `ingest_queue`). If the GPU changed hands
    since, it goes to the knowledge worker's CPU instead."""
    if not gpu_local_now(self.manager.slot):
        ingest_queue(base_id, gpu=False)
        return
    model = KnowledgeBase.objects.filter(pk=base_id).values_list("embedding_model", flat=True).first()
    if model is None:
        return
    try:
        self.manager.prepare_local(spec=local_spec(model), preload=local_specs_preload(), ollama_urls=ollama_urls())
        embedder = self.manager.engine(model)
    except Exception as exc:
        base_embedder_failed(base_id, model, exc)
        return
    base_ingest(base_id=base_id, embedder=embedder, indexed_by=f"gpu worker on {self.manager.device}")


@shared_task(name=queues.GPU_EMBED, base=GpuControlTask, bind=True)
def gpu_embed(self, request: dict, reply_to: dict) -> None:
    """`/v1/embeddings` with a local engine while the GPU is the local
    models' (chat/embeddings.py): the engine made resident beside the
    others, in line with the messages. If the GPU changed hands since it
    was queued, it goes to the knowledge worker's CPU instead: an embedding
    never takes the GPU back from an external owner."""
    if not gpu_local_now(self.manager.slot):
        priority = (self.request.delivery_info or {}).get("priority")  # a batch line's stays a batch line's
        embedding_queue_cpu(request=request, reply_to=reply_to, priority=priority)
        return

    def load(name: str):
        self.manager.prepare_local(spec=local_spec(name), preload=local_specs_preload(), ollama_urls=ollama_urls())
        return self.manager.engine(name)

    embedding_run(request=request, reply_to=reply_to, load=load, by=f"gpu worker on {self.manager.device}")
