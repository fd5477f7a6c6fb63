"""Which GPU slot serves a message, when there are several (one GPU worker
per GPU, each consuming its own queue `gpu.<slot>`).

- A local model goes to a slot where it is resident already (no load), else
  to the least busy slot (queued + running), so two local models are served
  in parallel by two GPUs instead of swapping on one.
- Ollama's work, and external models that free the GPU, go to the slot whose
  GPU Ollama shares (OLLAMA_GPU_SLOT): Ollama places its models on the GPU
  it was started on, and that is the only GPU whose local models must make
  room for it (docs/gpu-arbitration.md, "Several GPUs").
"""
from __future__ import annotations

from django.conf import settings

from chatsite.redis_client import redis_client
from gpu_manager.state import GpuStateStore
from workers.heartbeat import workers_alive

QUEUE_PREFIX = "gpu."


def gpu_queue(slot: str) -> str:
    return f"{QUEUE_PREFIX}{slot}"


def gpu_slots_alive() -> list[str]:
    """Slots whose GPU worker is alive now; the configured one when none is
    (a message then waits in its queue for the worker to come)."""
    alive = [q.removeprefix(QUEUE_PREFIX) for q in workers_alive() if q.startswith(QUEUE_PREFIX)]
    return sorted(alive) or [settings.GPU_SLOT]


def slot_for_local(name: str) -> str:
    slots = gpu_slots_alive()
    states = {slot: GpuStateStore(slot=slot).read() for slot in slots}
    for slot in slots:
        if name in states[slot].local_models:
            return slot
    return min(slots, key=lambda s: (_busy(s), len(states[s].local_models), s))


def slot_for_external() -> str:
    return settings.OLLAMA_GPU_SLOT


def _busy(slot: str) -> int:
    """Messages queued for the slot (every priority list) plus the one running."""
    r = redis_client()
    queue = gpu_queue(slot)
    lists = [queue, *r.scan_iter(match=f"{queue}\x06\x16*")]
    running = 1 if GpuStateStore(slot=slot).current() is not None else 0
    return sum(r.llen(name) for name in lists) + running
