"""Read-only views of the service's state, for pages and APIs."""
from __future__ import annotations

from chat.catalog import catalog_list, default_model_name
from gpu_manager.state import GpuStateStore, gpu_slots


def gpu_status(*, events_limit: int = 500) -> dict:
    """CONTRACT §5. Memory figures are the GPU worker's, read at its start and
    after each transition: the web process holds no model and must not
    probe the device."""
    slots, events = [], []
    for slot in gpu_slots():
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
        })
    events.sort(key=lambda e: e["at"])
    return {"slots": slots, "events": [_public_event(e) for e in events[-events_limit:]]}


def models_available() -> dict:
    """What the picker offers: every model, marked when it is resident now."""
    choices, errors = catalog_list()
    resident = set()
    for slot in gpu_slots():
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
    return {k: event.get(k) for k in keys} | {k: event[k] for k in ("before", "after", "survivors") if k in event}
