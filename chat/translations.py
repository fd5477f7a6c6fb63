"""Translating a message (CONTRACT §9): on request, once per target.

Where it runs is decided from whose the GPU is, so that a translation
never takes the GPU from Ollama (docs/knowledge.md, "Translation"):
- the local models' GPU (or nobody's): the GPU worker, in line with the
  messages on its queue, with the translation engine resident beside the
  chat model (`gpu_translate`);
- Ollama's or an OpenAI endpoint's: the knowledge worker, on the CPU, with
  the same weights; the frame says so, and why (`note`).
The GPU worker checks again when the task runs, and hands it to the CPU
if the GPU changed hands meanwhile.

A translation is stored (Translation) and never computed twice: a second
request gets the stored one; one in flight is not queued again.
"""
from __future__ import annotations

import logging
import time

from django.conf import settings
from django.db import IntegrityError

from chat.catalog import local_engine_config
from chat.models import Message, ModelKind, Translation
from chat.relay import group_send, message_group
from chatsite import queues
from chatsite.celery import app
from chatsite.errors import CodedError, error_code
from chatsite.redis_client import redis_client
from gpu_manager.state import GpuStateStore, gpu_local_now

log = logging.getLogger(__name__)

TARGETS = ("en", "zh-hans")
#: Set while a translation is queued or running: a second request waits for it.
PENDING_KEY = "translate:pending:{message}:{target}"
CPU_NOTE = ("Translated on the CPU: Ollama holds the GPU, and a translation does not take it back "
            "(the local models would have to be loaded again, and Ollama's unloaded).")


class TranslationInputError(CodedError):
    """A request that cannot be accepted; nothing was queued."""


def translation_request(*, user, message_id, target) -> dict | None:
    """Translate one of the user's finished messages into `target`: the
    stored translation's frame at once, or None when it was queued (its
    frame goes to the message's group)."""
    if isinstance(message_id, bool) or not isinstance(message_id, int):
        raise TranslationInputError("bad_frame", "`message` must be a message id.")
    if target not in TARGETS:
        raise TranslationInputError("bad_target", f"`target` must be one of {', '.join(TARGETS)}.")
    message = Message.objects.filter(pk=message_id, conversation__user=user).first()
    if message is None:
        raise TranslationInputError("unknown_message", f"No message {message_id} of yours.")
    if not message.is_finished:
        raise TranslationInputError("not_finished", f"Message {message_id} is still being written.")
    if not message.content.strip():
        raise TranslationInputError("empty_content", f"Message {message_id} has no text to translate.")
    stored = Translation.objects.filter(message=message, target=target).first()
    if stored is not None:
        return translation_frame(stored)
    config = local_engine_config(ModelKind.TRANSLATION, target=target)
    if config is None:
        raise TranslationInputError("translation_unavailable", f"No translation model into {target} is "
                                    "configured: an administrator adds one in the admin (kind “translation”).")
    key = PENDING_KEY.format(message=message_id, target=target)
    if not redis_client().set(key, config.name, nx=True, ex=settings.CELERY_TASK_TIME_LIMIT):
        return None  # already on its way: its frame reaches this socket too
    try:
        translation_route(message_id=message_id, target=target, engine=config.name)
    except Exception:
        redis_client().delete(key)
        raise
    return None


def translation_route(*, message_id: int, target: str, engine: str) -> None:
    """Queue the translation where the GPU's owner allows (module docstring)."""
    if gpu_local_now(settings.GPU_SLOT):
        app.signature(queues.GPU_TRANSLATE, args=(message_id, target, engine),
                      queue=queues.gpu_queue(settings.GPU_SLOT)).apply_async()
    else:
        owner = GpuStateStore(slot=settings.GPU_SLOT).read().owner
        translation_queue_cpu(message_id=message_id, target=target, engine=engine, owner=owner)


def translation_queue_cpu(*, message_id: int, target: str, engine: str, owner: str) -> None:
    note = CPU_NOTE if owner == "ollama" else CPU_NOTE.replace("Ollama holds", "an external model holds")
    app.signature(queues.KNOWLEDGE_TRANSLATE, args=(message_id, target, engine), kwargs={"note": note},
                  queue=queues.KNOWLEDGE_QUEUE).apply_async()


def translation_run(*, message_id: int, target: str, load, device: str, note: str = "") -> None:
    """Translate with the engine `load()` returns (gpu_manager
    TranslationEngine, loaded), store it and send `message.translation`;
    `chat.error` naming the message if it fails (loading included). Either
    way the request is no longer pending."""
    group = message_group(message_id)
    try:
        stored = Translation.objects.filter(message_id=message_id, target=target).first()
        if stored is None:
            text = Message.objects.values_list("content", flat=True).get(pk=message_id)
            engine = load()
            began = time.perf_counter()
            translated = engine.translate(text, target=target)
            try:
                stored = Translation.objects.create(message_id=message_id, target=target, text=translated,
                                                    engine=engine.name, device=device,
                                                    seconds=time.perf_counter() - began)
            except IntegrityError:  # another run stored it first: that one is the answer
                stored = Translation.objects.get(message_id=message_id, target=target)
        group_send(group, {**translation_frame(stored), **({"note": note} if note else {})})
    except Message.DoesNotExist:
        log.info("message %s was deleted before its translation", message_id)
    except Exception as exc:
        log.exception("translation of message %s into %s failed", message_id, target)
        group_send(group, {"type": "chat.error", "message": message_id, "code": error_code(exc),
                           "detail": f"The translation failed: {exc}"})
    finally:
        redis_client().delete(PENDING_KEY.format(message=message_id, target=target))


def translation_frame(translation: Translation) -> dict:
    return {"type": "message.translation", "message": translation.message_id, "target": translation.target,
            "text": translation.text, "engine": translation.engine, "device": translation.device}


def translations_of(message_ids: list[int]) -> dict[int, dict]:
    """Stored translations per message, for the page's history."""
    found: dict[int, dict] = {}
    for t in Translation.objects.filter(message_id__in=message_ids):
        found.setdefault(t.message_id, {})[t.target] = {"text": t.text, "engine": t.engine, "device": t.device}
    return found
