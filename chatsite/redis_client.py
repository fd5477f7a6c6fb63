"""One Redis connection pool per process for the project's own keys (GPU
state, cancel flags); Celery, Channels and the cache keep their own."""
import functools

import redis
from django.conf import settings


@functools.lru_cache(maxsize=1)
def redis_client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, decode_responses=True, health_check_interval=30)
