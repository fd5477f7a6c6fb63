"""The knowledge worker's tasks (issue 15): a knowledge base's ingestion, a
reply's retrieval, and translations while the GPU is not the local models';
and `/v1/embeddings` off the GPU (issue 16: chat/embeddings.py).

It runs the embedding and translation models on the CPU, loaded from the
same directories as the GPU worker's engines (so a query's vector matches
the index, whoever built it), and never touches the GPU: a knowledge-assisted
reply or a translation never waits for the GPU worker, nor takes the GPU
from Ollama (docs/knowledge.md). Only this worker and the GPU worker import
torch (`celery worker -Q knowledge -I workers.knowledge_tasks`,
chat/management/commands/runstack.py).
"""
from __future__ import annotations

import logging
import threading

from celery import Task, shared_task

from chat.catalog import ModelChoice, local_spec, model_resolve
from chat.dispatch import message_dispatch, message_fail
from chat.embeddings import embedding_run
from chat.knowledge.ingest import base_embedder_failed, base_ingest
from chat.knowledge.retrieve import bases_of, prompt_budget, query_of, sources_find
from chat.models import KnowledgeBase, Message
from chat.relay import group_send, message_group
from chat.translations import translation_run
from chatsite import queues
from chatsite.errors import CodedError
from chatsite.logs import message_id_var
from gpu_manager.engines import LocalEngine, engine_create
from gpu_manager.state import LocalSpec

log = logging.getLogger(__name__)

DEVICE = "cpu"


class CpuEngines:
    """This process's engines, on the CPU, one per model, loaded at first
    use and kept; loaded again when the admin's row changed (another
    directory or settings). The threads pool shares them: inference holds
    no state between calls, and loading is under a lock."""

    def __init__(self) -> None:
        self._engines: dict[str, tuple[LocalSpec, LocalEngine]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> LocalEngine:
        spec = local_spec(name)
        with self._lock:
            held = self._engines.get(name)
            if held is not None and held[0] == spec:
                held[1].touch()
                return held[1]
            if held is not None:
                held[1].unload()
            engine = engine_create(spec, device=DEVICE)
            engine.load()
            self._engines[name] = (spec, engine)
            log.info("knowledge worker: %s loaded on the CPU from %s", name, spec.path)
            return engine


engines = CpuEngines()


class KnowledgeTask(Task):
    abstract = True
    ignore_result = True


@shared_task(name=queues.KNOWLEDGE_INGEST, base=KnowledgeTask)
def knowledge_ingest(base_id: int) -> None:
    """A base's ingestion on the CPU (the GPU was not the local models'
    when it was queued: chat/knowledge/bases.py `ingest_queue`)."""
    model = KnowledgeBase.objects.filter(pk=base_id).values_list("embedding_model", flat=True).first()
    if model is None:
        return
    try:
        embedder = engines.get(model)
    except Exception as exc:
        base_embedder_failed(base_id, model, exc)
        return
    base_ingest(base_id=base_id, embedder=embedder, indexed_by=f"knowledge worker on {DEVICE}")


@shared_task(name=queues.KNOWLEDGE_RETRIEVE, base=KnowledgeTask)
def knowledge_retrieve(message_id: int, choice: dict | None = None, priority: int | None = None) -> None:
    """A knowledge-assisted reply's first step: its sources, then its dispatch."""
    message_id_var.set(message_id)
    try:
        reply = Message.objects.select_related("conversation").filter(pk=message_id).first()
        if reply is None or reply.is_finished:
            return
        choice = ModelChoice(**choice) if choice else model_resolve(reply.model_name)
        if reply.sources is None:
            bases = bases_of(reply)
            sources = sources_find(query=query_of(reply), bases=bases, embedders=engines.get,
                                   budget_tokens=prompt_budget(choice))
            if not Message.objects.filter(pk=message_id, sources__isnull=True).update(sources=sources):
                sources = Message.objects.values_list("sources", flat=True).get(pk=message_id)
            group_send(message_group(message_id), {"type": "chat.sources", "message": message_id,
                                                   "sources": sources})
        message_dispatch(message_id=message_id, choice=choice, priority=priority)
    except Exception as exc:
        log.exception("message %s: retrieval failed", message_id)
        message_fail(message_id=message_id, code=exc.code if isinstance(exc, CodedError) else "knowledge_failed",
                     detail=f"The knowledge bases could not be searched: {exc}")
    finally:
        message_id_var.set(None)


@shared_task(name=queues.KNOWLEDGE_TRANSLATE, base=KnowledgeTask)
def knowledge_translate(message_id: int, target: str, engine: str, note: str = "") -> None:
    message_id_var.set(message_id)
    try:
        translation_run(message_id=message_id, target=target, load=lambda: engines.get(engine), device=DEVICE,
                        note=note)
    finally:
        message_id_var.set(None)


@shared_task(name=queues.KNOWLEDGE_EMBED, base=KnowledgeTask)
def knowledge_embed(request: dict, reply_to: dict, choice: dict | None = None) -> None:
    """`/v1/embeddings` off the GPU (chat/embeddings.py): a local engine on
    this worker's CPU, or a call to Ollama or an OpenAI endpoint."""
    embedding_run(request=request, reply_to=reply_to, load=engines.get, by=f"knowledge worker on {DEVICE}",
                  choice=choice)
