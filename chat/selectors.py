"""Read-only views of the service's state, for pages and APIs."""
from __future__ import annotations

from pathlib import Path

from django.conf import settings

from chat.catalog import PREFIXES, catalog_list, default_model_name
from chat.models import LOCAL_KINDS, FINISHED_STATUSES, Conversation, Message, MessageStatus, ModelConfig, ModelKind
from chat.translations import translations_of
from chatsite.openai_client import OpenAIEndpointError, openai_models
from chatsite.ollama_client import OllamaError, ollama_tags
from gpu_manager.scheduler import slot_scheduler
from gpu_manager.state import GpuStateStore, gpu_slots


def slots_known() -> list[str]:
    """Every GPU slot that has written a state; this deployment's GPU_SLOT
    before any has."""
    return gpu_slots(default=settings.GPU_SLOT)


def gpu_status(*, events_limit: int = 500) -> dict:
    """CONTRACT §5. Memory figures are the GPU worker's, read at its start and
    after each transition: the web process holds no model and must not
    probe the device. Beyond the contract, each slot's `scheduler`: who
    waits for it, the gate and the switch-cost estimate (Scheduler.snapshot)."""
    slots, events = [], []
    for slot in slots_known():
        store = GpuStateStore(slot=slot)
        state = store.read()
        slot_events = store.events(events_limit)
        events.extend(slot_events)
        slots.append({
            "slot": slot,
            "owner": state.owner,
            "local_models": state.local_models,
            "ollama_models": state.ollama_models,
            "memory": store.memory(),
            "epoch": state.epoch,
            "scheduler": slot_scheduler(slot).snapshot(),
        })
    events.sort(key=lambda e: e["at"])
    return {"slots": slots, "events": [_public_event(e) for e in events[-events_limit:]]}


def models_available() -> dict:
    """What the picker offers: every model, marked when it is resident now."""
    choices, errors = catalog_list()
    resident = set()
    for slot in slots_known():
        state = GpuStateStore(slot=slot).read()
        resident.update(state.local_models)
        resident.update(f"ollama_{tag}" for tag in state.ollama_models)
    return {
        "models": [{"name": c.name, "kind": c.kind, "available": True, "resident": c.name in resident,
                    "detail": ""} for c in choices],
        "default": default_model_name(),
        "errors": errors,
    }


def _public_event(event: dict) -> dict:
    keys = ("at", "slot", "kind", "model", "freed_bytes", "seconds")
    # Beyond CONTRACT §5: the memory readings around the step, what survived
    # an unload, and the details the chat page's GPU panel words events by.
    extra = ("before", "after", "survivors", "warm", "reason", "endpoint", "previous")
    return {k: event.get(k) for k in keys} | {k: event[k] for k in extra if k in event}


# --- conversations and messages, always scoped to their owner -----------------

def conversations_list(*, user) -> list[dict]:
    """The user's conversations, most recently used first, each marked when a
    reply in it is still queued or streaming (the list shows a spinner).
    Batch lines are left out: a 2,000-line batch is one batch (the API and
    the admin list it), not 2,000 conversations in the chat page's list."""
    busy = set(
        Message.objects.filter(conversation__user=user, role=Message.Role.ASSISTANT)
        .exclude(status__in=FINISHED_STATUSES)
        .values_list("conversation_id", flat=True)
    )
    return [
        {"id": c.pk, "title": c.title or "", "updated_at": c.updated_at, "busy": c.pk in busy}
        for c in Conversation.objects.filter(user=user).exclude(messages__batch_line__isnull=False)
        .order_by("-updated_at", "-pk")
    ]


def conversation_get(*, user, conversation_id: int) -> Conversation:
    """The user's conversation; Conversation.DoesNotExist for anyone else's."""
    return Conversation.objects.get(pk=conversation_id, user=user)


def conversation_messages(*, conversation: Conversation) -> list[dict]:
    messages = list(conversation.messages.order_by("pk"))
    positions = queue_positions(message_ids=[m.pk for m in messages if m.status == MessageStatus.QUEUED])
    translations = translations_of([m.pk for m in messages])
    return [message_public(m, queue_position=positions.get(m.pk), translations=translations.get(m.pk, {}))
            for m in messages]


def message_get(*, user, message_id: int) -> Message:
    """The user's message; Message.DoesNotExist for anyone else's."""
    return Message.objects.select_related("conversation").get(pk=message_id, conversation__user=user)


def queue_positions(*, message_ids: list[int]) -> dict[int, int]:
    """How many replies are ahead of each queued one: every unfinished reply
    queued before it, of any user. A rough figure, for a page that reloads
    while a reply waits: the GPU's scheduler serves by owner, not in arrival
    order (gpu_manager/scheduler.py), and a reply for an OpenAI endpoint that
    does not use the GPU is counted although it does not wait for it. The
    scheduler's own place comes in the reply's `queued` frame."""
    if not message_ids:
        return {}
    ahead = list(
        Message.objects.filter(role=Message.Role.ASSISTANT, pk__lt=max(message_ids))
        .exclude(status__in=FINISHED_STATUSES)
        .values_list("pk", flat=True)
    )
    return {mid: sum(1 for pk in ahead if pk < mid) for mid in message_ids}


def message_public(message: Message, *, queue_position: int | None = None,
                   translations: dict | None = None) -> dict:
    """One message as the chat page shows it, with the figures under a reply:
    time to first token (from the moment it was sent, so queueing and any GPU
    switch count, as the user felt them) and tokens per second while it
    streamed."""
    ttft = tps = None
    if message.first_token_at and message.queued_at:
        ttft = round((message.first_token_at - message.queued_at).total_seconds(), 3)
    if message.first_token_at and message.finished_at and message.completion_tokens:
        streaming = (message.finished_at - message.first_token_at).total_seconds()
        # One token, or a reply that arrived in one frame, has no rate to speak of.
        if streaming > 0 and message.completion_tokens > 1:
            tps = round(message.completion_tokens / streaming, 1)
    return {
        "id": message.pk,
        "conversation": message.conversation_id,
        "role": message.role,
        "content": message.content,
        "model": message.model_name,
        # The page's own id for a send, to tell after a reconnect whether it arrived.
        "client_id": message.client_id,
        "status": message.status,
        "finish_reason": message.finish_reason,
        "error_code": message.error_code,
        "error_detail": message.error_detail,
        "usage": message.usage(),
        "queued_at": message.queued_at,
        "first_token_at": message.first_token_at,
        "finished_at": message.finished_at,
        "ttft_seconds": ttft,
        "tokens_per_second": tps,
        "queue_position": queue_position,
        # CONTRACT §8 and §9: the passages the reply drew on, and its translations.
        "knowledge": message.knowledge or [],
        "sources": message.sources or [],
        "translations": translations if translations is not None else translations_of([message.pk]).get(
            message.pk, {}),
    }


# --- the admin's checks ------------------------------------------------------

def model_config_probe(*, config: ModelConfig) -> dict:
    """Ask what a configured model or endpoint offers now, bypassing the
    catalog's cache: {"ok", "detail", "models"}. A local model's directory is
    checked on disk (loading it is the GPU worker's business, not the web
    process's); an endpoint is asked for its model list."""
    if config.kind in LOCAL_KINDS:
        path = Path(config.path)
        if not (path / "config.json").is_file():
            return {"ok": False, "detail": f"{path} has no config.json: not a model directory", "models": []}
        weights = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
        if not weights:
            return {"ok": False, "detail": f"{path} holds no .safetensors or .bin weights", "models": []}
        size = sum((path / w).stat().st_size for w in weights)
        resident = any(config.name in GpuStateStore(slot=s).read().local_models for s in slots_known())
        state = "resident on the GPU now" if resident else "not loaded now"
        return {"ok": True, "detail": f"{len(weights)} weight file(s), {size:,} bytes; {state}",
                "models": [config.name]}
    try:
        if config.kind == ModelKind.OLLAMA:
            found = ollama_tags(config.base_url)
        else:
            found = openai_models(config.base_url.rstrip("/"), config.api_key)
    except (OllamaError, OpenAIEndpointError) as exc:
        return {"ok": False, "detail": str(exc), "models": []}
    prefix = PREFIXES[config.kind]
    return {"ok": True, "detail": f"{len(found)} model(s)", "models": [prefix + name for name in found]}
