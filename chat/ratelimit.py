"""Per-user rate limit on sending messages (issue 7): at most
CHAT_RATE_LIMIT_MESSAGES in any CHAT_RATE_LIMIT_WINDOW seconds.

A sliding window in Redis, shared by every web process: one sorted set per
user holds the times of the sends it admitted within the window. A fixed
window would let a script send twice the limit across a window boundary.
"""
from __future__ import annotations

import functools
import logging
import math
import uuid

import redis
from django.conf import settings

from chatsite.errors import CodedError
from chatsite.redis_client import redis_client

log = logging.getLogger(__name__)

# Check and record in one step (a script runs atomically), so two sockets of
# one user cannot both take the last slot. The time is Redis's own: web
# processes on several machines agree on it. Returns 0 when admitted, else
# the milliseconds until the oldest send leaves the window.
_ADMIT = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local window_ms = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - window_ms)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + window_ms - now_ms)
end
redis.call('ZADD', KEYS[1], now_ms, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window_ms)
return 0
"""


class RateLimited(CodedError):
    """The user sent too many messages; `retry_after` seconds until the next may go."""

    code = "rate_limited"

    def __init__(self, *, limit: int, window: float, retry_after: float):
        super().__init__(
            f"Too many messages: at most {limit} in {window:g} seconds. "
            f"Try again in {math.ceil(retry_after)} s."
        )
        self.limit, self.window, self.retry_after = limit, window, retry_after


def rate_key(user_id: int) -> str:
    return f"chat:ratelimit:{user_id}"


@functools.lru_cache(maxsize=1)
def _admit():
    return redis_client().register_script(_ADMIT)


def message_rate_check(*, user) -> None:
    """Count one send of `user`, or raise RateLimited when the window is full.

    Every attempt counts, accepted or refused later for its content: a
    client that loops on a bad frame costs the service like one that loops
    on good ones. A limit of 0 turns the check off. When Redis does not
    answer, the send is let through: the dispatch that follows needs Redis
    too and reports the outage itself (`queue_unavailable`), which is a
    clearer error than a rate limit nobody exceeded.
    """
    limit, window = settings.CHAT_RATE_LIMIT_MESSAGES, settings.CHAT_RATE_LIMIT_WINDOW
    if limit <= 0:
        return
    try:
        wait_ms = _admit()(keys=[rate_key(user.pk)], args=[limit, int(window * 1000), uuid.uuid4().hex])
    except redis.RedisError:
        log.warning("rate limit not checked for user %s: Redis does not answer", user.pk, exc_info=True)
        return
    if wait_ms:
        raise RateLimited(limit=limit, window=window, retry_after=wait_ms / 1000)
