"""One Redis connection pool per process for the project's own keys (GPU
state, cancel flags); Celery, Channels and the cache keep their own.

The pool blocks when all its connections are in use instead of failing:
redis-py caps a pool at 100 connections and raises "Too many connections"
past that, and a CPU worker's hundreds of greenlets can each be mid-command
at once (REDIS_POOL_MAX, REDIS_POOL_TIMEOUT)."""
import functools

import redis
from django.conf import settings


def blocking_pool(url: str, **options) -> redis.BlockingConnectionPool:
    """A pool that waits up to REDIS_POOL_TIMEOUT for a free connection."""
    return redis.BlockingConnectionPool.from_url(url, max_connections=settings.REDIS_POOL_MAX,
                                                 timeout=settings.REDIS_POOL_TIMEOUT, **options)


@functools.lru_cache(maxsize=1)
def redis_client() -> redis.Redis:
    return redis.Redis(connection_pool=blocking_pool(settings.REDIS_URL, decode_responses=True,
                                                     health_check_interval=30))
