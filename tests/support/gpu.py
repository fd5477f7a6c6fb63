"""A GPU manager on the CPU, on a slot of its own, for tests of its decisions."""
from __future__ import annotations

import contextlib
from typing import Iterator

from chatsite.redis_client import redis_client
from gpu_manager.leases import Leases
from gpu_manager.manager import GpuManager
from gpu_manager.state import GpuStateStore


@contextlib.contextmanager
def manager_on_slot(slot: str) -> Iterator[GpuManager]:
    """A fresh manager whose slot starts and ends with no state in Redis;
    its engines are unloaded at the end."""
    r = redis_client()
    keys = [f"gpu:slot:{slot}{suffix}" for suffix in ("", ":events", ":memory", ":current", ":leases", ":counters")]
    r.delete(*keys)
    mgr = GpuManager(slot=slot, device="cpu", store=GpuStateStore(slot=slot), leases=Leases(slot=slot))
    try:
        yield mgr
    finally:
        for engine in list(mgr.engines.values()):
            engine.unload()
        r.delete(*keys)
        r.srem("gpu:slots", slot)
