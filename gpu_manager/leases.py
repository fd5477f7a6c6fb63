"""Leases: how an Ollama generation on a CPU worker holds the GPU.

The GPU worker grants a lease (in queue order, in the acquire step) before
the generation is queued; the CPU worker renews it while it streams and
releases it at the end. The GPU worker waits until no lease is live before
it unloads Ollama's models, so no Ollama generation runs while a local
model is resident (docs/gpu-arbitration.md, I1).

A lease is a member of a sorted set scored by its expiry time, so that a
holder that dies stops holding the GPU when its lease expires. Renewal is
conditional: a lease that expired and was reaped is never revived, and its
holder learns that it must stop.

Keys, per slot S:  gpu:slot:S:leases  zset  message id -> expiry (Unix time)
"""
from __future__ import annotations

import threading
import time

from chatsite.redis_client import redis_client

# Renew only a lease that exists and has not expired: once the GPU worker
# may have acted on its expiry, the holder must not come back.
_RENEW = """
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) < tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
return 1
"""

# Remove and return expired leases in one step, so two reapers never both
# act on the same one.
_REAP = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if #expired > 0 then redis.call('ZREM', KEYS[1], unpack(expired)) end
return expired
"""


class LeaseLost(Exception):
    """The lease expired (or was reaped) while its holder still ran."""

    code = "gpu_lease_lost"


class Leases:
    def __init__(self, *, slot: str):
        self.key = f"gpu:slot:{slot}:leases"
        self._redis = redis_client()
        self._renew = self._redis.register_script(_RENEW)
        self._reap = self._redis.register_script(_REAP)

    def grant(self, holder: int | str, *, ttl: float) -> None:
        self._redis.zadd(self.key, {str(holder): time.time() + ttl})

    def renew(self, holder: int | str, *, ttl: float) -> None:
        now = time.time()
        if not self._renew(keys=[self.key], args=[str(holder), now, now + ttl]):
            raise LeaseLost(f"the GPU lease of {holder} expired")

    def release(self, holder: int | str) -> None:
        self._redis.zrem(self.key, str(holder))

    def reap(self) -> list[str]:
        """Remove expired leases; returns their holders."""
        return list(self._reap(keys=[self.key], args=[time.time()]))

    def live(self) -> list[str]:
        return list(self._redis.zrangebyscore(self.key, time.time(), "+inf"))


class LeaseKeeper:
    """Holds a granted lease while a generation streams: renews it every
    ttl/3 from a daemon thread (a stalled upstream sends no chunks, but the
    holder is alive), and releases it at the end. `lost` turns true when a
    renewal finds the lease gone: the generation must stop at once."""

    def __init__(self, leases: Leases, holder: int | str, *, ttl: float):
        self.leases, self.holder, self.ttl = leases, holder, ttl
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{holder}", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self.leases.renew(self.holder, ttl=self.ttl)  # LeaseLost: never start
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.leases.release(self.holder)

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.leases.renew(self.holder, ttl=self.ttl)
            except LeaseLost:
                self.lost = True
                return
