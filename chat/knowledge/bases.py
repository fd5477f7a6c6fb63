"""Knowledge bases on a user's behalf (CONTRACT §8): create one from
uploaded files, add files, delete it, and read it as the API shows it. The
indexing itself is the knowledge worker's (chat/knowledge/ingest.py): a
request stores the files and queues it, nothing more.

A request that cannot be done raises `KnowledgeInputError` and changes
nothing."""
from __future__ import annotations

import logging
from pathlib import Path

from django.conf import settings
from django.db import transaction

from chat.catalog import local_engine_config
from chat.knowledge.parse import TEXT_TYPES
from chat.models import KnowledgeBase, KnowledgeDocument, KnowledgeStatus, ModelKind
from chatsite import queues
from chatsite.celery import app
from chatsite.errors import CodedError
from gpu_manager.state import gpu_local_now

log = logging.getLogger(__name__)

NAME_MAX = KnowledgeBase._meta.get_field("name").max_length
FILENAME_MAX = KnowledgeDocument._meta.get_field("name").max_length


class KnowledgeInputError(CodedError):
    """A request that cannot be accepted; nothing was stored."""

    def __init__(self, code: str, detail: str, *, status: int = 400):
        super().__init__(code, detail)
        self.status = status


class UnknownKnowledge(KnowledgeInputError):
    def __init__(self, detail: str):
        super().__init__("unknown_knowledge", detail, status=404)


def base_create(*, user, name: str, files: list) -> KnowledgeBase:
    """A new base holding `files` (uploaded files: `.name`, `.size`, `.read()`),
    indexed by the knowledge worker after the commit."""
    name = " ".join(str(name or "").split())
    if not name:
        raise KnowledgeInputError("empty_name", "The knowledge base needs a name.")
    if "\x00" in name:
        raise KnowledgeInputError("bad_name", "The name contains a NUL character (\\u0000).")
    uploads = _uploads_read(files)
    embedder = local_engine_config(ModelKind.EMBEDDING)
    if embedder is None:
        raise KnowledgeInputError("no_embedding_model", "No embedding model is configured: an administrator "
                                  "adds one in the admin (kind “embedding”).", status=409)
    with transaction.atomic():
        base = KnowledgeBase.objects.create(user=user, name=name[:NAME_MAX], embedding_model=embedder.name)
        _documents_add(base, uploads)
    return base


def base_files_add(*, base: KnowledgeBase, files: list) -> KnowledgeBase:
    uploads = _uploads_read(files)
    with transaction.atomic():
        base = KnowledgeBase.objects.select_for_update().get(pk=base.pk)
        _documents_add(base, uploads)
        base.status = KnowledgeStatus.INDEXING
        base.save(update_fields=["status", "updated_at"])
    return base


def base_delete(*, base: KnowledgeBase) -> None:
    """Delete a base, its documents and chunks, and its index on disk. An
    ingestion under way finds the base gone and drops what it built."""
    # Imported here: the web process loads numpy and bm25s only to delete.
    from chat.knowledge.search import Index

    directory = base_directory(base.pk)
    base.delete()
    transaction.on_commit(lambda: Index.drop(directory), robust=True)


def base_directory(base_id: int) -> Path:
    return Path(settings.KNOWLEDGE_DIR) / f"base-{base_id}"


def base_get(*, user, base_id: int) -> KnowledgeBase:
    base = KnowledgeBase.objects.filter(pk=base_id, user=user).first()
    if base is None:
        raise UnknownKnowledge(f"No knowledge base {base_id} of yours.")
    return base


def bases_usable(*, user, ids) -> list[int]:
    """Check a message's `knowledge` (CONTRACT §8) before anything is
    stored: a list of the user's ready bases. ChatInputError-compatible
    codes: bad_frame, unknown_knowledge, knowledge_not_ready."""
    if ids is None:
        return []
    if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise KnowledgeInputError("bad_frame", "`knowledge` must be a list of knowledge base ids.")
    ids = list(dict.fromkeys(ids))
    if len(ids) > settings.KNOWLEDGE_MAX_BASES:
        raise KnowledgeInputError("bad_frame", f"At most {settings.KNOWLEDGE_MAX_BASES} knowledge bases a message.")
    found = dict(KnowledgeBase.objects.filter(pk__in=ids, user=user).values_list("pk", "status"))
    missing = [i for i in ids if i not in found]
    if missing:
        raise KnowledgeInputError("unknown_knowledge", f"No knowledge base {missing[0]} of yours.")
    waiting = [i for i in ids if found[i] != KnowledgeStatus.READY]
    if waiting:
        raise KnowledgeInputError("knowledge_not_ready", f"Knowledge base {waiting[0]} is not ready "
                                  f"({found[waiting[0]]}): wait until it is indexed.")
    return ids


def base_public(base: KnowledgeBase) -> dict:
    documents = list(base.documents.order_by("pk").values(
        "pk", "name", "status", "chunk_count", "error", "error_code", "progress", "size"))
    done = sum(1.0 if d["status"] != KnowledgeStatus.INDEXING else d["progress"] for d in documents)
    return {
        "id": base.pk,
        "name": base.name,
        "status": base.status,
        "documents": len(documents),
        "chunks": base.chunk_count,
        "progress": round(done / len(documents), 3) if documents else 1.0,
        "files": [{"id": d["pk"], "name": d["name"], "status": d["status"], "chunks": d["chunk_count"],
                   "size": d["size"], "error": d["error"], "error_code": d["error_code"]} for d in documents],
        "embedding_model": base.embedding_model,
        "indexed_by": base.indexed_by,
        "error": base.error,
        "created_at": base.created_at,
    }


def ingest_queue(base_id: int, *, gpu: bool | None = None) -> None:
    """Queue a base's ingestion: on the GPU worker, with the embedding
    engine resident beside the chat model, while the local models hold the
    GPU; on the knowledge worker's CPU while an external owner does (an
    upload never takes the GPU from Ollama). `gpu`: decided by the caller."""
    if gpu is None:
        gpu = gpu_local_now(settings.GPU_SLOT)
    if gpu:
        app.signature(queues.GPU_INGEST, args=(base_id,), queue=queues.gpu_queue(settings.GPU_SLOT)).apply_async()
    else:
        app.signature(queues.KNOWLEDGE_INGEST, args=(base_id,), queue=queues.KNOWLEDGE_QUEUE).apply_async()


def _uploads_read(files: list) -> list[tuple[str, bytes]]:
    if not files:
        raise KnowledgeInputError("no_files", "Upload at least one file (.txt, .md or .pdf).")
    if len(files) > settings.KNOWLEDGE_MAX_FILES:
        raise KnowledgeInputError("too_many_files", f"At most {settings.KNOWLEDGE_MAX_FILES} files at once.")
    uploads = []
    for upload in files:
        name = Path(str(upload.name or "")).name[:FILENAME_MAX]
        if not name or "\x00" in name:
            raise KnowledgeInputError("bad_filename", "A file has no usable name.")
        if Path(name).suffix.lower() not in TEXT_TYPES:
            raise KnowledgeInputError("document_unsupported", f"{name}: only .txt, .md and .pdf files can be "
                                      "added to a knowledge base.")
        if upload.size > settings.KNOWLEDGE_MAX_FILE_BYTES:
            raise KnowledgeInputError("file_too_large", f"{name} is larger than "
                                      f"{settings.KNOWLEDGE_MAX_FILE_BYTES // (1024 * 1024)} MiB.", status=413)
        uploads.append((name, upload.read()))
    return uploads


def _documents_add(base: KnowledgeBase, uploads: list[tuple[str, bytes]]) -> None:
    KnowledgeDocument.objects.bulk_create(
        [KnowledgeDocument(base=base, name=name, size=len(data), data=data) for name, data in uploads])
    transaction.on_commit(lambda: ingest_queue(base.pk))
