"""The GPU's state in Redis: who owns it, what is resident, and an epoch.

Readers anywhere (the status API, the CPU workers, the admin) see the same
truth as the GPU worker that writes it. Every write names the epoch it read
and fails if another writer came between (fencing), so a stale writer can
never overwrite a newer state.

Keys, per slot S:
  gpu:slot:S          hash  owner, local_models (JSON), ollama_models (JSON), epoch, updated_at
  gpu:slot:S:events   list  JSON transitions, oldest first, trimmed to GPU_EVENTS_KEPT
  gpu:slot:S:memory   JSON  the worker's last memory reading (device, allocated, reserved, free, total)
  gpu:slot:S:current  str   the message the GPU worker is working on, while it is
  gpu:slot:S:counters hash  transitions and bytes freed since the slot began (/metrics)
  gpu:slots           set   every slot that has ever written
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from chatsite.redis_client import redis_client

OWNERS = ("none", "local", "ollama", "openai")

# Compare-and-set in one round trip: Redis runs a script atomically, so no
# other writer can slip between the epoch check and the write.
_WRITE = """
local current = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if current ~= tonumber(ARGV[1]) then return -1 end
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'local_models', ARGV[3],
           'ollama_models', ARGV[4], 'updated_at', ARGV[5], 'epoch', current + 1)
redis.call('SADD', KEYS[2], ARGV[6])
return current + 1
"""


#: Transitions kept in a slot's event list: CONTRACT §5 asks for at least
#: the last 500 (GPU_EVENTS_KEPT in chatsite/settings.py).
EVENTS_KEPT = 1000


class StaleState(Exception):
    """Another writer changed the state since it was read."""


@dataclass(frozen=True)
class LocalSpec:
    """What the manager needs to know of a local model (from the admin)."""

    name: str
    path: str
    keep_alive: float = 0.0
    warm_offload: bool = False
    #: "chat", "embedding" or "translation" (gpu_manager/engines.py ENGINES).
    engine: str = "chat"
    #: The engine's own settings, as (name, value) pairs: an embedding
    #: model's pooling and prefixes, a translation model's targets.
    options: tuple = ()


@dataclass
class GpuState:
    slot: str
    owner: str = "none"
    local_models: list[str] = field(default_factory=list)
    ollama_models: list[str] = field(default_factory=list)
    epoch: int = 0
    updated_at: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


class GpuStateStore:
    def __init__(self, *, slot: str, events_kept: int = EVENTS_KEPT):
        self.slot = slot
        self.events_kept = events_kept
        self.key = f"gpu:slot:{slot}"
        self.events_key = f"{self.key}:events"
        self.memory_key = f"{self.key}:memory"
        self._redis = redis_client()
        self._write = self._redis.register_script(_WRITE)

    def read(self) -> GpuState:
        raw = self._redis.hgetall(self.key)
        if not raw:
            return GpuState(slot=self.slot)
        return GpuState(
            slot=self.slot,
            owner=raw.get("owner", "none"),
            local_models=json.loads(raw.get("local_models", "[]")),
            ollama_models=json.loads(raw.get("ollama_models", "[]")),
            epoch=int(raw.get("epoch", 0)),
            updated_at=float(raw.get("updated_at", 0)),
        )

    def write(self, state: GpuState, **changes) -> GpuState:
        """Write `state` with `changes` applied, if nobody wrote since it was read."""
        new = GpuState(**{**state.as_dict(), **changes})
        if new.owner not in OWNERS:
            raise ValueError(f"unknown GPU owner {new.owner!r}")
        new.updated_at = time.time()
        epoch = self._write(
            keys=[self.key, "gpu:slots"],
            args=[state.epoch, new.owner, json.dumps(new.local_models), json.dumps(new.ollama_models),
                  new.updated_at, self.slot],
        )
        if epoch == -1:
            raise StaleState(f"GPU slot {self.slot} changed since epoch {state.epoch}")
        new.epoch = epoch
        return new

    def event_add(self, event: dict) -> None:
        """Append a transition, and count it (the event list is trimmed; the
        counters behind /metrics are not)."""
        pipe = self._redis.pipeline()
        pipe.rpush(self.events_key, json.dumps(event))
        pipe.ltrim(self.events_key, -self.events_kept, -1)
        pipe.hincrby(f"{self.key}:counters", f"count:{event['kind']}", 1)
        if event.get("freed_bytes", 0) > 0:
            pipe.hincrby(f"{self.key}:counters", f"freed:{event['kind']}", int(event["freed_bytes"]))
        pipe.execute()

    def counters(self) -> dict[str, int]:
        """Transitions per kind (`count:<kind>`) and bytes freed (`freed:<kind>`)."""
        return {k: int(v) for k, v in self._redis.hgetall(f"{self.key}:counters").items()}

    def current_set(self, message_id: int | None) -> None:
        """Mark what the GPU worker is working on, so that a worker that
        restarts after a crash knows which reply died with its predecessor."""
        if message_id is None:
            self._redis.delete(f"{self.key}:current")
        else:
            self._redis.set(f"{self.key}:current", str(message_id))

    def current(self) -> int | None:
        raw = self._redis.get(f"{self.key}:current")
        return int(raw) if raw else None

    def memory_write(self, reading: dict) -> None:
        self._redis.set(self.memory_key, json.dumps(reading))

    def memory(self) -> dict:
        raw = self._redis.get(self.memory_key)
        reading = json.loads(raw) if raw else {}
        return {
            "device": reading.get("device", "unknown"),
            **{k: reading.get(k, 0) for k in ("allocated", "reserved", "free", "total")},
        }

    def events(self, limit: int = 500) -> list[dict]:
        return [json.loads(e) for e in self._redis.lrange(self.events_key, -limit, -1)]


def gpu_local_now(slot: str) -> bool:
    """The GPU is the local models' (or nobody's, with nothing of Ollama's
    on it): a local engine's side work (an ingestion, a translation) may
    use it without taking it from an external owner. Otherwise that work
    runs on the knowledge worker's CPU (docs/knowledge.md)."""
    state = GpuStateStore(slot=slot).read()
    return state.owner in ("local", "none") and not state.ollama_models


def gpu_slots(*, default: str) -> list[str]:
    """Every slot that has written a state; `default` (this deployment's
    GPU_SLOT) before any has."""
    return sorted(redis_client().smembers("gpu:slots")) or [default]
