"""Indexing a knowledge base: the knowledge worker's task
(workers/knowledge_tasks.py), never the web process's.

For each document waiting in the base: its text (chat/knowledge/parse.py),
its chunks, counted with the embedding model's own tokenizer
(chat/knowledge/text.py), their vectors, and then one new index holding
the base's earlier chunks and the new ones (chat/knowledge/search.py),
written beside the old one and switched to in one transaction together
with the chunks' rows. A document that cannot be read gets its own error
and the others go on; a crash leaves the documents waiting and the old
index in use: nothing is ever half indexed.

An index records its embedding model. When the base's model is no longer
the one configured, the earlier chunks are embedded again into a new
index, never mixed with vectors of another model.

The embedder is handed in (it is a torch model, which chat/ never imports):
anything with `name`, `dimension`, `token_count(text)` and
`embed(texts, kind=)`.
"""
from __future__ import annotations

import logging
import re
import uuid
from pathlib import Path
from typing import Protocol

import numpy as np
from django.conf import settings
from django.db import IntegrityError, transaction

from chat.knowledge.bases import base_directory
from chat.knowledge.parse import DocumentError, document_text
from chat.knowledge.search import Index, QdrantUnavailable
from chat.knowledge.text import chunk_text
from chat.models import KnowledgeBase, KnowledgeChunk, KnowledgeDocument, KnowledgeStatus
from chatsite.redis_client import redis_client

log = logging.getLogger(__name__)

#: Chunks embedded at a time; a document's progress is saved after each batch.
EMBED_BATCH = 32


class Embedder(Protocol):
    name: str

    @property
    def dimension(self) -> int: ...

    def token_count(self, text: str) -> int: ...

    def embed(self, texts: list[str], *, kind: str = "passage"): ...


def base_ingest(*, base_id: int, embedder: Embedder, indexed_by: str) -> None:
    """Index the base's waiting documents with `embedder`; one ingestion of a
    base at a time (a Redis lock: two uploads in a row are indexed one after
    the other, each index holding the other's chunks). `indexed_by`: where
    it runs, as the base will tell ("gpu worker on cuda:0")."""
    lock = redis_client().lock(f"knowledge:ingest:{base_id}", timeout=settings.CELERY_TASK_TIME_LIMIT,
                               blocking_timeout=settings.CELERY_TASK_TIME_LIMIT)
    with lock:
        try:
            _ingest(base_id, embedder, indexed_by)
        except Exception as exc:
            # Not a document's fault (those fail alone, above): the waiting
            # documents say so, and the base keeps its last index.
            log.exception("knowledge base %s: ingestion failed", base_id)
            base_documents_fail(base_id, code="knowledge_ingest_failed", detail=f"Indexing failed: {exc}")


def base_embedder_failed(base_id: int, model: str, exc: Exception) -> None:
    """The base's embedding model cannot be used (gone from the admin, or
    it does not load): its waiting documents and the base say why."""
    log.error("knowledge base %s: its embedding model %s cannot be used: %s", base_id, model, exc)
    base_documents_fail(base_id, code=getattr(exc, "code", "model_load_failed"),
                        detail=f"The embedding model {model} cannot be used: {exc}")


def base_documents_fail(base_id: int, *, code: str, detail: str) -> None:
    """End the base's waiting documents with an error; the base stays ready
    with its last index when it has one."""
    KnowledgeDocument.objects.filter(base_id=base_id, status=KnowledgeStatus.INDEXING).update(
        status=KnowledgeStatus.ERROR, error_code=code, error=detail, data=b"")
    KnowledgeBase.objects.filter(pk=base_id).update(
        status=KnowledgeStatus.READY if KnowledgeBase.objects.filter(pk=base_id, chunk_count__gt=0).exists()
        else KnowledgeStatus.ERROR, error=detail)


def _ingest(base_id: int, embedder: Embedder, indexed_by: str) -> None:
    base = KnowledgeBase.objects.filter(pk=base_id).first()
    if base is None:
        return
    waiting = list(base.documents.filter(status=KnowledgeStatus.INDEXING).order_by("pk"))
    old_texts = list(base.chunks.order_by("position").values_list("text", flat=True))
    old_vectors = _earlier_vectors(base, embedder, len(old_texts))
    if old_vectors is None:  # no index of this model yet: the earlier chunks are embedded again
        old_vectors = _embed(embedder, old_texts)
    new_chunks: list[tuple[KnowledgeDocument, int, str]] = []
    new_vectors = [np.zeros((0, embedder.dimension), dtype=np.float32)]
    failed: list[KnowledgeDocument] = []
    for document in waiting:
        try:
            texts = chunk_text(document_text(document.name, bytes(document.data)), count=embedder.token_count,
                               size=settings.KNOWLEDGE_CHUNK_TOKENS, overlap=settings.KNOWLEDGE_CHUNK_OVERLAP)
        except DocumentError as exc:
            document.status, document.error_code, document.error = KnowledgeStatus.ERROR, exc.code, exc.detail
            failed.append(document)
            continue
        new_vectors.append(_embed(embedder, texts, document=document))
        new_chunks.extend((document, seq, text) for seq, text in enumerate(texts))
    texts = old_texts + [text for _, _, text in new_chunks]
    index_path = None
    if texts:
        vectors = np.vstack([old_vectors, *new_vectors])
        index = Index.build(model=embedder.name, texts=texts, vectors=vectors)
        index_path = index.save(base_directory(base_id) / f"{_slug(embedder.name)}-{embedder.dimension}-"
                                                          f"{uuid.uuid4().hex[:8]}")
    try:
        previous = _switch(base_id, embedder, waiting=waiting, failed=failed, new_chunks=new_chunks,
                           first=len(old_texts), index_path=index_path, total=len(texts), indexed_by=indexed_by)
    except (KnowledgeBase.DoesNotExist, IntegrityError):
        # Deleted while it was indexed: what was built goes with it.
        log.info("knowledge base %s was deleted while it was indexed", base_id)
        if index_path is not None:
            Index.drop(index_path)
        return
    if previous and (index_path is None or Path(previous) != index_path):
        try:
            Index.drop(Path(settings.KNOWLEDGE_DIR) / previous)
        except QdrantUnavailable:  # the new index is in use: the old collection is left over, not a failure
            log.warning("knowledge base %s: old index %s not dropped", base_id, previous, exc_info=True)


def _switch(base_id: int, embedder: Embedder, *, waiting, failed, new_chunks, first: int, index_path,
            total: int, indexed_by: str) -> str:
    """Make the new index the base's, with its chunks, in one transaction;
    return the previous index's path."""
    with transaction.atomic():
        base = KnowledgeBase.objects.select_for_update().get(pk=base_id)
        previous = base.index_path
        KnowledgeChunk.objects.bulk_create(
            [KnowledgeChunk(base_id=base_id, document=document, seq=seq, position=first + i, text=text)
             for i, (document, seq, text) in enumerate(new_chunks)], batch_size=500)
        counts: dict[int, int] = {}
        for document, _, _ in new_chunks:
            counts[document.pk] = counts.get(document.pk, 0) + 1
        failed_ids = {d.pk for d in failed}
        for document in waiting:
            if document.pk in failed_ids:
                KnowledgeDocument.objects.filter(pk=document.pk).update(
                    status=KnowledgeStatus.ERROR, error_code=document.error_code, error=document.error,
                    progress=1.0, data=b"")
            else:
                KnowledgeDocument.objects.filter(pk=document.pk).update(
                    status=KnowledgeStatus.READY, chunk_count=counts.get(document.pk, 0), progress=1.0, data=b"")
        still_waiting = base.documents.filter(status=KnowledgeStatus.INDEXING).exclude(
            pk__in=[d.pk for d in waiting]).exists()
        base.index_path = str(index_path.relative_to(settings.KNOWLEDGE_DIR)) if index_path else ""
        base.embedding_model, base.dimension, base.chunk_count = embedder.name, embedder.dimension, total
        base.indexed_by = indexed_by
        if still_waiting:
            base.status = KnowledgeStatus.INDEXING  # files added meanwhile: their ingestion is queued
        elif total:
            base.status, base.error = KnowledgeStatus.READY, ""
        else:
            base.status = KnowledgeStatus.ERROR
            base.error = "No document of this base could be read: see each file's error."
        base.save()
    return previous


def _earlier_vectors(base: KnowledgeBase, embedder: Embedder, count: int) -> np.ndarray | None:
    """The vectors of the base's indexed chunks, from its index, when that
    index was built with this embedder; None when they must be embedded again."""
    if not count:
        return np.zeros((0, embedder.dimension), dtype=np.float32)
    if not base.index_path or base.embedding_model != embedder.name or base.dimension != embedder.dimension:
        return None
    try:
        index = Index.load(Path(settings.KNOWLEDGE_DIR) / base.index_path)
    except (OSError, ValueError) as exc:
        log.warning("knowledge base %s: its index cannot be read (%s); embedding its chunks again", base.pk, exc)
        return None
    return index.vectors if len(index) == count and index.model == embedder.name else None


def _embed(embedder: Embedder, texts: list[str], *, document: KnowledgeDocument | None = None) -> np.ndarray:
    rows = [np.zeros((0, embedder.dimension), dtype=np.float32)]
    for start in range(0, len(texts), EMBED_BATCH):
        rows.append(np.asarray(embedder.embed(texts[start:start + EMBED_BATCH], kind="passage"), dtype=np.float32))
        if document is not None:
            done = min(len(texts), start + EMBED_BATCH) / len(texts)
            KnowledgeDocument.objects.filter(pk=document.pk).update(progress=round(0.99 * done, 3))
    return np.vstack(rows)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:60] or "model"
