"""Leases: how an Ollama generation on a CPU worker holds the GPU.

A lease is granted before the generation is queued: by the GPU worker's
acquire step, or by the scheduler's admission when Ollama already holds
the GPU (gpu_manager/scheduler.py, the fast path); the CPU worker renews it
while it streams and releases it at the end. The GPU worker waits until no lease is live before
it unloads Ollama's models, so no Ollama generation runs while a local
model is resident (docs/gpu-arbitration.md, I1).

A lease is a member of a sorted set scored by its expiry time, so that a
holder that dies stops holding the GPU when its lease expires. Renewal is
conditional: a lease that expired and was reaped is never revived, and its
holder learns that it must stop.

Keys, per slot S:  gpu:slot:S:leases  zset  message id -> expiry (Unix time)

A claim (`Claims`) is the other kind of lease here: one key per claimed
thing, held by at most one holder at a time (`SET key token NX PX ttl`),
renewed and released only by the holder whose token it still stores. The
chat uses it so that only one run streams a reply (chat/dispatch.py,
`reply_claim`). `Keeper` keeps either kind alive while its holder works.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable

from redis.exceptions import RedisError

from chatsite.errors import CodedError
from chatsite.redis_client import redis_client

log = logging.getLogger(__name__)

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

# A claim is renewed only by the holder whose token it stores (fencing: a
# holder whose claim expired and was taken over must not extend the new
# holder's). A claim found missing is taken again: nobody else holds it,
# and Redis loses every key when it restarts without persistence, while
# the holder still works.
_CLAIM_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# Release only one's own claim: after an expiry and a takeover the key is
# the new holder's.
_CLAIM_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseLost(CodedError):
    """The lease expired (or was reaped) while its holder still ran."""

    code = "gpu_lease_lost"


class ClaimLost(LeaseLost):
    """Another holder took the claim over after it expired (its holder
    stalled, or lost Redis, for longer than the TTL)."""

    code = "claim_lost"


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


class Claims:
    """Exclusive, fenced claims on named things, each under `prefix:name`.

    `take` returns a token, or None while another holder's claim is live;
    `renew` and `release` act only if the claim still holds that token. A
    holder that dies stops holding its claim after `ttl` seconds."""

    def __init__(self, *, prefix: str):
        self.prefix = prefix
        self._redis = redis_client()
        self._renew = self._redis.register_script(_CLAIM_RENEW)
        self._release = self._redis.register_script(_CLAIM_RELEASE)

    def key(self, name: int | str) -> str:
        return f"{self.prefix}:{name}"

    def take(self, name: int | str, *, ttl: float) -> str | None:
        # The token names its process, for the logs of whoever finds it held.
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        taken = self._redis.set(self.key(name), token, nx=True, px=_ms(ttl))
        return token if taken else None

    def renew(self, name: int | str, token: str, *, ttl: float) -> None:
        if not self._renew(keys=[self.key(name)], args=[token, _ms(ttl)]):
            raise ClaimLost(f"the claim on {self.key(name)} was taken over by another holder")

    def release(self, name: int | str, token: str) -> bool:
        return bool(self._release(keys=[self.key(name)], args=[token]))

    def drop(self, name: int | str) -> None:
        """Delete the claim, unfenced: only for a holder whose work has made
        any other holder's pointless (chat/dispatch.py `ReplyHold`)."""
        self._redis.delete(self.key(name))

    def holder(self, name: int | str) -> str | None:
        """The token of the live claim, if any."""
        return self._redis.get(self.key(name))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class Keeper:
    """Keeps a lease or a claim alive while its holder works: renews it
    every ttl/3 from a daemon thread (a stalled upstream sends no chunks,
    but the holder is alive), and releases it at the end. `lost` turns true
    when a renewal finds it gone or taken: the holder must stop at once.

    A renewal that cannot reach Redis is retried at the next beat: the
    holder learns the truth (lost, or still its own) once Redis answers."""

    def __init__(self, *, name: str, renew: Callable[[], None], release: Callable[[], None], ttl: float,
                 renew_first: bool = True):
        self._renew, self._release, self.ttl = renew, release, ttl
        #: Whether `start` renews at once: a lease granted earlier must be
        #: checked before its holder works; a claim just taken need not be.
        self._renew_first = renew_first
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "Keeper":
        """Renew once (LeaseLost: never start; unless `renew_first` is
        off), then keep renewing. A keeper
        already started is returned as it is, so that one started early can
        still guard a `with` block."""
        if self._thread.ident is None:
            if self._renew_first:
                self._renew()
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing, then release (in that order: a renewal after the
        release would take a claim again)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()
        self._release()

    def __enter__(self) -> "Keeper":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._renew()
            except LeaseLost:
                self.lost = True
                return
            except RedisError as exc:
                log.warning("could not renew %s: %s; retrying", self._thread.name, exc)


class LeaseKeeper(Keeper):
    """Holds a granted GPU lease while an Ollama generation streams."""

    def __init__(self, leases: Leases, holder: int | str, *, ttl: float):
        super().__init__(name=f"lease-{holder}", renew=lambda: leases.renew(holder, ttl=ttl),
                         release=lambda: leases.release(holder), ttl=ttl)
