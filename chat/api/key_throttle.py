"""Wrong Bearer keys, throttled (issue 17): past API_KEY_FAILURE_LIMIT
unknown keys from one address, or with one key prefix (the "account" a key
guesser aims at: the prefix is shown in the admin), within
API_KEY_COOLOFF_SECONDS, every key from that address or with that prefix
is refused with 429 until the cool-down ends, the right one too, so that a
guess made during it tells nothing.

The password logins (the login page, the admin) are django-axes'
(settings AXES_*). Bearer keys are counted here instead, in Redis: axes
would add a database query to every /v1 request to read its lockouts, and
its failure signal carries the credentials cleansed, so it cannot count per
key prefix. Here the check is one Redis script per request and a failure
one more; a key that is known but revoked or expired is not a guess and is
not counted.

Keys: `api:keyfail:addr:<address>` and `api:keyfail:prefix:<prefix>`, each
a count of failures that expires API_KEY_COOLOFF_SECONDS after the first
one, or after the one that reached the limit.
"""
from __future__ import annotations

import functools
import logging
import math

import redis
from django.conf import settings

from chatsite.errors import CodedError
from chatsite.redis_client import redis_client

log = logging.getLogger(__name__)

# The milliseconds left of the longest lockout among KEYS, 0 when none is
# locked (a count at the limit is a lockout until its key expires).
_CHECK = """
local wait = 0
for _, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') >= tonumber(ARGV[1]) then
    wait = math.max(wait, redis.call('PTTL', key))
  end
end
return wait
"""
# One more failure for each of KEYS; the count's window starts at the first
# failure, and the cool-down at the failure that reaches the limit.
_RECORD = """
for _, key in ipairs(KEYS) do
  local n = redis.call('INCR', key)
  if n == 1 or n == tonumber(ARGV[1]) then
    redis.call('PEXPIRE', key, ARGV[2])
  end
end
return 0
"""


class KeyThrottled(CodedError):
    """Too many wrong keys from this address or for this key prefix."""

    code = "rate_limited"

    def __init__(self, *, retry_after: float):
        super().__init__(f"Too many incorrect API keys from this address or for this key: refused for "
                         f"{math.ceil(retry_after)} more seconds.")
        self.retry_after = retry_after


def throttle_keys(*, address: str, prefix: str) -> list[str]:
    return [f"api:keyfail:addr:{address}", f"api:keyfail:prefix:{prefix}"]


@functools.lru_cache(maxsize=1)
def _scripts():
    client = redis_client()
    return client.register_script(_CHECK), client.register_script(_RECORD)


def key_guesses_check(*, address: str, prefix: str) -> None:
    """Raise KeyThrottled while the address or the prefix is locked out.
    When Redis does not answer, the key is let through to its check: the
    API needs Redis for everything else and reports that outage itself."""
    try:
        wait_ms = _scripts()[0](keys=throttle_keys(address=address, prefix=prefix),
                                args=[settings.API_KEY_FAILURE_LIMIT])
    except redis.RedisError:
        log.warning("API key throttle not checked: Redis does not answer", exc_info=True)
        return
    if wait_ms > 0:
        raise KeyThrottled(retry_after=wait_ms / 1000)


def key_guess_record(*, address: str, prefix: str) -> None:
    """Count one unknown key from `address` with `prefix`."""
    log.warning("unknown API key %s… from %s", prefix, address)
    try:
        _scripts()[1](keys=throttle_keys(address=address, prefix=prefix),
                      args=[settings.API_KEY_FAILURE_LIMIT, int(settings.API_KEY_COOLOFF_SECONDS * 1000)])
    except redis.RedisError:
        log.warning("API key failure not counted: Redis does not answer", exc_info=True)
